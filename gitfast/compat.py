"""The transformers versions gitfast works with, checked where gitfast first leans on transformers.

transformers 5.0 to 5.17 shift GIT's text position ids once more on every decode step that reads a
KV cache (`position_ids + past_key_values_length` in `GitModel.forward`; 5.18 removed it), so their
own `GitForCausalLM.generate` returns wrong tokens after the first one. gitfast's promise is "the same
tokens as transformers", its tests compare with that generate, and the drop-in is handed to code that
calls transformers' generation machinery: below 5.18 a user gets a clear error, never wrong tokens.
"""
from __future__ import annotations

from typing import Optional

MIN_TRANSFORMERS = "5.18"


def transformers_problem(version: Optional[str] = None) -> Optional[str]:
    """Why `version` (default: the installed transformers) cannot serve gitfast; None when it can,
    or when none is installed (whatever imports it then fails by itself)."""
    from packaging.version import Version

    if version is None:
        try:
            import transformers
        except ImportError:
            return None
        version = transformers.__version__
    if Version(version) >= Version(MIN_TRANSFORMERS):  # a 5.18 pre-release may predate the fix: refused
        return None
    return (f"gitfast needs transformers>={MIN_TRANSFORMERS}, found {version} (5.0-5.17 shift GIT's "
            "position ids on every cached decode step, so their GIT generate returns wrong tokens and "
            "gitfast's tests compare against it; older releases are untested). Upgrade: "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'")


def check_transformers(version: Optional[str] = None) -> None:
    """Raises ImportError naming the fix when the installed transformers is too old for gitfast."""
    problem = transformers_problem(version)
    if problem is not None:
        raise ImportError(problem)
