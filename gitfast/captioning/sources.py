"""Turning what the user names (files, folders, globs, tar shards, file lists, tables of paths) into an
ordered stream of `Source` records.

A `Source` is an id (what output records call `source`) and a callable returning the encoded bytes.
Captioner only ever sees Sources, so other kinds of input — tar shards, Parquet/CSV file lists —
are new generators of Sources, not changes to the captioning code. Sources are picklable (the
callable is a bound method or a partial) so that worker processes can read and decode them.

Rules for `expand(paths)`:
- a file named explicitly is always taken, whatever its extension (a non-image becomes an error
  record later, not a silent skip);
- a folder is walked recursively in sorted order, taking only files with an image extension and
  skipping hidden entries (names starting with "."), e.g. macOS "._photo.jpg" resource forks;
- a glob (`*`, `?`, `[...]`, `**` recursive) takes its matches in sorted order: files with an image
  extension, and folders walked as above; a glob matching nothing is an error;
- a source reached twice (a file inside a folder also named) is produced once, at its first place;
  a file whose path equals a shard sample's id (`s.tar::k`) is a SourceError (ids are unambiguous);
- a folder reached through a symbolic link is walked once (link loops end);
- a URL (`http://...`, `s3://...`) is not fetched: named directly it is a SourceError, in a list or
  table an error record keeping the text as its `source`.
A path that exists is taken literally even if its name contains glob characters.

Other kinds of input:
- a `.tar` file (named, matched by a glob, or found in a folder) is a webdataset/img2dataset shard:
  one Source per sample, id `"<shard path>::<key>"` (see `shards.py`); so is a compressed one
  (`.tar.gz`, `.tgz`, ...), whose one record says to decompress it first;
- a `.parquet`/`.pq`/`.csv` file named explicitly is a table of paths, read from its `path_column`
  (default `path`); relative paths are relative to the table's folder; a missing column is a
  SourceError, an empty cell an error record `"<table>::row N"`, and so is a cell that is neither
  text nor bytes (a list, a number); a bytes cell is a path's raw bytes;
- `files_from` names a list file (`-` = stdin), one path per line, relative to the current folder;
  blank lines are skipped.
Paths from tables and lists are not checked up front: a missing one is an error record in its place.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Callable, Iterator, Optional, Sequence, Union

from .records import Source, SourceError, failing_source, file_source, is_image_name
from .shards import is_shard_name, shard_sources

TABLE_EXTENSIONS = (".parquet", ".pq", ".csv")


def expand(paths: Sequence[Union[str, os.PathLike]], *, files_from: Optional[str] = None,
           path_column: str = "path") -> Iterator[Source]:
    """Checks every path now (raising SourceError), then returns a lazy stream of Sources in order:
    `paths` first, then the entries of `files_from`."""
    plan = []
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            plan.append(("dir", path))
        elif os.path.exists(path) and path.lower().endswith(TABLE_EXTENSIONS):
            plan.append(("table", (path, _table_reader(path, path_column))))
        elif os.path.exists(path):
            plan.append(("file", path))
        elif _is_glob(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise SourceError(f"{path!r} matches nothing")
            plan.append(("glob", matches))
        elif is_url(path):
            raise SourceError(f"{path!r}: {URL_MESSAGE}")
        else:
            raise SourceError(f"no such file or folder: {path!r}")
    if files_from is not None:
        plan.append(("list", _read_list(files_from)))
    return _stream(plan)


def _stream(plan) -> Iterator[Source]:
    seen: dict = {}  # id -> the shard it came from (None for a file)
    for kind, what in plan:
        if kind == "file":
            candidates = [what]
        elif kind == "dir":
            candidates = walk(what)
        elif kind == "glob":
            candidates = _glob_matches(what)
        elif kind == "list":
            candidates = what
        else:
            candidates = what[1]()
        for item in candidates:
            if isinstance(item, Source):
                stream = [item]
            elif is_url(item):
                stream = [failing_source(item, URL_MESSAGE)]
            elif is_shard_name(item) and not os.path.isdir(item):
                stream = shard_sources(item)
            else:
                stream = [file_source(item)]
            for source in stream:
                if source.id not in seen:
                    seen[source.id] = source.group
                    yield source
                elif seen[source.id] != source.group:  # `s.tar::k`: a file so named, and sample k of s.tar
                    raise SourceError(f"{source.id!r} names both a file and a sample of the shard "
                                      f"{seen[source.id] or source.group!r}; rename the file")


URL_MESSAGE = "URLs are not fetched; download first (e.g. with img2dataset) and caption the files"


def is_url(path) -> bool:
    return isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _read_list(files_from: str) -> list:
    import sys

    try:
        if files_from == "-":
            text = sys.stdin.read()
        else:
            with open(files_from, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read --files-from {files_from!r}: {exc}") from None
    return [line for line in text.splitlines() if line.strip()]


def _table_reader(path: str, column: str) -> Callable[[], Iterator]:
    """Checks the table's column now; returns a function streaming its paths (or error Sources)."""
    folder = os.path.dirname(path)
    table = os.path.normpath(path)
    if path.lower().endswith(".csv"):
        import csv

        try:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise SourceError(f"cannot read table {path!r}: {exc}") from None
        if column not in header:
            raise SourceError(f"table {path!r} has no column {column!r} (it has {header}); pick one with --path-column")

        def cells():
            with open(path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    yield row.get(column)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SourceError(f"reading {path!r} needs pyarrow: pip install 'gitfast[parquet]'") from None
        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # pyarrow's own error family for unreadable files
            raise SourceError(f"cannot read table {path!r} as Parquet: {exc}") from None
        if column not in names:
            raise SourceError(f"table {path!r} has no column {column!r} (it has {names}); pick one with --path-column")

        def cells():
            for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=4096):
                yield from batch.column(0).to_pylist()

    def entries():
        for n, cell in enumerate(cells(), 1):
            if isinstance(cell, bytes):  # a binary column: the path's raw bytes, as a file name holds them
                cell = os.fsdecode(cell)
            if cell is not None and not isinstance(cell, str):
                yield failing_source(f"{table}::row {n}", f"row {n} of {table} has no path in {column!r}: it "
                                                         f"holds a value of type {type(cell).__name__}")
            elif cell is None or not cell.strip():
                yield failing_source(f"{table}::row {n}", f"row {n} of {table} has an empty {column!r}")
            elif is_url(cell):
                yield failing_source(cell, URL_MESSAGE)  # the cell as it is, not joined to the folder
            else:
                yield os.path.join(folder, cell)  # an absolute cell stays absolute
    return entries


def walk(folder: str) -> Iterator[str]:
    """Image files and tar shards under `folder`, recursively: each folder's files (sorted), then its
    subfolders. Symbolically linked folders are followed, each real folder walked once."""
    seen = set()  # real paths walked: a linked folder is followed once, a link loop ends
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _is_input_name(name):
                yield os.path.join(root, name)


def _is_input_name(name: str) -> bool:
    return is_image_name(name) or is_shard_name(name)


def _glob_matches(matches):
    for path in matches:
        if os.path.isdir(path):
            yield from walk(path)
        elif _is_input_name(path):
            yield path


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")
