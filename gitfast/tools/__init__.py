"""Tooling around the library, imported by nothing in it:

- `cli`: the `gitfast` console script, one subcommand per module, each imported only when used
  (`gitfast caption` is the captioning wing's, `gitfast bench` the benchmarks')
- `info`: `gitfast info`, versions, devices, and which backend serves each fused op on each device
- `fidelity`: the correctness contract in low precision, where gitfast's greedy tokens and transformers'
  differ each divergence must be a near-tie (used by bench/fidelity_check.py and the tests)
"""
