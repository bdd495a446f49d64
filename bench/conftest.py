"""pytest-benchmark over the same cases as `gitfast bench`: ``pytest bench/ --benchmark-only``.

Quick shapes by default; ``--bench-full`` (or ``GITFAST_BENCH_FULL=1``) for the full ones.
``--bench-device`` / ``GITFAST_BENCH_DEVICE`` and ``--bench-dtype`` / ``GITFAST_BENCH_DTYPE``
(comma-separated) choose where and in what. Plain ``pytest`` never collects this folder
(``testpaths = tests``).

Cases are enumerated at collection time but only one case's inputs are alive at a time: the test
re-walks the suite's generator to its case (a live generator is kept, so a run in order walks each
suite once).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("gitfast-bench", "gitfast benchmark cases")
    group.addoption("--bench-full", action="store_true", default=None,
                    help="full shapes instead of the quick ones (env GITFAST_BENCH_FULL=1)")
    group.addoption("--bench-device", choices=["cuda", "cpu"], default=None,
                    help="device (env GITFAST_BENCH_DEVICE; default cuda if available)")
    group.addoption("--bench-dtype", default=None,
                    help="comma-separated dtypes (env GITFAST_BENCH_DTYPE; default float16 on cuda, float32 on cpu)")


@dataclass(frozen=True)
class CaseRef:
    suite: str
    dtype: str
    index: int
    skip_reason: Optional[str] = None
    error: Optional[str] = None


def _settings(config) -> tuple[bool, str, list[str]]:
    full = config.getoption("--bench-full") or os.environ.get("GITFAST_BENCH_FULL", "0") == "1"
    device = config.getoption("--bench-device") or os.environ.get("GITFAST_BENCH_DEVICE") \
        or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = config.getoption("--bench-dtype") or os.environ.get("GITFAST_BENCH_DTYPE") \
        or ("float16" if device == "cuda" else "float32")
    return not full, device, [d.strip() for d in dtypes.split(",") if d.strip()]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from gitfast.bench import runner

    quick, device, dtypes = _settings(metafunc.config)
    refs, ids = [], []
    for suite in runner.load_suites():
        for dtype in dtypes:
            for i, item in enumerate(runner.iter_cases(suite, quick, device, dtype)):
                if isinstance(item, dict):           # import or cases() failure: one failing test
                    refs.append(CaseRef(suite.name, dtype, i, error=item["reason"]))
                    ids.append(f"{suite.name}-{dtype}-error")
                    break
                refs.append(CaseRef(suite.name, dtype, i, skip_reason=item.skip_reason if item.fn is None else None))
                ids.append(f"{item.benchmark}-{item.label or runner.shape_label(item.shape)}-{item.provider}-{dtype}")
    metafunc.parametrize("bench_case_ref", refs, ids=ids)


class _CaseStream:
    """Walks one suite's cases, keeping only the current one alive."""

    def __init__(self, suite, quick: bool, device: str, dtype: str):
        from gitfast.bench import runner

        self._open = lambda: runner.iter_cases(suite, quick, device, dtype)
        self._it, self._pos, self._case = self._open(), -1, None

    def get(self, index: int):
        if index < self._pos:
            self._it, self._pos = self._open(), -1
        while self._pos < index:
            self._case = None
            self._case = next(self._it)
            self._pos += 1
        return self._case


_stream: dict = {}


@pytest.fixture(scope="session")
def bench_settings(request):
    quick, device, _ = _settings(request.config)
    return {"quick": quick, "device": device}


@pytest.fixture
def bench_case(bench_case_ref: CaseRef, bench_settings):
    """The ``Case`` a test id names (skips or fails the test when the suite says so)."""
    from gitfast.bench import runner

    ref = bench_case_ref
    if ref.error is not None:
        pytest.fail(ref.error, pytrace=False)
    if ref.skip_reason is not None:
        pytest.skip(ref.skip_reason)
    key = (ref.suite, ref.dtype)
    if _stream.get("key") != key:                    # a new suite: drop the previous one's inputs
        _stream.clear()
        suite = next(s for s in runner.load_suites() if s.name == ref.suite)
        _stream.update(key=key, stream=_CaseStream(suite, bench_settings["quick"], bench_settings["device"], ref.dtype))
    case = _stream["stream"].get(ref.index)
    if isinstance(case, dict):
        pytest.fail(case["reason"], pytrace=False)
    if case.fn is None:
        pytest.skip(case.skip_reason or "skipped by the suite")
    return case
