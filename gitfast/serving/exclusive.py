"""`Exclusive`: one holder at a time, for objects several threads share (an engine, a model's generate).

A plain lock, plus two things a lock lacks: the thread holding it that asks again is refused with a
clear error instead of waiting for itself forever (an unfinished `Engine.run` generator, then a second
run in the same thread), and a copied or pickled owner gets a fresh, unheld one (`copy.deepcopy` of
a model must not fail on, or share, its lock).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class Exclusive:
    def __init__(self, what: str):
        self.what = what  # names the holder in the error, e.g. "this engine's run()"
        self._lock = threading.Lock()
        self._owner: Optional[int] = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:  # only this thread writes its own id, so reading it unlocked is safe
            raise RuntimeError(f"{self.what} is already in progress in this thread (an unfinished generator?); "
                               "finish or close it before starting another")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def __reduce__(self):
        return Exclusive, (self.what,)
