"""Checkpoint I/O: a GIT checkpoint (a local folder or a hub id) in, what gitfast runs from it out, and
a checkpoint transformers loads back out.

- the loading steps: `loading` (`resolve`, `load_config`, `read_weights`, `build_model`,
  `generation_config_of`; `load_checkpoint` runs them all), `hub` (a hub id downloaded into the Hugging
  Face cache as transformers does, only the files gitfast reads)
- the weights' names: `hf_format` (transformers' tensor names <-> gitfast's fused layout, both ways;
  `save` writes a checkpoint transformers loads)
- the small files, read without importing transformers (the Captioner's and the CLI's start-up):
  `config_reader` (config.json), `plain_generation` (generation_config.json), `processor` (pixels and
  tokenizer), `bert_tokenizer` (the BERT tokenizer on the `tokenizers` library)
- `compat`: the transformers versions gitfast works with, checked where gitfast first leans on them

The network it builds is `gitfast.model`'s; where the embedded default checkpoint lies is `gitfast.defaults`.
"""
