"""torch.compile baselines that really ran compiled.

Inductor and FlexAttention baselines compile once per shape, dtype and mask; a whole suite makes
dozens of graphs of one function, past Dynamo's default recompile limit (8), after which Dynamo
silently runs the function eagerly: a compiled label would then time eager code. The runner raises
the limits for the run and watches Dynamo's log for a limit hit during each case.
"""
from __future__ import annotations

import logging
from typing import Optional

RECOMPILE_LIMIT = 256  # every shape, dtype and mask of a suite compiles once; Dynamo's default is 8


class DynamoLimitWatch(logging.Handler):
    """Dynamo's warnings that it hit a recompile/cache-size limit: past it, the function runs eagerly."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to report
            return
        if "hit config." in message:
            self.hits.append(message.splitlines()[0])


def watch_dynamo() -> Optional[DynamoLimitWatch]:
    """Raises Dynamo's recompile limits for the run and starts watching for limit hits."""
    try:
        import torch._dynamo.config as dynamo_config
    except Exception:  # no Dynamo in this torch: nothing compiles, nothing to watch
        return None
    for name, value in (("recompile_limit", RECOMPILE_LIMIT), ("cache_size_limit", RECOMPILE_LIMIT),
                        ("accumulated_recompile_limit", 4 * RECOMPILE_LIMIT),
                        ("accumulated_cache_size_limit", 4 * RECOMPILE_LIMIT)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
    watch = DynamoLimitWatch()
    logging.getLogger("torch._dynamo").addHandler(watch)
    return watch


def mark_fallback(row: dict, hits: list[str]) -> dict:
    """A row whose compiled provider ran eagerly for part of its calls says so in its provider."""
    if hits and row["status"] == "ok":
        row["provider"] = f"{row['provider']} (eager fallback)"
        row["reason"] = ((row.get("reason") or "") + f" Dynamo hit a limit, so calls ran eagerly: {hits[0]}").strip()
    return row
