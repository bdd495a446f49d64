"""The captioning wing: from paths, folders, tar shards and tables to ordered, resumable records.

Inputs (`sources`, `shards`), decoding and preprocessing (`images`, `workers`), the `Captioner`
(`captioner`), output formats and resumable writing (`writers`), the `gitfast caption` command (`cli`),
several devices (`multi_device`) and Ray Data (`ray_data`).
"""
