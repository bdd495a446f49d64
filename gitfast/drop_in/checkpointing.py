"""Gradient checkpointing for the drop-in, through transformers' own layer class.

transformers checkpoints a model layer by layer: each layer is a `GradientCheckpointingLayer`, whose
`forward` recomputes itself in backward once `gradient_checkpointing_enable()` has set the layer's
`gradient_checkpointing` flag. Trainers, PEFT and FSDP2 wrapping look for that class. gitfast's core
layers are plain `nn.Module`s (the core imports no transformers modelling code: it would cost the
Captioner seconds of start-up), so the drop-in gives its model's layers the checkpointing class of
the same layer here, as FSDP2 does for the layers it shards: same parameters, same forward, one more
base class. Inference pays one flag test per layer call.
"""
from __future__ import annotations

from transformers.modeling_layers import GradientCheckpointingLayer

from ..model import DecoderLayer, GitModel, VisionLayer


class CheckpointedVisionLayer(VisionLayer, GradientCheckpointingLayer):
    """gitfast's `VisionLayer`, checkpointed by transformers' mechanism when enabled."""


class CheckpointedDecoderLayer(DecoderLayer, GradientCheckpointingLayer):
    """gitfast's `DecoderLayer`, checkpointed by transformers' mechanism when enabled."""


_CHECKPOINTED = {VisionLayer: CheckpointedVisionLayer, DecoderLayer: CheckpointedDecoderLayer}


def make_checkpointable(model: GitModel) -> GitModel:
    """Turns every vision and decoder layer of `model` into its checkpointing class, in place."""
    for layer in (*model.vision.layers, *model.layers):
        layer.__class__ = _CHECKPOINTED.get(type(layer), type(layer))
    return model
