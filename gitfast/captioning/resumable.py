"""One output file that a run can resume, and that is only ever replaced whole.

Resuming (`Output(..., resume=True)`): the existing output is read — a torn last line from a killed
run is tolerated and dropped — and rewritten (to a temporary file, then renamed over the original)
keeping only the first successful record of each source. Failed sources are therefore retried and
no source ever appears twice. New records are appended after the kept ones, so a resumed file is in
input order within each run, not across runs.

Parquet cannot be appended to, nor read back without its footer, so a Parquet output is built in a
JSONL journal next to it (`<out>.partial.jsonl`), flushed per record like the JSONL writer. When the
run ends normally the journal is converted into a temporary file, renamed to `<out>`, and the
journal deleted. Until then a previous `<out>` stays untouched; `--resume` reads the previous `<out>`
and any journal a killed run left, and the final file holds both (the "append" is a rewrite).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence

from .formats import (FORMATS, CsvWriter, JsonlWriter, OutputError, Writer, arrow_table, read_csv, read_jsonl,
                      read_parquet)
from .records import Record, is_done


class Output:
    """An output destination, checked on construction (nothing is modified until `open()`).

    `path=None` means stdout (JSONL, or CSV when asked). `done` holds the sources a resumed output already has.
    """

    def __init__(self, path: Optional[str], fmt: str, *, resume: bool = False, overwrite: bool = False,
                 atomic: bool = False, order: Optional[Dict[str, int]] = None):
        """atomic: build a JSONL output in a journal too, renamed into place when complete (Parquet
        always is). order: source -> position; a journaled output is sorted by it when finished."""
        if fmt not in FORMATS:
            raise OutputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        if resume and overwrite:
            raise OutputError("--resume and --overwrite contradict each other")
        if path is None and (resume or fmt == "parquet"):
            raise OutputError(f"{'--resume' if resume else 'parquet output'} needs --out FILE")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OutputError("parquet output needs pyarrow: pip install 'gitfast[parquet]'") from None
        self.path, self.fmt, self.resume, self.overwrite, self.order = path, fmt, resume, overwrite, order
        journaled = fmt == "parquet" or (atomic and fmt == "jsonl")
        self.journal = f"{path}.partial.jsonl" if journaled else None
        self._kept: List[dict] = []
        if path is not None and os.path.isdir(path):
            raise OutputError(f"--out {path!r} is a folder")
        if path is not None:
            check_writable_folder(os.path.dirname(os.path.abspath(path)))
        existing = [p for p in (path, self.journal) if p and os.path.isfile(p) and os.path.getsize(p) > 0]
        if existing and not (resume or overwrite):
            raise OutputError(f"{existing[0]!r} exists; pass --resume to continue it or --overwrite to replace it")
        if resume:
            self._kept = first_success(self._read_existing())
        self.done = {r["source"] for r in self._kept}

    def _read_existing(self) -> List[dict]:
        rows: List[dict] = []
        if self.journal is not None:
            if os.path.isfile(self.path):
                rows += read_parquet(self.path) if self.fmt == "parquet" else read_jsonl(self.path)
            if os.path.isfile(self.journal):
                rows += read_jsonl(self.journal)
        elif os.path.isfile(self.path):
            rows = read_jsonl(self.path) if self.fmt == "jsonl" else read_csv(self.path)
        return rows

    @property
    def has_journal(self) -> bool:
        return self.journal is not None and os.path.isfile(self.journal)

    def open(self, todo: Optional[Sequence] = None) -> Writer:
        """Rewrites what is kept (resume) and returns the writer of `Record`s. `todo` is unused here
        (ShardedOutput takes it)."""
        return _RecordWriter(self.open_rows())

    def open_rows(self) -> Writer:
        """As `open`, the writer taking row dicts (a per-shard output adds columns)."""
        if self.path is None:
            return CsvWriter(sys.stdout, header=True, owns=False) if self.fmt == "csv" else JsonlWriter(sys.stdout, owns=False)
        target = self.journal or self.path
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if self.fmt == "csv":
            replace_with(target, lambda f: CsvWriter(f, header=True, owns=False).write_all(self._kept))
            writer: Writer = CsvWriter(open(target, "a", newline="", encoding="utf-8"), header=False)
        else:
            replace_with(target, lambda f: JsonlWriter(f, owns=False).write_all(self._kept))
            writer = JsonlWriter(open(target, "a", encoding="utf-8"))
        if self.journal is not None:
            writer = _JournalFinisher(writer, self.journal, self.path, self.fmt, self.order)
        return writer


class _RecordWriter(Writer):
    def __init__(self, rows: Writer):
        self.rows = rows

    def write(self, rec: Record):
        self.rows.write(rec.row())

    def close(self, complete=True):
        self.rows.close(complete)


class _JournalFinisher(Writer):
    """Writes to the JSONL journal; on a complete close turns the journal into the final file
    (Parquet or JSONL) under a temporary name, renames it into place and deletes the journal."""

    def __init__(self, journal_writer: Writer, journal: str, path: str, fmt: str, order=None):
        self.inner, self.journal, self.path, self.fmt, self.order = journal_writer, journal, path, fmt, order

    def write(self, row):
        self.inner.write(row)

    def close(self, complete=True):
        self.inner.close()
        if not complete:
            return  # the journal stays for --resume
        finish_journal(self.journal, self.path, self.fmt, self.order)


def finish_journal(journal: str, path: str, fmt: str, order: Optional[Dict[str, int]] = None) -> None:
    rows = read_jsonl(journal)
    if order is not None:  # stable: records of sources outside `order` keep their place at the end
        last = len(order)
        rows.sort(key=lambda r: order.get(r["source"], last))
    tmp = path + ".tmp"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(arrow_table(rows), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    else:
        replace_with(path, lambda f: JsonlWriter(f, owns=False).write_all(rows))
    if fmt == "parquet":
        os.replace(tmp, path)
    # a kill between the rename and this leaves both; the next --resume reads both, keeping each source once
    os.remove(journal)


def first_success(rows: Iterable[dict]) -> List[dict]:
    kept: Dict[str, dict] = {}
    for row in rows:
        if is_done(row) and row["source"] not in kept:
            kept[row["source"]] = row
    return list(kept.values())


def replace_with(path: str, fill) -> None:
    """Writes a file through `fill(stream)` under a temporary name, then renames it over `path`."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_writable_folder(folder: str) -> None:
    """The nearest existing ancestor of `folder` must be a folder we may write into (checked before
    any work, so a typo does not cost a model load)."""
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputError(f"cannot write under {folder!r}: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write under {folder!r}: {probe!r} is not writable")
