"""The serving wing: everything between a prepared batch and its chosen tokens.

The paged KV cache, its block bookkeeping and allocator (`paged_cache`), the decoder run over it
(`paged_runner`), continuous batching (`engine`: one run at a time, schedule -> run -> emit) split into
the scheduler that admits requests and sizes the cache (`scheduler`, no tensors) and the executor of its
plans (`executor`); its lockstep mode for transformers-exact loops over the same requests and cache
(`lockstep`, the loops in `generation`); the stopping rules (`stopping`), decode steps replayed from
CUDA graphs (`cuda_graphs`) and token selection (`selection`).
"""
