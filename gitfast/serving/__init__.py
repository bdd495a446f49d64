"""The serving wing: everything between a prepared batch and its chosen tokens.

The paged KV cache and its block allocator (`paged_cache`), the decoder run over it (`paged_runner`),
continuous batching (`engine`), decode steps replayed from CUDA graphs (`cuda_graphs`), token
selection (`selection`), transformers-exact generation loops (`generation`) and `generate` laid out as
transformers lays it out (`paged_generate`).
"""
