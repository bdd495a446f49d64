"""The drop-in's `forward`: transformers' GIT forward, computed by gitfast's model.

One decoder pass over `[image | text]` through gitfast's layers. Attention goes through the fused
kernels (`attention.prefill`) unless the caller continues from a cache or asks for attention
probabilities; then plain torch (`attention.probabilities`) computes them. The keys and values
of every layer are handed back as transformers' `DynamicCache` when `use_cache` (transformers' default,
from `config.use_cache`).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import attention, ops
from ..devices import placement

# keywords transformers' forward takes through **kwargs that gitfast honours; anything else is refused
LOSS_KWARGS = ("num_items_in_batch", "ignore_index")


def image_tokens(lm, pixel_values, text_batch: int, interpolate_pos_encoding=False) -> torch.Tensor:
    """Projected image tokens `[text_batch, I, hidden]` (I = 0 without pixel_values); images are tiled
    over the text rows, as transformers repeats them."""
    dev, dt = placement(lm.model)
    if pixel_values is None:
        return torch.empty(text_batch, 0, lm.config.hidden_size, dtype=dt, device=dev)
    tokens = lm.model.encode_images(pixel_values.to(device=dev, dtype=dt), interpolate_pos_encoding)
    if tokens.shape[0] != text_batch:
        if text_batch % tokens.shape[0]:
            raise ValueError(f"{text_batch} text rows cannot share {tokens.shape[0]} images; the text batch "
                             "must be a multiple of the image batch")
        tokens = tokens.repeat(text_batch // tokens.shape[0], 1, 1)
    return tokens


def run(lm, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, inputs_embeds=None,
        labels=None, cache=None, use_cache=None, interpolate_pos_encoding=False, logits_to_keep=0,
        output_attentions=None, output_hidden_states=None, return_dict=None, shift_labels=None, **loss_kwargs):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    m, cfg = lm.model, lm.config
    dev, _ = placement(m)
    output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
    use_cache = cfg.use_cache if use_cache is None else use_cache
    if labels is not None or (lm.is_activation_checkpointing and lm.training):
        use_cache = False  # as transformers: training keeps no cache (checkpointing recomputes layers)
    if use_cache and cache is None:
        cache = DynamicCache(config=cfg)
    past = cache.get_seq_length() if cache is not None else 0

    text = _text_tokens(m, input_ids, inputs_embeds, position_ids, past, dev)
    b, t = text.shape[:2]
    image = image_tokens(lm, pixel_values, b, interpolate_pos_encoding)
    n_img = image.shape[1]
    h = torch.cat([image, text], dim=1)
    keys = past + h.shape[1]
    mask = None if attention_mask is None else _key_mask(attention_mask.to(dev), b, keys)
    plain = past > 0 or output_attentions
    if plain:
        allowed = attention.git_mask(n_img if past == 0 else keys - t, h.shape[1], keys, None, dev)
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
    probs = []

    def attend(layer, q, k, v):
        if cache is not None:
            k, v = (x.transpose(1, 2) for x in cache.update(k.transpose(1, 2), v.transpose(1, 2), layer))
        if not plain:
            return attention.prefill(q, k, v, n_img, None if mask is None else mask[:, -t:])
        out, p = attention.probabilities(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed)
        if output_attentions:
            probs.append(p)
        return out.transpose(1, 2)

    states = [h] if output_hidden_states else None
    for layer in m.layers:
        h = layer(h, attend)
        if states is not None:
            states.append(h)
    logits = m.lm_head(_kept(h, logits_to_keep))
    loss = None if labels is None else _loss(lm, logits, labels, shift_labels, n_img, dev, loss_kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None,
                                 hidden_states=tuple(states) if states is not None else None,
                                 attentions=tuple(probs) if output_attentions else None)
    return out if return_dict is not False else out.to_tuple()


def _text_tokens(m, input_ids, inputs_embeds, position_ids, past: int, dev) -> torch.Tensor:
    """Word (or given) embeddings + position embeddings, layer-normed: [B, T, hidden]."""
    words = m.word_embeddings(input_ids.to(dev)) if input_ids is not None else inputs_embeds.to(dev)
    b, t = words.shape[:2]
    if position_ids is None:  # as transformers: counted from the cache's length (image tokens included)
        position_ids = torch.arange(past, past + t, device=dev).expand(b, t)
    return ops.add_layer_norm(words, m.position_embeddings(position_ids.to(dev)), m.embed_ln.weight,
                              m.embed_ln.bias, m.embed_ln.eps)[0]


def _key_mask(attention_mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """[B, text keys] -> [B, keys]: the image keys (in the cache or not) are never masked."""
    return torch.cat([attention_mask.new_ones(batch, keys - attention_mask.shape[1]), attention_mask], dim=1)


def _kept(h: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions whose logits are returned: the last `logits_to_keep` (0: all), or those indexed."""
    if isinstance(logits_to_keep, int):
        return h[:, -logits_to_keep:] if logits_to_keep > 0 else h
    return h[:, logits_to_keep]


def _loss(lm, logits: torch.Tensor, labels, shift_labels, n_img: int, dev, loss_kwargs: dict) -> torch.Tensor:
    if shift_labels is None:  # next-token prediction on the text positions
        shifted, shift_labels = logits[:, n_img:-1], labels[:, 1:]
    else:  # already aligned with the text logits (sequence-/context-parallel training)
        shifted = logits[:, n_img:]
    return lm.loss_function(logits=shifted.contiguous(), labels=None, vocab_size=lm.config.vocab_size,
                            shift_labels=shift_labels.to(dev).contiguous(), **loss_kwargs)
