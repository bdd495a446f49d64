"""Caption record writers (JSONL, CSV, Parquet) that flush as they go and can resume a run.

A record is `{"source": str, "caption": str | None, "error": str | None}`; a source is done when
its record has a caption and no error.

Resuming (`Output(..., resume=True)`): the existing output is read — a torn last line from a killed
run is tolerated and dropped — and rewritten (to a temporary file, then renamed over the original)
keeping only the first successful record of each source. Failed sources are therefore retried and
no source ever appears twice. New records are appended after the kept ones, so a resumed file is in
input order within each run, not across runs.

Parquet cannot be appended to, nor read back without its footer, so a Parquet output is built in a
JSONL journal next to it (`<out>.partial.jsonl`), flushed per record like the JSONL writer. When the
run ends normally the journal is converted into `<out>.tmp` and renamed to `<out>`, and the journal
deleted. Until then a previous `<out>` stays untouched; `--resume` reads the previous `<out>` and
any journal a killed run left, and the final file holds both (the "append" is a rewrite).

CSV has no null: a missing caption or error is written as an empty field.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Dict, Iterable, List, Optional, TextIO

FIELDS = ("source", "caption", "error")
FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}


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


def record(source: str, caption: Optional[str], error: Optional[str]) -> dict:
    return {"source": source, "caption": caption, "error": error}


def is_done(rec: dict) -> bool:
    return rec.get("error") in (None, "") and rec.get("caption") is not None


class Output:
    """An output destination, checked on construction (nothing is modified until `open()`).

    `path=None` means stdout (JSONL, or CSV when asked). `done` holds the sources a resumed output already has.
    """

    def __init__(self, path: Optional[str], fmt: str, *, resume: bool = False, overwrite: bool = False):
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
        self.path, self.fmt, self.resume, self.overwrite = path, fmt, resume, overwrite
        self.journal = f"{path}.partial.jsonl" if fmt == "parquet" else None
        self._kept: List[dict] = []
        if path is not None and os.path.isdir(path):
            raise OutputError(f"--out {path!r} is a folder")
        existing = [p for p in (path, self.journal) if p and os.path.isfile(p) and os.path.getsize(p) > 0]
        if existing and not (resume or overwrite):
            raise OutputError(f"{existing[0]!r} exists; pass --resume to continue it or --overwrite to replace it")
        if resume:
            self._kept = _first_success(self._read_existing())
        self.done = {r["source"] for r in self._kept}

    def _read_existing(self) -> List[dict]:
        recs: List[dict] = []
        if self.fmt == "parquet":
            if os.path.isfile(self.path):
                recs += read_parquet(self.path)
            if os.path.isfile(self.journal):
                recs += read_jsonl(self.journal)
        elif os.path.isfile(self.path):
            recs = read_jsonl(self.path) if self.fmt == "jsonl" else read_csv(self.path)
        return recs

    def open(self) -> "Writer":
        if self.path is None:
            return _CsvWriter(sys.stdout, header=True, owns=False) if self.fmt == "csv" else _JsonlWriter(sys.stdout, owns=False)
        target = self.journal if self.fmt == "parquet" else self.path
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if self.fmt == "csv":
            _replace_with(target, lambda f: _CsvWriter(f, header=True, owns=False).write_all(self._kept))
            writer: Writer = _CsvWriter(open(target, "a", newline="", encoding="utf-8"), header=False)
        else:
            _replace_with(target, lambda f: _JsonlWriter(f, owns=False).write_all(self._kept))
            writer = _JsonlWriter(open(target, "a", encoding="utf-8"))
        if self.fmt == "parquet":
            writer = _ParquetFinisher(writer, self.journal, self.path)
        return writer


class Writer:
    def write(self, rec: dict) -> None:
        raise NotImplementedError

    def write_all(self, recs: Iterable[dict]) -> None:
        for rec in recs:
            self.write(rec)

    def close(self, complete: bool = True) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(complete=exc_type is None)


class _JsonlWriter(Writer):
    def __init__(self, stream: TextIO, owns: bool = True):
        self.stream, self.owns = stream, owns

    def write(self, rec):
        # one write per record, then flush: a killed run leaves whole lines plus at most one torn one
        self.stream.write(json.dumps({k: rec.get(k) for k in FIELDS}, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self, complete=True):
        if self.owns:
            self.stream.close()


class _CsvWriter(Writer):
    def __init__(self, stream: TextIO, header: bool, owns: bool = True):
        self.stream, self.owns = stream, owns
        self.csv = csv.writer(stream, lineterminator="\n")
        if header:
            self.csv.writerow(FIELDS)

    def write(self, rec):
        self.csv.writerow(["" if rec.get(k) is None else rec[k] for k in FIELDS])
        self.stream.flush()

    def close(self, complete=True):
        if self.owns:
            self.stream.close()


class _ParquetFinisher(Writer):
    """Writes to the JSONL journal; on a complete close turns the journal into the Parquet file."""

    def __init__(self, journal_writer: Writer, journal: str, path: str):
        self.inner, self.journal, self.path = journal_writer, journal, path

    def write(self, rec):
        self.inner.write(rec)

    def close(self, complete=True):
        self.inner.close()
        if not complete:
            return  # the journal stays for --resume
        import pyarrow as pa
        import pyarrow.parquet as pq

        recs = read_jsonl(self.journal)
        table = pa.table({k: pa.array([r.get(k) for r in recs], type=pa.string()) for k in FIELDS})
        tmp = self.path + ".tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        os.remove(self.journal)


# --- reading -----------------------------------------------------------------------------------
def read_jsonl(path: str) -> List[dict]:
    """Records of a JSONL output; an unparsable last line without its newline (torn write) is dropped."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn_ok = not data.endswith(b"\n")  # only the very last line may be torn
    recs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if torn_ok and n == len(lines):
                break
            raise OutputError(f"{path}:{n} is not a JSON record; not a gitfast output?") from None
        recs.append(_checked(rec, path, n))
    return recs


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


def _checked(rec, path, n) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("source"), str):
        raise OutputError(f"{path}:{n} has no 'source'; not a gitfast output?")
    return rec


def _first_success(recs: Iterable[dict]) -> List[dict]:
    kept: Dict[str, dict] = {}
    for rec in recs:
        if is_done(rec) and rec["source"] not in kept:
            kept[rec["source"]] = rec
    return list(kept.values())


def _replace_with(path: str, fill) -> None:
    """Writes a file through `fill(stream)` under a temporary name, then renames it over `path`."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
