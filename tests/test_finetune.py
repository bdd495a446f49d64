"""Fine-tuning the drop-in follows transformers' class step for step (fp32, AdamW, same seed), with
gradient checkpointing on: gitfast's fused ops fall back to plain torch under autograd, and the
checkpointed vision and decoder layers are recomputed in backward."""
import pytest
import torch
import transformers

import gitfast
from transformers.modeling_layers import GradientCheckpointingLayer
from git_factory import make_config, pixels


def train(model, steps, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["hd32", "video"])
def test_loss_trajectory_matches_transformers_with_gradient_checkpointing(name, monkeypatch):
    cfg = make_config(name)
    # transformers applies dropout in training, gitfast has none: compare without it
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    theirs = transformers.GitForCausalLM(cfg)
    torch.manual_seed(0)
    ours = gitfast.GitForCausalLM(cfg)
    assert ours.supports_gradient_checkpointing
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [*ours.model.vision.layers, *ours.model.layers]
    assert all(layer.gradient_checkpointing for layer in layers)
    calls = []
    func = layers[0]._gradient_checkpointing_func
    spy = lambda *a, **k: calls.append(1) or func(*a, **k)  # noqa: E731
    for layer in layers:
        monkeypatch.setattr(layer, "_gradient_checkpointing_func", spy)
    ids = torch.tensor([[101, 5, 6, 7, 8, 102], [101, 9, 10, 11, 102, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels(name, 2), labels=labels)
    a, b = train(theirs, 5, batch), train(ours, 5, batch)
    assert len(calls) == 5 * len(layers), "every layer is recomputed in every step's backward"
    assert a[-1] < a[0]  # it learns
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4), (a, b)


def test_layers_checkpoint_through_transformers_layer_class():
    """Every vision and decoder layer is a transformers `GradientCheckpointingLayer` (what trainers, PEFT
    and FSDP2 look for); enabling and disabling flips each layer's flag; outputs do not change."""
    cfg = make_config("hd32")
    torch.manual_seed(0)
    model = gitfast.GitForCausalLM(cfg)
    layers = [*model.model.vision.layers, *model.model.layers]
    assert layers and all(isinstance(layer, GradientCheckpointingLayer) for layer in layers)
    px, ids = pixels("hd32", 2), torch.tensor([[101, 5, 6], [101, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=px).logits
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(layer.gradient_checkpointing for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=px).logits, before)
    # a loaded model gets the same layers
    loaded = gitfast.GitForCausalLM.from_transformers(transformers.GitForCausalLM(cfg))
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in loaded.model.layers)
