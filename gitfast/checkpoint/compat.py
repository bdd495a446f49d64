"""The transformers versions gitfast works with, checked where gitfast first leans on transformers.

transformers 5.0 to 5.17 shift GIT's text position ids once more on every decode step that reads a
KV cache (`position_ids + past_key_values_length` in `GitModel.forward`; 5.18 removed it), so their
own `GitForCausalLM.generate` returns wrong tokens after the first one. gitfast's promise is "the same
tokens as transformers", its tests compare with that generate, and the drop-in is handed to code that
calls transformers' generation machinery: below 5.18 a user gets a clear error, never wrong tokens.

The floor is higher still, 5.24, the oldest release the test suite passes with (checked release by
release): the drop-in reads `PreTrainedModel.is_activation_checkpointing` (new in 5.23; 5.18-5.22
raise AttributeError in every forward), and its sampling follows 5.24's multi-return processors
(5.23 draws other tokens with num_return_sequences > 1 and min_p/top_k). pyproject.toml says the same.
"""
from __future__ import annotations

from typing import Optional

MIN_TRANSFORMERS = "5.24"
WRONG_TOKENS_BEFORE = "5.18"  # releases before it generate wrong GIT tokens with a KV cache


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
    if Version(version) < Version(WRONG_TOKENS_BEFORE):
        why = ("5.0-5.17 shift GIT's position ids on every cached decode step, so their GIT generate "
               "returns wrong tokens and gitfast's tests compare against it; older releases are untested")
    else:
        why = ("gitfast's drop-in uses transformers 5.24's API (is_activation_checkpointing) and follows its "
               "sampling processors; the test suite passes from 5.24 on")
    return (f"gitfast needs transformers>={MIN_TRANSFORMERS}, found {version} ({why}). Upgrade: "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'")


def check_transformers(version: Optional[str] = None) -> None:
    """Raises ImportError naming the fix when the installed transformers is too old for gitfast."""
    problem = transformers_problem(version)
    if problem is not None:
        raise ImportError(problem)
