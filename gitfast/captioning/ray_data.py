"""Captioning datasets across a cluster with Ray Data: each actor of an actor pool holds one
`gitfast.Captioner`, Ray Data streams the blocks, balances the actors and writes the output.

    import ray
    from gitfast.captioning.ray_data import caption_dataset

    ray.init()  # or an existing cluster: ray.init(address="auto")
    caption_dataset("s3://bucket/shards/", "s3://bucket/captions/", input="webdataset",
                    concurrency=8)                       # 8 actors, one GPU each where the cluster has GPUs

or, from a Dataset of your own (a column of encoded image bytes or of paths):

    from gitfast.captioning.ray_data import GitCaptioner
    ds = ray.data.read_parquet("images.parquet")
    ds = ds.map_batches(GitCaptioner, fn_constructor_kwargs={"column": "image"}, batch_size=256,
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_format="pyarrow")
    ds.write_parquet("captions/")

Each output row keeps the input's other columns (the image bytes column is dropped) and adds
`source` (the path, key or row label), `caption` (None on error) and `error` (None, or why that
input failed: a bad image is a row, never a failed task). Ray Data does not keep row order across
blocks by default; the kept columns say which input a row belongs to. Needs `pip install gitfast[ray]`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .records import IMAGE_EXTENSIONS, Source

# the image column Ray Data's readers produce: read_binary_files -> "bytes"; read_webdataset -> one
# column per file extension
WEBDATASET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class GitCaptioner:
    """A callable class for `Dataset.map_batches(GitCaptioner, batch_format="pyarrow", ...)`: loads a
    Captioner once per actor and captions one batch (a pyarrow Table) per call.

    column: the image column (encoded bytes, a path string, or a Hugging Face `{"bytes", "path"}`
        struct), or several columns tried in order per row (webdataset: one column per extension).
    id_column: the column naming each row in `source` (default: "path", else "__key__", else the
        row's position in its batch).
    prompt: one question for every image (VQA checkpoints), or None to caption.
    The rest goes to `gitfast.Captioner` (model, device, dtype, max_batch_size, num_workers,
    jpeg_draft) and to its `caption` (max_new_tokens, num_beams, ...).
    """

    def __init__(self, model: Union[str, os.PathLike, None] = None, *, column: Union[str, Sequence[str]] = "bytes",
                 id_column: Optional[str] = None, prompt: Optional[str] = None, device=None, dtype=None,
                 max_batch_size: int = 32, num_workers: int = 0, jpeg_draft: bool = False,
                 max_new_tokens: int = 20, **generate_kwargs):
        from .captioner import Captioner

        self.columns = (column,) if isinstance(column, str) else tuple(column)
        self.id_column, self.prompt = id_column, prompt
        self.generate_kwargs = dict(generate_kwargs, max_new_tokens=max_new_tokens)
        self.captioner = Captioner(model, device=device, dtype=dtype, max_batch_size=max_batch_size,
                                   num_workers=num_workers, jpeg_draft=jpeg_draft)

    def __call__(self, batch: "pyarrow.Table") -> "pyarrow.Table":
        import pyarrow as pa

        present = [c for c in self.columns if c in batch.column_names]
        if not present:
            raise KeyError(f"none of the image columns {list(self.columns)} is in the batch "
                           f"(columns: {batch.column_names})")
        ids = self._ids(batch)
        values = [batch.column(c).to_pylist() for c in present]
        inputs = [_input(label, [v[i] for v in values]) for i, label in enumerate(ids)]
        results = self.captioner.caption(inputs, self.prompt, **self.generate_kwargs)
        out = batch.drop_columns(present)
        for name, column in (("source", [r.source for r in results]), ("caption", [r.text for r in results]),
                             ("error", [r.error for r in results])):
            out = out.append_column(name, pa.array(column, type=pa.string()))  # typed even when all null
        return out

    def _ids(self, batch) -> List[str]:
        for name in ([self.id_column] if self.id_column else ["path", "__key__"]):
            if name in batch.column_names:
                return [str(v) for v in batch.column(name).to_pylist()]
        if self.id_column:
            raise KeyError(f"id column {self.id_column!r} is not in the batch (columns: {batch.column_names})")
        return [f"<row {i}>" for i in range(batch.num_rows)]


def _input(label: str, values):
    """The first non-empty value among a row's image columns, as something Captioner reads."""
    for value in values:
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            return Source(label, functools.partial(_same, bytes(value)))
        if isinstance(value, str):  # a path, read under the row's label
            return Source(label, Path(value).read_bytes)
    return Source(label, functools.partial(_same, b""))  # no image in this row: an "empty file" record


def _same(data: bytes) -> bytes:
    return data


def captions(ds, *, column: Union[str, Sequence[str]] = "bytes", concurrency: int = 1, num_gpus: Optional[float] = None,
             num_cpus: Optional[float] = None, batch_size: int = 64, **captioner_kwargs):
    """`ds` with `source`, `caption` and `error` columns added (lazy: a Ray Dataset plan).

    concurrency: the number of actors, each holding one Captioner. num_gpus: per actor; None gives
    1 when the cluster has GPUs, else 0 (and the actors run on the CPU). num_cpus: per actor (Ray's
    default: 1); give each actor 1 + its `num_workers` when it prepares images in worker processes."""
    import ray
    import ray.data

    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    if not num_gpus:
        captioner_kwargs.setdefault("device", "cpu")
    extra = {} if num_cpus is None else {"num_cpus": num_cpus}
    return ds.map_batches(GitCaptioner, fn_constructor_kwargs=dict(captioner_kwargs, column=column),
                          batch_format="pyarrow", batch_size=batch_size, num_gpus=num_gpus,
                          compute=ray.data.ActorPoolStrategy(size=concurrency), **extra)


def caption_dataset(paths: Union[str, Sequence[str]], output: str, *, input: str = "images",
                    column: Union[str, Sequence[str], None] = None, concurrency: int = 1,
                    num_gpus: Optional[float] = None, num_cpus: Optional[float] = None, batch_size: int = 64,
                    **captioner_kwargs) -> str:
    """Reads `paths` with Ray Data, captions every image, writes Parquet files into the folder `output`.

    input: "images" (image files or folders of them: `read_binary_files`), "parquet" (`read_parquet`;
    `column` names the image column, encoded bytes or paths, default "image"), or "webdataset" (tar
    shards: `read_webdataset`, images under their extension's column, rows named by `__key__`).
    The remaining arguments are `captions`'s and `GitCaptioner`'s. Returns `output`."""
    import ray.data

    if input == "images":
        ds = ray.data.read_binary_files(paths, include_paths=True,
                                        file_extensions=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        column = column or "bytes"
    elif input == "parquet":
        ds = ray.data.read_parquet(paths)
        column = column or "image"
    elif input == "webdataset":
        ds = ray.data.read_webdataset(paths, decoder=None)  # keep the encoded bytes; gitfast decodes
        column = column or WEBDATASET_IMAGE_COLUMNS
    else:
        raise ValueError(f"input must be 'images', 'parquet' or 'webdataset', not {input!r}")
    captions(ds, column=column, concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus, batch_size=batch_size,
             **captioner_kwargs).write_parquet(output)
    return output
