"""One output file that a run can resume, and that is only ever replaced whole.

Resuming (`Output(..., resume=True)`): the existing output is read — a torn last line from a killed
run is tolerated and dropped — and rewritten (to a temporary file, then renamed over the original)
keeping only the first successful record of each source. Failed sources are therefore retried and
no source ever appears twice. New records are appended after the kept ones, so a resumed file is in
input order within each run, not across runs.

Parquet cannot be appended to, nor read back without its footer, so a Parquet output is built in a
JSONL journal next to it (`<out>.partial.jsonl`), flushed per record like the JSONL writer. When the
run ends normally the journal is converted into a temporary file, renamed to `<out>`, and the
journal deleted. Temporary files get unique names (`.<out>.XXXXXXXX.tmp`, created exclusively) and
are removed when writing them fails (those a killed run left, when the output is next opened), so
gitfast never replaces or deletes a file it did not make. Until then a previous `<out>` stays untouched; `--resume` reads the previous `<out>`
and any journal a killed run left, and the final file holds both (the "append" is a rewrite).
"""
from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

from .formats import (FORMATS, CsvWriter, JsonlWriter, OutputError, Writer, arrow_table, read_csv, read_jsonl,
                      read_parquet)
from .records import Record, is_done

JOURNAL_SUFFIX = ".partial.jsonl"  # the journal beside an output: `<out>.partial.jsonl`


class Output:
    """An output destination, checked on construction (nothing is modified until `open()`).

    `path=None` (or "-") means stdout (JSONL, or CSV when asked); a character device or FIFO is
    streamed to likewise (no journal, no temporary file, no resume). A symbolic link is followed.
    `done` holds the sources a resumed output already has.
    """

    def __init__(self, path: Optional[str], fmt: str, *, resume: bool = False, overwrite: bool = False,
                 atomic: bool = False, order: Optional[Dict[str, int]] = None):
        """atomic: build a JSONL output in a journal too, renamed into place when complete (Parquet
        always is). order: source -> position; a journaled output is sorted by it when finished."""
        if fmt not in FORMATS:
            raise OutputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        if resume and overwrite:
            raise OutputError("--resume and --overwrite contradict each other")
        if path == "-":
            path = None
        if path is None and (resume or fmt == "parquet"):
            raise OutputError(f"{'--resume' if resume else 'parquet output'} needs --out FILE")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OutputError("parquet output needs pyarrow: pip install 'gitfast[parquet]'") from None
        self.stream = stream_kind(path) if path is not None else None
        if self.stream is not None:
            if resume or fmt == "parquet":
                raise OutputError(f"--out {path} is a {self.stream}: it can only be streamed to, as JSONL or CSV, "
                                  "and cannot be resumed")
        elif path is not None:
            path = os.path.realpath(path)  # a link is followed: its target is written, the link kept
        self.path, self.fmt, self.resume, self.overwrite, self.order = path, fmt, resume, overwrite, order
        journaled = self.stream is None and (fmt == "parquet" or (atomic and fmt == "jsonl"))
        self.journal = f"{path}{JOURNAL_SUFFIX}" if journaled else None
        self._kept: List[dict] = []
        if path is not None and os.path.isdir(path):
            raise OutputError(f"--out {path!r} is a folder")
        if path is not None:
            check_writable_folder(os.path.dirname(os.path.abspath(path)))
        existing = [p for p in (path, self.journal)
                    if self.stream is None and p and os.path.isfile(p) and os.path.getsize(p) > 0]
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
        if self.stream is not None:
            stream = open(self.path, "w", newline="", encoding="utf-8")
            return CsvWriter(stream, header=True, sync=False) if self.fmt == "csv" else JsonlWriter(stream, sync=False)
        target = self.journal or self.path
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        remove_stale_temps(self.path)
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
    if fmt == "parquet":
        import pyarrow.parquet as pq

        replace_with(path, lambda f: pq.write_table(arrow_table(rows), f), binary=True)
    else:
        replace_with(path, lambda f: JsonlWriter(f, owns=False).write_all(rows))
    # a kill between the rename and this leaves both; the next --resume reads both, keeping each source once
    os.remove(journal)


def first_success(rows: Iterable[dict]) -> List[dict]:
    kept: Dict[str, dict] = {}
    for row in rows:
        if is_done(row) and row["source"] not in kept:
            kept[row["source"]] = row
    return list(kept.values())


def replace_with(path: str, fill, binary: bool = False) -> None:
    """Writes a file through `fill(stream)` under a temporary name of its own, then renames it over
    `path`. The temporary file is created exclusively (never someone else's) in `path`'s folder, and
    removed again if anything fails. `binary`: `fill` gets a binary stream."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _mode_for(path))
        with (open(fd, "wb") if binary else open(fd, "w", newline="", encoding="utf-8")) as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def remove_stale_temps(path: str) -> None:
    """Removes the temporary files of `path` and of its journal that a killed run left: only names
    `replace_with` makes (`.<name>.` + mkstemp's 8 characters + `.tmp`). Called under the output's lock."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}(?:{re.escape(JOURNAL_SUFFIX)})?\.[a-z0-9_]{{8}}\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        if pattern.fullmatch(entry):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def _mode_for(path: str) -> int:
    """The replaced file's permissions, or what a plain open() would give a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def stream_kind(path: str) -> Optional[str]:
    """"character device", "FIFO" or "socket" for an existing such `path` (links followed), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return None


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
