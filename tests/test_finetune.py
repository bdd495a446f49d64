"""Fine-tuning the drop-in follows transformers' class step for step (fp32, AdamW, same seed), with
gradient checkpointing on: gitfast's fused ops fall back to plain torch under autograd, and the
checkpointed vision and decoder layers are recomputed in backward."""
import pytest
import torch
import transformers

import gitfast
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
    assert ours.model.gradient_checkpointing and ours.model.vision.gradient_checkpointing
    calls = []
    func = ours.model._gradient_checkpointing_func
    spy = lambda *a, **k: calls.append(1) or func(*a, **k)  # noqa: E731
    monkeypatch.setattr(ours.model, "_gradient_checkpointing_func", spy)
    monkeypatch.setattr(ours.model.vision, "_gradient_checkpointing_func", spy)
    ids = torch.tensor([[101, 5, 6, 7, 8, 102], [101, 9, 10, 11, 102, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=pixels(name, 2), labels=labels)
    a, b = train(theirs, 5, batch), train(ours, 5, batch)
    assert calls, "gradient checkpointing never ran"
    assert a[-1] < a[0]  # it learns
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4), (a, b)
