"""Opting transformers' Auto classes into gitfast.

transformers builds `GitForCausalLM` for a GIT checkpoint through `AutoModelForCausalLM` and
`AutoModelForImageTextToText` (the class `pipeline("image-text-to-text", model=<name or path>)`
loads). After `register_auto_classes()`, both build gitfast's class instead, so code that only names a
checkpoint gets the drop-in without changing a line. It is an opt-in, for the whole process: importing
gitfast never changes what transformers returns.
"""
from __future__ import annotations

from .causal_lm import GitForCausalLM


def register_auto_classes() -> None:
    """Makes `AutoModelForCausalLM` and `AutoModelForImageTextToText` build `gitfast.GitForCausalLM` for
    GIT configs in this process (transformers' `register(..., exist_ok=True)`; calling it twice is harmless)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GitConfig

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        auto.register(GitConfig, GitForCausalLM, exist_ok=True)
