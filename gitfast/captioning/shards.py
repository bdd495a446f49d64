"""Tar shards (webdataset / img2dataset layout) read in place, as a stream of `Source`s.

Layout: members named `KEY.EXT`, where KEY is the member's path up to the first dot of its file name
and EXT the rest (`shard/00001.jpg`, `shard/00001.json`, `shard/00001.txt` are sample
`shard/00001`). A sample's image is its `jpg`/`jpeg`/`png`/`webp` member (other image extensions
are accepted too; with several, the first in that order); `json` and `txt` members are carried into
per-shard outputs. A sample without an image becomes an error record. A hard-link member (tar's
way of storing a duplicate file) reads the data it links to; an image that is a symbolic link is an
error record (links are never followed out of the shard), and so is one that is a directory, a FIFO
or a device.

Source ids are `"<shard path>::<key>"`. A shard is indexed once, headers only, with `tarfile`; an
image is read by seeking to its recorded offset, so member names are never used as filesystem paths
and nothing is extracted (`../x.jpg` is just a key). Readers are `functools.partial`s of module
functions, so Sources stay picklable for worker processes.

Damage never stops the run: the samples before it are kept and the damage itself is one error record
with id `"<shard path>::@<byte offset>"` — a truncated shard (also one cut right after a member:
the end-of-archive marker is missing), an unreadable header, a file that is not a tar at all. Compressed tars (.tar.gz, ...) cannot be read in place and are reported the same way.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tarfile
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

from .records import IMAGE_EXTENSIONS, Source, SourceReadError, check_size, failing_source

log = logging.getLogger(__name__)

# compressed tars are taken too, so that their one record can say to decompress them (`index`)
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")
# preferred first when a sample has several images; any other image extension comes after these
_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp")
_IMAGE_FIELDS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS) | frozenset(_IMAGE_ORDER)
_NO_DATA = {tarfile.DIRTYPE: "directory", tarfile.FIFOTYPE: "FIFO", tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device"}
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSIONS)


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data, not the header
    size: int
    problem: Optional[str] = None  # why it cannot be read (a link, a folder, a FIFO, ...); None for data
    folder: bool = False  # a directory entry: a sample only if its name ends in an image extension


@dataclass(frozen=True)
class Damage:
    offset: int
    reason: str


def index(path: str) -> Tuple[List[Member], Optional[Damage]]:
    """Every member before any damage (a hard link as the data it links to; a symbolic link, a
    directory, a FIFO or a device as a Member with its `problem`), and the damage (None for a sound
    shard).

    OSError (the shard cannot be opened at all) propagates."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
        raise OSError(errno.EINVAL, "not a regular file")
    total = os.path.getsize(path)
    with open(path, "rb") as f:
        damage = _compressed(f)
        if damage is not None:
            return [], damage
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as exc:
            return [], Damage(0, f"not a readable tar file: {exc}")
        members, damage = _headers(tar, total)
        if damage is None:
            damage = _damage_after_last(f, tar.offset, total)
    return members, damage


def _compressed(f) -> Optional[Damage]:
    """A compressed tar cannot be read in place: its damage record says to decompress it."""
    head = f.read(6)
    f.seek(0)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            return Damage(0, f"{kind}-compressed tar: shards are read in place, so they must be "
                             f"uncompressed (decompress it first)")
    return None


def _headers(tar: tarfile.TarFile, total: int) -> Tuple[List[Member], Optional[Damage]]:
    """The members of every header tarfile reads, up to the first damaged header or cut-off member."""
    members: List[Member] = []
    data: Dict[str, Member] = {}  # regular members by name, for hard links
    while True:
        where = tar.offset
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError, OSError) as exc:
            return members, Damage(where, f"unreadable tar member header: {exc}")
        if info is None:
            tar.members = []  # the index above is all we keep
            return members, None
        if info.isreg() and info.offset_data + info.size > total:
            return members, Damage(info.offset, f"shard truncated inside member {info.name!r} "
                                                f"({total - info.offset_data} of {info.size} bytes present)")
        members.append(_member(info, data))
        if info.isreg():
            data[info.name] = members[-1]


def _member(info: tarfile.TarInfo, data: Dict[str, Member]) -> Member:
    """One header as a Member; `data` holds the regular members before it, by name."""
    if info.isreg():
        return Member(info.name, info.offset_data, info.size)
    if info.islnk():  # tar stores a file's second copy as a hard link to the first
        target = data.get(info.linkname)
        return (Member(info.name, target.offset, target.size) if target is not None else
                Member(info.name, 0, 0, f"hard link to {info.linkname!r}, which is not earlier in the shard"))
    if info.issym():
        return Member(info.name, 0, 0, f"symbolic link to {info.linkname!r}; links are not "
                                       "followed out of a shard")
    # a directory, FIFO or device holds no data, but a sample named by it gets its record
    return Member(info.name, 0, 0, f"{_NO_DATA.get(info.type, 'special file')}, which holds no data",
                  folder=info.isdir())


def _damage_after_last(f, end: int, total: int) -> Optional[Damage]:
    """tarfile reads an invalid or cut-off header after the first one as the end of the archive;
    only zero blocks (the end marker and padding) may follow the last member in a sound shard."""
    if end >= total:  # no end-of-archive blocks: the shard was cut off, maybe right after a member
        return Damage(end, "shard ends without tar's end-of-archive marker: it was cut off here, "
                           "and members after this point, if any, are missing")
    f.seek(end)
    while True:
        block = f.read(1 << 16)
        if not block:
            return None
        if block.strip(b"\0"):
            return Damage(end, "unreadable tar member header (corrupt or cut off); "
                               f"{total - end} bytes after it were not read")


def read_member(path: str, offset: int, size: int) -> bytes:
    check_size(size)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise SourceReadError(f"shard {path} changed since it was indexed: member at byte {offset} is cut off")
    return data


def read_fields(path: str, json_member: Optional[Tuple[int, int]], txt_member: Optional[Tuple[int, int]]) -> dict:
    """A sample's carried fields: its JSON object's top-level keys, and `txt` (its text member)."""
    fields: dict = {}
    try:
        if json_member is not None:
            value = json.loads(read_member(path, *json_member))
            if isinstance(value, dict):
                fields.update(value)
            else:
                fields["json"] = value
        if txt_member is not None:
            fields["txt"] = read_member(path, *txt_member).decode("utf-8", errors="replace")
    except (OSError, ValueError) as exc:  # metadata is carried, not needed: the caption still stands
        log.warning("%s: cannot read a sample's json/txt member: %s", path, exc)
    return fields


def split_name(name: str) -> Tuple[str, str]:
    """`a/b/00001.seg.png` -> ("a/b/00001", "seg.png"): the webdataset key and field."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_sources(path: str) -> Iterator[Source]:
    """The samples of one shard, in the order their keys first appear, then its damage if any."""
    shard = os.path.normpath(path)
    try:
        members, damage = index(path)
    except OSError as exc:
        yield failing_source(f"{shard}::@0", f"cannot read shard: {exc.strerror or exc}", group=shard)
        return
    samples: Dict[str, Dict[str, Member]] = {}
    for m in members:
        key, field = split_name(m.name)
        if not field or os.path.basename(key).startswith(".") or not key:
            continue  # no field (a bare name) or a hidden file such as macOS "._00001.jpg"
        if m.folder and field not in _IMAGE_FIELDS:
            continue  # a folder of the shard's layout (`part.2024/`), not a sample's member
        samples.setdefault(key, {})[field] = m  # a later member of the same name wins, as in tar
    for key, fields in samples.items():
        sid = f"{shard}::{key}"
        meta = partial(read_fields, path, _span(fields.get("json")), _span(fields.get("txt")))
        image = _pick_image(fields)
        if image is not None and image.problem is not None:
            yield failing_source(sid, f"image member {image.name!r} is a {image.problem}", group=shard, key=key,
                                 meta=meta)
        elif image is None:
            have = ", ".join(sorted(fields)) or "nothing"
            yield failing_source(sid, f"sample has no image member (it has: {have})", group=shard, key=key, meta=meta)
        else:
            yield Source(sid, partial(read_member, path, image.offset, image.size), group=shard, key=key, meta=meta)
    if damage is not None:
        yield failing_source(f"{shard}::@{damage.offset}", f"tar damaged at byte {damage.offset}: {damage.reason}; "
                                                          f"the {len(samples)} samples before it were read",
                             group=shard)


def _span(member: Optional[Member]) -> Optional[Tuple[int, int]]:
    return None if member is None or member.problem is not None else (member.offset, member.size)


def _pick_image(fields: Dict[str, Member]) -> Optional[Member]:
    for ext in _IMAGE_ORDER:
        if ext in fields:
            return fields[ext]
    for ext, m in fields.items():
        if ext in _IMAGE_FIELDS:
            return m
    return None
