"""When a sequence stops: its EOS ids, its new-token limit, and whether its last token finished it.

One place for the stopping rules the engine (`scheduler.py`), the settings (`generation.py`) and the
Captioner's results share. transformers' exact loops (`generation.sample_or_greedy`, `beam_search`)
apply the same rules to whole batches of tensors, as transformers writes them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence


def eos_ids(*candidates) -> List[int]:
    """The EOS ids of the first candidate that is set (an id or a list of ids); none when none is.
    `eos_ids(generation_config.eos_token_id)` is `Settings.eos`."""
    for eos in candidates:
        if eos is not None:
            return list(eos) if hasattr(eos, "__iter__") else [eos]
    return []


def new_token_limit(requested: Optional[int], max_length: int, prompt_len: int, positions: int) -> int:
    """How many tokens a sequence may generate: `requested`, else what `max_length` (prompt included)
    leaves, at least one; never past the text position table (the last token is chosen and never fed,
    so a `prompt_len`-token prompt leaves `positions + 1 - prompt_len`)."""
    limit = requested or max(1, max_length - prompt_len)
    return max(1, min(limit, positions + 1 - prompt_len))


def finish_reason(tokens: Sequence[int], eos, limit: int) -> Optional[str]:
    """"eos" when the last of `tokens` is an EOS id, "length" when `limit` tokens are out, else None."""
    if tokens and tokens[-1] in eos:
        return "eos"
    return "length" if len(tokens) >= limit else None


def until_eos(ids: Sequence[int], eos) -> List[int]:
    """`ids` up to (without) the first EOS id."""
    return list(ids[:next((i for i, t in enumerate(ids) if t in eos), len(ids))])
