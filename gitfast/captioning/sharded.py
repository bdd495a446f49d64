"""Per-shard outputs (`--out-dir`): one file per input shard, named after it (`00000.tar` ->
`00000.parquet`), plus `captions.<ext>` for inputs that are not from a shard.

Each is built in a journal like a Parquet output (JSONL too, `resumable.Output(atomic=True)`), and
turned into its final name — via a temporary file and a rename — as soon as its shard's last record
is written, in the shard's own order. Rows carry `key` (the sample key) and the sample's JSON fields
and `txt` member, flattened to top-level columns; a field whose name clashes is prefixed with `json_`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

from .formats import OutputError, Writer
from .records import Record, Source
from .resumable import Output, check_writable_folder, remove_stale_temps

SHARDED_FORMATS = ("parquet", "jsonl")
PLAIN_GROUP_NAME = "captions"


def carried_fields(base: dict, fields: dict) -> dict:
    """`base` plus a sample's fields as top-level columns: nested values as JSON text, a name that
    is already taken prefixed with `json_` (img2dataset's json has its own `key` and `caption`)."""
    out = dict(base)
    for k, v in fields.items():
        name = str(k)
        while name in out:
            name = "json_" + name
        out[name] = json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
    return out


class ShardedOutput:
    """`--out-dir`: one output per shard (named after it) and `captions.<ext>` for plain inputs.

    `sources` is the whole ordered input. `done` holds the sources every resumed output already has."""

    def __init__(self, folder: str, fmt: str, sources: Sequence[Source], *, resume: bool = False,
                 overwrite: bool = False):
        if fmt not in SHARDED_FORMATS:
            raise OutputError(f"--out-dir writes {' or '.join(SHARDED_FORMATS)}, not {fmt}")
        if resume and overwrite:
            raise OutputError("--resume and --overwrite contradict each other")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputError(f"--out-dir {folder!r} exists and is not a folder")
        check_writable_folder(os.path.abspath(folder))
        self.folder, self.fmt = folder, fmt
        names: Dict[Optional[str], str] = {}
        orders: Dict[Optional[str], Dict[str, int]] = {}
        for s in sources:
            if s.group not in names:
                names[s.group] = _output_name(s.group, fmt)
            order = orders.setdefault(s.group, {})
            order[s.id] = len(order)
        taken: Dict[str, Optional[str]] = {}
        for group, name in names.items():
            if name in taken:
                a, b = (taken[name] or "inputs that are not shards"), (group or "inputs that are not shards")
                raise OutputError(f"{a} and {b} would both write {os.path.join(folder, name)}; "
                                  "caption them into different --out-dir folders")
            taken[name] = group
        self.outputs = {g: Output(os.path.join(folder, name), fmt, resume=resume, overwrite=overwrite, atomic=True,
                                  order=orders[g]) for g, name in names.items()}
        self.done = set().union(*(o.done for o in self.outputs.values())) if self.outputs else set()

    def open(self, todo: Sequence[Source]) -> Writer:
        return _ShardedWriter(self, todo)


class _ShardedWriter(Writer):
    def __init__(self, out: ShardedOutput, todo: Sequence[Source]):
        self.out = out
        self.pending: Dict[Optional[str], int] = {}
        for s in todo:
            self.pending[s.group] = self.pending.get(s.group, 0) + 1
        self.writers: Dict[Optional[str], Writer] = {}
        # a journal left by a killed run whose shard has nothing left to do: finish it now
        for group, output in out.outputs.items():
            remove_stale_temps(output.path)
            if not self.pending.get(group) and output.has_journal:
                output.open_rows().close(complete=True)

    def write(self, rec: Record):
        source = rec.source
        group = source.group
        writer = self.writers.get(group)
        if writer is None:
            writer = self.writers[group] = self.out.outputs[group].open_rows()
        fields = source.meta() if source.meta is not None else {}
        writer.write(carried_fields({"key": source.key, **rec.row()}, fields))
        self.pending[group] -= 1
        if self.pending[group] == 0:  # the shard is complete: its file takes its final name now
            del self.writers[group]
            writer.close(complete=True)

    def close(self, complete=True):
        writers, self.writers = self.writers, {}
        error = None
        for group, writer in writers.items():
            try:
                writer.close(complete=complete and self.pending.get(group, 0) == 0)
            except OSError as exc:  # close the others all the same; their journals stay for --resume
                error = error or exc
        if error is not None:
            raise error


def _output_name(group: Optional[str], fmt: str) -> str:
    ext = ".parquet" if fmt == "parquet" else ".jsonl"
    if group is None:
        return PLAIN_GROUP_NAME + ext
    base = os.path.basename(group)
    return (base[: -len(".tar")] if base.lower().endswith(".tar") else base) + ext
