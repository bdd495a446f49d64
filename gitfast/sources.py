"""Turning what the user names (files, folders, globs) into an ordered stream of `Source` records.

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
- a source reached twice (a file inside a folder also named) is produced once, at its first place.
A path that exists is taken literally even if its name contains glob characters.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".avif", ".heic", ".heif",
})


class SourceError(ValueError):
    """A named input that does not exist or matches nothing: a usage error, found before any work."""


@dataclass(frozen=True)
class Source:
    id: str
    open_bytes: Callable[[], bytes]

    def __repr__(self):
        return f"Source({self.id!r})"


def file_source(path: Union[str, os.PathLike]) -> Source:
    return Source(os.path.normpath(os.fspath(path)), Path(path).read_bytes)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def expand(paths: Sequence[Union[str, os.PathLike]]) -> Iterator[Source]:
    """Checks every path now (raising SourceError), then returns a lazy stream of Sources in order."""
    plan = []
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            plan.append(("dir", path))
        elif os.path.exists(path):
            plan.append(("file", path))
        elif _is_glob(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise SourceError(f"{path!r} matches nothing")
            plan.append(("glob", matches))
        else:
            raise SourceError(f"no such file or folder: {path!r}")
    return _stream(plan)


def _stream(plan) -> Iterator[Source]:
    seen = set()
    for kind, what in plan:
        if kind == "file":
            candidates = [what]
        elif kind == "dir":
            candidates = walk(what)
        else:
            candidates = _glob_matches(what)
        for path in candidates:
            source = file_source(path)
            if source.id not in seen:
                seen.add(source.id)
                yield source


def walk(folder: str) -> Iterator[str]:
    """Image files under `folder`, recursively: each folder's files (sorted), then its subfolders."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_image_name(name):
                yield os.path.join(root, name)


def _glob_matches(matches):
    for path in matches:
        if os.path.isdir(path):
            yield from walk(path)
        elif is_image_name(path):
            yield path


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")
