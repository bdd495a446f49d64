"""What flows through the captioning wing: `Source`s (one input each) in, `Record`s (one result each) out.

A Source is an id plus a way to read its bytes; shards and tables make Sources too, so every input
kind reaches the model and the writers in the same shape. A Record keeps its Source, so a per-shard
output can name the sample's key and carry its fields without looking the input up again.

On disk a record is `{"source": str, "caption": str | None, "error": str | None}`; a source is done
when its record has a caption and no error.

Every output is valid UTF-8. A name that is not (a file named with a raw byte such as 0xFF, which
Python holds as the lone surrogate U+DCFF) is written with that byte as the four characters `\\xff`;
any other lone surrogate (from a sidecar's JSON, say) as `\\uDXXX` (six characters). Source ids are escaped when the
Source is made, so a resumed run matches what it wrote; the bytes are still read from the real name.

Source ids must also tell every two inputs apart (each input has exactly one record), so in an id a
backslash that an escape could be read into — one before `x`, `u`, another backslash or an
undecodable byte — is doubled: the byte 0xFF gives `\\xff`, a name spelling those four characters
`\\\\xff` (`source_id`; the escaping can be undone). Any other id is what versions before this rule
wrote, so their outputs resume as before. An output an older version wrote for a name that is now
doubled holds it undoubled: on resume that name is captioned again under its new id (the old record
stays, matched to no input unless the byte it spells also names a file; where both names were
captioned by an older version, one record stood for the two: rewrite such an output with --overwrite).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".avif", ".heic", ".heif",
})
FIELDS = ("source", "caption", "error")
DEFAULT_MAX_INPUT_BYTES = 256 << 20


class SourceError(ValueError):
    """A named input that does not exist or matches nothing: a usage error, found before any work."""


class SourceReadError(OSError):
    """A Source that cannot be read (a damaged shard, a sample without an image): its error record says why."""


@dataclass(frozen=True)
class Source:
    id: str
    open_bytes: Callable[[], bytes]
    group: Optional[str] = None      # the shard it came from; None for a plain file
    key: Optional[str] = None        # its sample key inside that shard
    meta: Optional[Callable[[], dict]] = None  # the sample's carried fields (its .json, .txt), read when written

    def __post_init__(self):
        object.__setattr__(self, "id", source_id(self.id))

    def __repr__(self):
        return f"Source({self.id!r})"


def file_source(path: Union[str, os.PathLike]) -> Source:
    return Source(os.path.normpath(os.fspath(path)), partial(read_file, os.fspath(path)))


def max_input_bytes() -> int:
    """The most bytes one input (a file or a tar member) may hold: GITFAST_MAX_INPUT_BYTES, default
    256 MiB. Larger inputs are error records, so a stray huge file cannot take the machine's memory."""
    return int(os.environ.get("GITFAST_MAX_INPUT_BYTES", DEFAULT_MAX_INPUT_BYTES))


def check_size(size: int) -> None:
    limit = max_input_bytes()
    if size > limit:
        raise SourceReadError(f"{size} bytes is over the input size limit of {limit} bytes "
                              "(GITFAST_MAX_INPUT_BYTES)")


def read_file(path: Union[str, os.PathLike]) -> bytes:
    """A regular file's bytes. Anything else (a FIFO, a device such as /dev/zero, a socket) is a
    SourceReadError, found without blocking; so is a file over `max_input_bytes()`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceReadError(f"not a regular file ({_kind(info.st_mode)}): only files and tar members are read")
        check_size(info.st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_input_bytes() + 1)
        check_size(len(data))  # it grew since
        return data
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a file"


def _raise(message: str) -> bytes:
    raise SourceReadError(message)


def failing_source(source_id: str, message: str, **fields) -> Source:
    """A Source whose reading fails with `message`: an input known bad before decoding, kept in its place."""
    return Source(source_id, partial(_raise, message), **fields)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Record:
    """One input's outcome on its way to an output."""
    source: Source
    caption: Optional[str]
    error: Optional[str]

    def row(self) -> dict:
        return record(self.source.id, self.caption, self.error)


def valid_text(text: str) -> str:
    """`text` if it encodes as UTF-8, else with each lone surrogate escaped (see the module docstring)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape holds it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def source_id(name: str) -> str:
    """`name` as valid UTF-8 that no other name shares: `valid_text`'s escapes, and a backslash
    doubled where it would otherwise read as the start of one (see the module docstring)."""
    if "\\" not in name:
        return valid_text(name)
    out = []
    for ch, after in zip(name, name[1:] + " "):
        if ch == "\\" and (after in "\\xu" or 0xD800 <= ord(after) <= 0xDFFF):
            out.append("\\\\")
        else:
            out.append(valid_text(ch))
    return "".join(out)


def valid_row(row: dict) -> dict:
    """A row whose names and text values are all valid UTF-8 (`valid_text`)."""
    return {valid_text(str(k)): valid_text(v) if isinstance(v, str) else v for k, v in row.items()}


def record(source: str, caption: Optional[str], error: Optional[str]) -> dict:
    return {"source": source, "caption": caption, "error": error}


def is_done(rec: dict) -> bool:
    return rec.get("error") in (None, "") and rec.get("caption") is not None
