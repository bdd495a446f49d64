"""The captioning wing: from paths, folders, tar shards and tables to ordered, resumable records.

- what flows: `records` (Source in, Record out; the on-disk record fields)
- inputs: `sources` (files, folders, globs, lists, tables), `shards` (tar shards read in place)
- preparing: `images` (decode to RGB), `workers` (processor and prompt ids, inline or in processes)
- the model: `captioner` (`Captioner`), `multi_device` (one process per device), `preflight` (what a
  run on several devices refuses before any starts)
- outputs: `formats` (JSONL/CSV/Parquet), `resumable` (one journaled, resumable file), `sharded`
  (one file per shard)
- the command: `cli` (`gitfast caption`'s parser), `cli_run` (its run); elsewhere: `ray_data` (Ray Data)
"""
