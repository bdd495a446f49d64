"""gitfast.backend_choice: backends chosen by a measurement, never by availability alone.

Fake candidates with known costs stand in for real backends: a pathologically slow one that gives
the right answers (as oneDNN's reference INT8 path on an AMD Zen 5 did, 90 s per GEMM) must lose
after one call, a wrong one must never be chosen, and a forced one must still be checked.
"""
import time

import pytest

from gitfast import backend_choice as BC


def fake(seconds_per_call, calls, name, shapes=2, unfit=None):
    def prepare():
        calls.append((name, "check"))
        if unfit:
            raise BC.Unfit(unfit)

        def run():
            calls.append((name, "run"))
            time.sleep(seconds_per_call)
        return [run] * shapes
    return prepare


@pytest.fixture
def kind(monkeypatch):
    monkeypatch.delenv("GITFAST_TEST_BACKEND", raising=False)
    BC.forget("test")
    yield "test"
    BC.forget("test")


def test_a_slow_backend_that_works_loses_after_one_call(kind):
    calls = []
    d = BC.choose(kind, {"slow": fake(0.4, calls, "slow"), "fast": fake(0.001, calls, "fast")}, "GITFAST_TEST_BACKEND")
    assert d.chosen == "fast" and d.how == "measured" and d.seconds["slow"] == float("inf"), d
    assert calls.count(("slow", "run")) == 1, calls  # one first call on the cheapest shape, then dropped
    assert calls.count(("fast", "run")) == 2 * (1 + BC.REPEATS)
    assert "fast" in d.summary() and "slow" in d.summary()


def test_the_preferred_backend_stays_within_the_margin(kind):
    calls = []
    d = BC.choose(kind, {"preferred": fake(0.011, calls, "a"), "rival": fake(0.010, calls, "b")}, "GITFAST_TEST_BACKEND")
    assert d.chosen == "preferred", d
    BC.forget(kind)
    d = BC.choose(kind, {"preferred": fake(0.03, calls, "a"), "rival": fake(0.010, calls, "b")}, "GITFAST_TEST_BACKEND")
    assert d.chosen == "rival", d


def test_unfit_backends_are_never_chosen_and_the_decision_is_kept(kind):
    calls = []
    cands = {"wrong": fake(0.0, calls, "wrong", unfit="wrong results"), "ok": fake(0.0, calls, "ok")}
    d = BC.choose(kind, cands, "GITFAST_TEST_BACKEND")
    assert d.chosen == "ok" and d.unfit == {"wrong": "wrong results"} and d.how == "only one fit"
    assert ("ok", "run") not in calls  # nothing to compare it with: not timed
    calls.clear()
    assert BC.choose(kind, cands, "GITFAST_TEST_BACKEND") is d and not calls  # decided once per process
    assert BC.decisions()[kind] is d


def test_nothing_fit_is_an_error(kind):
    with pytest.raises(RuntimeError, match="no test backend is fit"):
        BC.choose(kind, {"a": fake(0, [], "a", unfit="no")}, "GITFAST_TEST_BACKEND")


def test_forced_backends_are_checked(kind, monkeypatch):
    calls = []
    cands = {"wrong": fake(0.0, calls, "wrong", unfit="wrong results"), "slow": fake(0.3, calls, "slow"),
             "fast": fake(0.0, calls, "fast")}
    monkeypatch.setenv("GITFAST_TEST_BACKEND", "slow")
    d = BC.choose(kind, cands, "GITFAST_TEST_BACKEND")
    assert d.chosen == "slow" and "forced" in d.how and calls == [("slow", "check")]
    BC.forget(kind)
    monkeypatch.setenv("GITFAST_TEST_BACKEND", "wrong")
    with pytest.raises(ValueError, match="cannot serve here: wrong results"):
        BC.choose(kind, cands, "GITFAST_TEST_BACKEND")
    monkeypatch.setenv("GITFAST_TEST_BACKEND", "nope")
    with pytest.raises(ValueError, match="not one of wrong, slow, fast"):
        BC.choose(kind, cands, "GITFAST_TEST_BACKEND")


def test_timing_operands_are_built_only_when_candidates_are_timed(kind, monkeypatch):
    """A candidate may return a maker of its calls (fp32's middle band: 94 MB of operands): a forced
    candidate and the only one fit never call it; timed candidates do, once."""
    built = []

    def lazy(name, unfit=None):
        def prepare():
            if unfit:
                raise BC.Unfit(unfit)
            return lambda: built.append(name) or [lambda: None] * 2
        return prepare

    monkeypatch.setenv("GITFAST_TEST_BACKEND", "a")
    assert BC.choose(kind, {"a": lazy("a"), "b": lazy("b")}, "GITFAST_TEST_BACKEND").chosen == "a" and not built
    BC.forget(kind)
    monkeypatch.delenv("GITFAST_TEST_BACKEND")
    d = BC.choose(kind, {"a": lazy("a"), "b": lazy("b", unfit="no")}, "GITFAST_TEST_BACKEND")
    assert d.how == "only one fit" and not built
    BC.forget(kind)
    d = BC.choose(kind, {"a": lazy("a"), "b": lazy("b")}, "GITFAST_TEST_BACKEND")
    assert d.how == "measured" and set(d.seconds) == {"a", "b"} and sorted(built) == ["a", "b"]
