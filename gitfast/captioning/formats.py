"""Output formats: JSONL and CSV writers that flush as they go, a Parquet table builder, and readers
of all three (what `--resume` reads back).

Writers here write rows (`records.FIELDS`, plus any extra columns of a per-shard output). CSV has
no null: a missing caption or error is written as an empty field.

Durability: every row is flushed as it is written, so a killed process (SIGKILL included) loses
at most a torn last line; files are fsynced every `SYNC_EVERY` rows or `SYNC_SECONDS`, and on
close, against a machine that goes down.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Iterable, List, Optional, TextIO

from .records import FIELDS, valid_row

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}
SYNC_EVERY, SYNC_SECONDS = 64, 2.0


class OutputError(ValueError):
    """An output that cannot be used as asked (exists without --resume, unreadable, wrong format)."""


def infer_format(path: Optional[str], explicit: Optional[str] = None) -> str:
    """`explicit` if given, else from the output's extension; JSONL when neither says."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise OutputError(f"unknown format {explicit!r}; use one of {', '.join(FORMATS)}")
        return explicit
    if path is None:
        return "jsonl"
    return _EXTENSIONS.get(os.path.splitext(path)[1].lower(), "jsonl")


class Writer:
    """Something records or rows are written to; `close(complete=False)` after a failure."""

    def write(self, rec) -> None:
        raise NotImplementedError

    def write_all(self, recs: Iterable) -> None:
        for rec in recs:
            self.write(rec)

    def close(self, complete: bool = True) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(complete=exc_type is None)


class StreamWriter(Writer):
    """One write and a flush per row (a kill leaves whole lines plus at most one torn one); an
    fsync every SYNC_EVERY rows or SYNC_SECONDS, and on close. `owns`: the stream is ours to
    sync and close (not stdout, not a caller's); `sync=False` for streams fsync refuses (devices, FIFOs)."""

    def __init__(self, stream: TextIO, owns: bool = True, sync: bool = True):
        self.stream, self.owns, self.sync = stream, owns, sync
        self._unsynced, self._synced_at = 0, time.monotonic()

    def _written(self):
        self.stream.flush()
        if self.owns:
            self._unsynced += 1
            if self._unsynced >= SYNC_EVERY or time.monotonic() - self._synced_at > SYNC_SECONDS:
                self._sync()

    def _sync(self):
        if self.sync:
            os.fsync(self.stream.fileno())
        self._unsynced, self._synced_at = 0, time.monotonic()

    def close(self, complete=True):
        if not self.owns or self.stream.closed:
            return
        try:
            self.stream.flush()
            self._sync()
        finally:
            self.stream.close()


class JsonlWriter(StreamWriter):
    def write(self, row):
        row = valid_row(row)
        line = {k: row.get(k) for k in FIELDS}
        line.update(row)  # extra fields (per-shard outputs) after the three
        self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._written()


class CsvWriter(StreamWriter):
    """Rows end in "\n"; a field holding "\r" or "\n" is quoted. (csv quotes only for the characters
    of its line terminator, so rows are formatted with "\r\n" and the terminator swapped.)"""

    def __init__(self, stream: TextIO, header: bool, owns: bool = True, sync: bool = True):
        super().__init__(stream, owns, sync)
        self._line = io.StringIO()
        self.csv = csv.writer(self._line, lineterminator="\r\n")
        if header:
            self._row(FIELDS)

    def _row(self, values) -> None:
        self._line.seek(0)
        self._line.truncate()
        self.csv.writerow(values)
        self.stream.write(self._line.getvalue()[:-2] + "\n")

    def write(self, row):
        row = valid_row(row)
        self._row(["" if row.get(k) is None else row[k] for k in FIELDS])
        self._written()


def arrow_table(rows: List[dict]):
    """The rows as one Arrow table: the three fields (and `key`, first) as text, other columns typed
    by pyarrow where their values agree."""
    import pyarrow as pa

    rows = [valid_row(r) for r in rows]
    names = list(FIELDS)
    for row in rows:
        names += [k for k in row if k not in names]
    cols = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if name in FIELDS or name == "key":
            cols[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        else:
            cols[name] = _arrow_column(values)
    if "key" in cols:  # key first, as img2dataset's tables
        cols = {"key": cols.pop("key"), **cols}
    return pa.table(cols)


def _arrow_column(values):
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        # mixed types across samples (an id that is sometimes a number, sometimes text): keep them as text
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        type=pa.string())


# --- reading -----------------------------------------------------------------------------------
def read_jsonl(path: str) -> List[dict]:
    """Rows of a JSONL output; an unparsable last line without its newline (torn write) is dropped."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn_ok = not data.endswith(b"\n")  # only the very last line may be torn
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if torn_ok and n == len(lines):
                break
            raise OutputError(f"{path}:{n} is not a JSON record; not a gitfast output?") from None
        rows.append(_checked(row, path, n))
    return rows


def read_csv(path: str) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    if tuple(rows[0]) != FIELDS:
        raise OutputError(f"{path} has columns {rows[0]}, not {list(FIELDS)}; not a gitfast output?")
    body = rows[1:]
    if body and not text.endswith("\n"):
        body = body[:-1]  # torn last row
    recs = []
    for n, row in enumerate(body, 2):
        if len(row) != len(FIELDS):
            raise OutputError(f"{path}:{n} does not have the {len(FIELDS)} columns {list(FIELDS)}")
        source, caption, error = row
        # CSV has no null: an empty error means success (and then an empty caption is a real one)
        recs.append(_checked({"source": source, "caption": caption if not error else (caption or None),
                              "error": error or None}, path, n))
    return recs


def read_parquet(path: str) -> List[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family for unreadable files
        raise OutputError(f"cannot read {path} as Parquet: {exc}") from None
    if "source" not in table.column_names:
        raise OutputError(f"{path} has no 'source' column; not a gitfast output?")
    return [_checked(r, path, n) for n, r in enumerate(table.to_pylist(), 1)]


def _checked(row, path, n) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("source"), str):
        raise OutputError(f"{path}:{n} has no 'source'; not a gitfast output?")
    return row
