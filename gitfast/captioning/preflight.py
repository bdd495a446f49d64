"""Checks a run on several devices makes once, in the parent, before any rank starts: a model that is
not found or not a checkpoint, or a prompt too long for it, is then one error in a second, not one
per rank after each has started."""
from __future__ import annotations

from typing import Optional

from ..checkpoint import loading
from ..defaults import EMBEDDED_MODEL
from .captioner import check_prompt_length
from .workers import Preparer


def model_for_ranks(model, prompt: Optional[str], max_new_tokens: int) -> Optional[str]:
    """Refuses what every rank's Captioner would (CheckpointError, ValueError); returns the model as
    the ranks are to be given it: the resolved folder, or None for the embedded model."""
    folder = loading.resolve(EMBEDDED_MODEL if model is None else model)
    config = loading.read_config(folder)
    if prompt:
        processor = loading.load_processor(folder)
        # the Captioner's own count ([CLS] + the prompt's tokens); which id starts it does not matter here
        preparer = Preparer(processor, processor.tokenizer.cls_token_id, config.max_position_embeddings)
        check_prompt_length(len(preparer.prompt_ids(prompt)), max_new_tokens, config)
    return None if model is None else str(folder)
