"""Run-time backends chosen by measurement: the fastest of those that give the right answer here.

Working is not enough: on an AMD EPYC (Zen 5) oneDNN's INT8 GEMM gave the right integers through a
reference path, 90.7 s for one vision-sized GEMM where `torch._int_mm` took 10.6 ms, and gitfast used
it because it came first among those that worked. So `choose` prepares each candidate, which checks
itself on a small case (a wrong answer rules it out, with the reason kept), then times the ones that
pass on representative shapes, cheapest shape first: a candidate whose first call on a shape is far
slower than the best one's drops out there, so a pathological path costs one call, once. The rest
are timed in turn (median of a few rounds per shape, each round running every candidate) and the fastest is kept, except that candidates come in
order of preference and an earlier one within PREFERENCE_MARGIN of the fastest is kept instead: on a
drifting machine two near-equal backends would otherwise swap between runs, and with them the last
bits of results that near-ties can turn into other tokens.

Each decision is made once per process (the first time the backend is needed) and kept with its times
(`decisions()`, shown by `gitfast info`). An environment variable per kind forces a candidate by
name (a user who knows better, a test); a forced candidate must still pass its check.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

# A first call on a shape this much slower than the best candidate's (and slower than
# FIRST_CALL_FLOOR_S, which leaves room for one-off set-up such as oneDNN building its kernel) drops
# a candidate before it is timed.
GIVE_UP_FACTOR = 8.0
FIRST_CALL_FLOOR_S = 0.05
REPEATS = 3
PREFERENCE_MARGIN = 1.15


class Unfit(Exception):
    """A candidate that cannot serve here: it does not run, or its check gave a wrong answer."""


@dataclass(frozen=True)
class Decision:
    kind: str
    chosen: str
    how: str                                   # "measured", "forced by ENV=name" or "only one fit"
    seconds: Dict[str, float] = field(default_factory=dict)   # per candidate timed (median per round)
    unfit: Dict[str, str] = field(default_factory=dict)       # per candidate ruled out: why

    def summary(self) -> str:
        timed = ", ".join(f"{name} {s * 1e3:.3g} ms" if s != float("inf") else f"{name} dropped after one call"
                          for name, s in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        unfit = ", ".join(f"{name}: {why}" for name, why in self.unfit.items())
        return f"{self.chosen} ({self.how}{'; ' + timed if timed else ''}{'; unfit: ' + unfit if unfit else ''})"


# A candidate: prepares itself and checks its answer on a small case (raising Unfit), then returns
# one call per representative shape, cheapest first (each runs the backend once on that shape), or a
# function that makes those calls: their operands are then built only when there is something to time
# (not for a forced candidate, nor for the only one fit).
Calls = Sequence[Callable[[], object]]
Candidate = Callable[[], Union[Calls, Callable[[], Calls]]]

_decisions: Dict[str, Decision] = {}
_lock = threading.Lock()


def _seconds(run: Callable[[], object], repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(kind: str, candidates: Mapping[str, Candidate], env_var: str,
           first_call_floor: float = FIRST_CALL_FLOOR_S) -> Decision:
    """The decision for `kind`, made on first call: `env_var` names a forced candidate, else the
    fastest that is fit (`candidates` in order of preference: see PREFERENCE_MARGIN). A kind whose
    candidates have no one-off set-up may lower `first_call_floor`. Raises ValueError for an unknown
    or unfit forced name, RuntimeError when no candidate is fit."""
    made = _decisions.get(kind)  # the per-call path: no lock once decided (a dict read is atomic)
    if made is not None:
        return made
    with _lock:
        if kind not in _decisions:
            _decisions[kind] = _decide(kind, candidates, env_var, first_call_floor)
            log.info("gitfast: %s backend: %s", kind, _decisions[kind].summary())
        return _decisions[kind]


def _decide(kind: str, candidates: Mapping[str, Candidate], env_var: str, floor: float) -> Decision:
    forced = os.environ.get(env_var)
    if forced:
        if forced not in candidates:
            raise ValueError(f"{env_var}={forced!r} is not one of {', '.join(candidates)}")
        try:
            candidates[forced]()
        except Unfit as exc:
            raise ValueError(f"{env_var}={forced!r} cannot serve here: {exc}") from exc
        return Decision(kind, forced, f"forced by {env_var}={forced}")
    runs, unfit = {}, {}
    for name, prepare in candidates.items():
        try:
            runs[name] = prepare()
        except Unfit as exc:
            unfit[name] = str(exc)
    if not runs:
        raise RuntimeError(f"no {kind} backend is fit here: {unfit}")
    if len(runs) == 1:  # nothing to compare it with: not timed
        return Decision(kind, next(iter(runs)), "only one fit", {}, unfit)
    runs = {name: calls() if callable(calls) else calls for name, calls in runs.items()}
    seconds = {name: float("inf") for name in runs}
    alive = dict(runs)
    for shape in range(len(next(iter(runs.values())))):  # first calls, shape by shape: laggards drop out
        first = {name: _seconds(calls[shape]) for name, calls in alive.items()}
        best = min(first.values())
        alive = {name: alive[name] for name, t in first.items() if t <= max(best * GIVE_UP_FACTOR, floor)}
    # timed in turn (each round runs every candidate once per shape), so that a machine that slows
    # down for a while slows every candidate alike rather than the one timed then
    rounds = {name: [[] for _ in calls] for name, calls in alive.items()}
    for _ in range(REPEATS):
        for name, calls in alive.items():
            for shape, run in enumerate(calls):
                rounds[name][shape].append(_seconds(run))
    for name, per_shape in rounds.items():
        seconds[name] = sum(statistics.median(times) for times in per_shape)
    fastest = min(seconds.values())
    chosen = next(name for name, t in seconds.items() if t <= fastest * PREFERENCE_MARGIN)
    return Decision(kind, chosen, "measured", seconds, unfit)


def decided(kind: str) -> Optional[Decision]:
    """`kind`'s decision if it has been made in this process, else None (never measures)."""
    return _decisions.get(kind)


def decisions() -> Dict[str, Decision]:
    """The decisions made so far in this process, by kind."""
    with _lock:
        return dict(_decisions)


def forget(kind: str) -> None:
    """Drop `kind`'s decision so the next `choose` decides again (tests; a changed environment)."""
    with _lock:
        _decisions.pop(kind, None)
