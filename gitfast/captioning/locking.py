"""One run per output: an exclusive `flock` held for the whole run, on a lock file beside the output.

`--out FILE` locks `.FILE.gitfast-lock` in FILE's folder, `--out-dir DIR` locks `DIR/.gitfast-lock`;
a second run on the same output fails at once with `OutputLocked` (a usage error, exit 2) before it
reads or writes anything; so does an output whose lock file cannot be made (a read-only folder, one
under /proc), with an `OutputError` naming it. Folders made for the lock are removed again on release
while still empty, so a run that ends with a usage error leaves nothing behind. The lock dies with
its process, so a killed run never blocks the next one.
gitfast deletes the lock file on release only if a gitfast run created it (it starts with a marker
line; a killed run's file is cleaned up by the next); a run that finds the path's file replaced under
it (a finishing run deleted it) locks the new one instead.
"""
from __future__ import annotations

import fcntl
import os
from typing import List, Optional, Sequence

from .formats import OutputError
from .resumable import check_writable_folder


_MARK = b"gitfast caption lock\n"  # what tells a lock file gitfast made from someone else's


class OutputLocked(OutputError):
    """Another run holds the output's lock."""


class OutputLock:
    def __init__(self, target: str, lock_path: str, made_folders: Sequence[str] = ()):
        self.target, self.path = target, lock_path
        self.made_folders = list(made_folders)  # created for this lock, deepest first
        self._fd: Optional[int] = None
        self._created = False

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue  # released and deleted between the two opens
                except OSError as exc:
                    self._unable(exc)
            except OSError as exc:
                self._unable(exc)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLocked(f"another gitfast run is writing {self.target} (it holds {self.path}); "
                                   "wait for it to finish, or write to another output") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if created:
                    os.write(fd, _MARK)
                # one a killed run left is gitfast's too, and is cleaned up like ours
                self._fd, self._created = fd, created or os.pread(fd, len(_MARK), 0) == _MARK
                return self
            os.close(fd)  # we locked a file a finishing run had just deleted: try the one at the path now

    def _unable(self, error: OSError):
        self.remove_made_folders()
        raise OutputError(f"cannot write {self.target}: its lock file {self.path} cannot be made "
                          f"({error.strerror or error})") from None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created:
            try:
                os.remove(self.path)  # while still locked, so no other run holds this file
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None
        self.remove_made_folders()

    def remove_made_folders(self) -> None:
        """Removes the folders made for this lock that are still empty (a run that wrote nothing)."""
        _remove_empty(self.made_folders)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_for(out: Optional[str] = None, out_dir: Optional[str] = None) -> Optional[OutputLock]:
    """The lock of an output file or folder (missing folders are made for it: OutputError when they
    cannot be); None for stdout and for streams (character devices, FIFOs), which are not resumable."""
    if out_dir is not None:
        folder, lock_name, target = out_dir, ".gitfast-lock", out_dir
    elif out is None or out == "-" or not is_regular_target(out):
        return None
    else:
        folder, name = os.path.split(os.path.realpath(out))
        lock_name, target = f".{name}.gitfast-lock", out
    return OutputLock(target, os.path.join(folder, lock_name), made_folders=_make_folders(folder))


def _make_folders(folder: str) -> List[str]:
    """Makes `folder` and its missing parents; returns those made, deepest first."""
    check_writable_folder(os.path.abspath(folder))  # a file in the way, or no permission: said plainly
    missing, probe = [], os.path.abspath(folder)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise OutputError(f"cannot make the output folder {folder!r}: {exc.strerror or exc}") from None
    return missing


def _remove_empty(folders: Sequence[str]) -> None:
    """Removes `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue  # never made: makedirs stopped above it
        except OSError:  # it holds something (the output, another run's lock): it stays, and its parents
            return


def is_regular_target(path: str) -> bool:
    """True unless `path` (followed through links) exists and is not a regular file or folder."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing (or under a file: the output's own checks say so)
        return True
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)
