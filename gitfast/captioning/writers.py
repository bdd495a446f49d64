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

Durability: every record is flushed as it is written, so a killed process (SIGKILL included) loses
at most a torn last line; files are fsynced every `SYNC_EVERY` records or `SYNC_SECONDS`, and on
close, against a machine that goes down.

Per-shard outputs (`ShardedOutput`, `--out-dir`): one file per input shard, named after it
(`00000.tar` -> `00000.parquet`), plus `captions.<ext>` for inputs that are not from a shard. Each
is built in a journal like a Parquet output (JSONL too), and turned into its final name — via a
temporary file and a rename — as soon as its shard's last record is written, in the shard's own
order. Records carry `key` (the sample key) and the sample's JSON fields and `txt` member, flattened
to top-level columns; a field whose name clashes is prefixed with `json_`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, TextIO

FIELDS = ("source", "caption", "error")
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


def record(source: str, caption: Optional[str], error: Optional[str]) -> dict:
    return {"source": source, "caption": caption, "error": error}


def is_done(rec: dict) -> bool:
    return rec.get("error") in (None, "") and rec.get("caption") is not None


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
            _check_writable_folder(os.path.dirname(os.path.abspath(path)))
        existing = [p for p in (path, self.journal) if p and os.path.isfile(p) and os.path.getsize(p) > 0]
        if existing and not (resume or overwrite):
            raise OutputError(f"{existing[0]!r} exists; pass --resume to continue it or --overwrite to replace it")
        if resume:
            self._kept = _first_success(self._read_existing())
        self.done = {r["source"] for r in self._kept}

    def _read_existing(self) -> List[dict]:
        recs: List[dict] = []
        if self.journal is not None:
            if os.path.isfile(self.path):
                recs += read_parquet(self.path) if self.fmt == "parquet" else read_jsonl(self.path)
            if os.path.isfile(self.journal):
                recs += read_jsonl(self.journal)
        elif os.path.isfile(self.path):
            recs = read_jsonl(self.path) if self.fmt == "jsonl" else read_csv(self.path)
        return recs

    @property
    def has_journal(self) -> bool:
        return self.journal is not None and os.path.isfile(self.journal)

    def open(self, todo: Optional[Sequence] = None) -> "Writer":
        """Rewrites what is kept (resume) and returns the writer for new records. `todo` is unused
        here (ShardedOutput takes it)."""
        if self.path is None:
            return _CsvWriter(sys.stdout, header=True, owns=False) if self.fmt == "csv" else _JsonlWriter(sys.stdout, owns=False)
        target = self.journal or self.path
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if self.fmt == "csv":
            _replace_with(target, lambda f: _CsvWriter(f, header=True, owns=False).write_all(self._kept))
            writer: Writer = _CsvWriter(open(target, "a", newline="", encoding="utf-8"), header=False)
        else:
            _replace_with(target, lambda f: _JsonlWriter(f, owns=False).write_all(self._kept))
            writer = _JsonlWriter(open(target, "a", encoding="utf-8"))
        if self.journal is not None:
            writer = _JournalFinisher(writer, self.journal, self.path, self.fmt, self.order)
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


class _StreamWriter(Writer):
    """One write and a flush per record (a kill leaves whole lines plus at most one torn one); an
    fsync every SYNC_EVERY records or SYNC_SECONDS, and on close."""

    def __init__(self, stream: TextIO, owns: bool = True):
        self.stream, self.owns = stream, owns
        self._unsynced, self._synced_at = 0, time.monotonic()

    def _written(self):
        self.stream.flush()
        if self.owns:
            self._unsynced += 1
            if self._unsynced >= SYNC_EVERY or time.monotonic() - self._synced_at > SYNC_SECONDS:
                self._sync()

    def _sync(self):
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


class _JsonlWriter(_StreamWriter):
    def write(self, rec):
        line = {k: rec.get(k) for k in FIELDS}
        line.update(rec)  # extra fields (per-shard outputs) after the three
        self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._written()


class _CsvWriter(_StreamWriter):
    def __init__(self, stream: TextIO, header: bool, owns: bool = True):
        super().__init__(stream, owns)
        self.csv = csv.writer(stream, lineterminator="\n")
        if header:
            self.csv.writerow(FIELDS)

    def write(self, rec):
        self.csv.writerow(["" if rec.get(k) is None else rec[k] for k in FIELDS])
        self._written()


class _JournalFinisher(Writer):
    """Writes to the JSONL journal; on a complete close turns the journal into the final file
    (Parquet or JSONL) under a temporary name, renames it into place and deletes the journal."""

    def __init__(self, journal_writer: Writer, journal: str, path: str, fmt: str, order=None):
        self.inner, self.journal, self.path, self.fmt, self.order = journal_writer, journal, path, fmt, order

    def write(self, rec):
        self.inner.write(rec)

    def close(self, complete=True):
        self.inner.close()
        if not complete:
            return  # the journal stays for --resume
        finish_journal(self.journal, self.path, self.fmt, self.order)


def finish_journal(journal: str, path: str, fmt: str, order: Optional[Dict[str, int]] = None) -> None:
    recs = read_jsonl(journal)
    if order is not None:  # stable: records of sources outside `order` keep their place at the end
        last = len(order)
        recs.sort(key=lambda r: order.get(r["source"], last))
    tmp = path + ".tmp"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(_arrow_table(recs), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    else:
        _replace_with(path, lambda f: _JsonlWriter(f, owns=False).write_all(recs))
    if fmt == "parquet":
        os.replace(tmp, path)
    # a kill between the rename and this leaves both; the next --resume reads both, keeping each source once
    os.remove(journal)


def _arrow_table(recs: List[dict]):
    import pyarrow as pa

    names = list(FIELDS)
    for rec in recs:
        names += [k for k in rec if k not in names]
    cols = {}
    for name in names:
        values = [r.get(name) for r in recs]
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


# --- per-shard outputs -------------------------------------------------------------------------
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

    def __init__(self, folder: str, fmt: str, sources: Sequence, *, resume: bool = False, overwrite: bool = False):
        if fmt not in SHARDED_FORMATS:
            raise OutputError(f"--out-dir writes {' or '.join(SHARDED_FORMATS)}, not {fmt}")
        if resume and overwrite:
            raise OutputError("--resume and --overwrite contradict each other")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputError(f"--out-dir {folder!r} exists and is not a folder")
        _check_writable_folder(os.path.abspath(folder))
        self.folder, self.fmt = folder, fmt
        self.sources = {s.id: s for s in sources}
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

    def open(self, todo: Sequence) -> "Writer":
        return _ShardedWriter(self, todo)


class _ShardedWriter(Writer):
    def __init__(self, out: ShardedOutput, todo: Sequence):
        self.out = out
        self.pending: Dict[Optional[str], int] = {}
        for s in todo:
            self.pending[s.group] = self.pending.get(s.group, 0) + 1
        self.writers: Dict[Optional[str], Writer] = {}
        # a journal left by a killed run whose shard has nothing left to do: finish it now
        for group, output in out.outputs.items():
            if not self.pending.get(group) and output.has_journal:
                output.open().close(complete=True)

    def write(self, rec):
        source = self.out.sources[rec["source"]]
        group = source.group
        writer = self.writers.get(group)
        if writer is None:
            writer = self.writers[group] = self.out.outputs[group].open()
        fields = source.meta() if source.meta is not None else {}
        writer.write(carried_fields({"key": source.key, "source": rec["source"], "caption": rec.get("caption"),
                                     "error": rec.get("error")}, fields))
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


def _check_writable_folder(folder: str) -> None:
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
