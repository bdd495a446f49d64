"""The drop-in's `generate`: which mode of the one engine serves a call, or why transformers' loop does.

Every call gitfast serves becomes one `Request` per row (`engine_calls.requests_of`) handed to the
model's kept engine (`GitForCausalLM._engine_for`, one call at a time), in one of its two modes:
- continuous: plain greedy (no per-step outputs, no processor beyond gitfast's own);
- lockstep: sampling (transformers' RNG stream), beam search, per-step `scores`/`logits`, and any
  logits processor: transformers' own loops (`generation.py`) over the engine's paged cache; the
  processors are gitfast's fast set (`logits.py`) when nothing else is asked, else the
  `LogitsProcessorList` transformers builds from the generation config (`_get_logits_processor`),
  applied to gitfast's logits.

plain: transformers' `GenerationMixin.generate` driving gitfast's `forward` over a `DynamicCache`. It
serves what no engine mode can, because the engine's runner computes next-token logits from token ids
over its own paged cache and nothing else:
- `output_attentions`, `output_hidden_states`: every layer's probabilities and hidden states at every
  step, which the fused paged attention never forms;
- `inputs_embeds`, custom `position_ids`, a `cache` (`past_key_values`) to continue: inputs that are
  not token ids from position 0, or K/V the engine did not compute, in transformers' cache layout;
- beam search with `return_dict_in_generate` (beam indices and per-step beam scores, which gitfast's
  beam loop does not keep); user `logits_processor`/`stopping_criteria`/`prefix_allowed_tokens_fn`/
  `streamer` and the other `MIXIN_ARGS`: hooks into transformers' loop, merged and ordered by its
  rules; generation modes gitfast has no loop for (`resolve_settings` raises NotImplementedError);
- a prompt whose last token is padding: transformers predicts its first token from that padding
  query (`_last_token_padded`), while requests hold only the real prompt tokens.
"""
from __future__ import annotations

import copy

import torch
from transformers.generation import GenerationMixin, LogitsProcessorList

from ..devices import placement
from ..serving import generation
from .engine_calls import generate_continuous, generate_lockstep

MODEL_KWARGS = {"pixel_values", "input_ids", "attention_mask", "interpolate_pos_encoding", "inputs_embeds",
                "position_ids", "logits_to_keep", "token_type_ids", "use_cache", "past_key_values", "cache"}
# arguments only transformers' own generate serves (the plain path)
MIXIN_ARGS = {"synced_gpus", "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
              "custom_generate", "tokenizer", "assistant_tokenizer", "use_model_defaults"}


class _RecordLogits:
    """Wraps a processor to keep the raw fp32 logits it is handed (transformers' `output_logits`)."""

    def __init__(self, proc):
        self.proc, self.logits = proc, []

    def __call__(self, ids, scores):
        self.logits.append(scores.clone())
        return self.proc(ids, scores)


def _needs_plain(gc, kwargs, extras) -> bool:
    if any(kwargs.get(k) is not None for k in ("inputs_embeds", "position_ids", "past_key_values", "cache")):
        return True
    if any(v is not None and not (isinstance(v, list) and not v) for v in extras.values()):
        return True
    if gc.output_attentions or gc.output_hidden_states:
        return True
    return bool(gc.return_dict_in_generate and (gc.num_beams or 1) > 1)


def hf_processors(lm, gc, s, input_ids):
    """transformers' `LogitsProcessorList` for this generation config (its order, its state)."""
    gc = copy.deepcopy(gc)
    gc.max_length, gc.min_length = s.max_length, s.min_length
    lm._prepare_special_tokens(gc, True, device=input_ids.device)
    return lm._get_logits_processor(generation_config=gc, input_ids_seq_length=input_ids.shape[1],
                                    encoder_input_ids=input_ids, logits_processor=LogitsProcessorList(),
                                    device=input_ids.device, model_kwargs={})


def run(lm, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
        prefix_allowed_tokens_fn=None, **kwargs):
    extras = {"logits_processor": logits_processor, "stopping_criteria": stopping_criteria,
              "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn}
    extras.update({k: kwargs.pop(k) for k in list(kwargs) if k in MIXIN_ARGS})
    model_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in MODEL_KWARGS}
    gc = copy.deepcopy(generation_config if generation_config is not None else lm.generation_config)
    unused = gc.update(**kwargs)
    if unused:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unused))}")
    if gc.num_beams is not None and gc.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {gc.num_beams}")
    input_ids = model_kw.pop("input_ids", None) if inputs is None else inputs
    try:
        plain = _needs_plain(gc, model_kw, extras)
        if not plain:
            s = generation.resolve_settings(gc, 1 if input_ids is None else input_ids.shape[1])
            plain = input_ids is not None and _last_token_padded(input_ids, model_kw.get("attention_mask"), s)
    except NotImplementedError:  # a generation mode gitfast has no loop for
        plain = True
    if plain:
        with torch.no_grad():
            return GenerationMixin.generate(lm, input_ids, generation_config=gc, **extras, **model_kw)
    with torch.inference_mode():
        out = _gitfast(lm, gc, input_ids, **model_kw)
    # as transformers' (made under no_grad): tensors a caller may feed to a forward that records autograd
    if isinstance(out, torch.Tensor):
        return out.clone()
    for key, value in out.items():
        out[key] = value.clone() if isinstance(value, torch.Tensor) else tuple(v.clone() for v in value)
    return out


def prompt_mask(input_ids, attention_mask, s):
    """The prompt's padding mask: the one given, else (as transformers) inferred from pad tokens
    unless pad == EOS, and never without a pad (or EOS) id: 0 is then no pad token."""
    if attention_mask is not None:
        return attention_mask
    if s.pad_given and s.pad not in s.eos and bool((input_ids == s.pad).any()):
        return (input_ids != s.pad).long()
    return torch.ones_like(input_ids)


def _last_token_padded(input_ids, attention_mask, s) -> bool:
    """Whether a row's last prompt token is padding (right padding). gitfast's loops drop padded
    tokens and predict from each row's last real token; transformers predicts the first new token
    from the last column, a padding query (position 0, its own key masked) that attends to the image
    and the real tokens, so its first scores (and tokens) differ. Such prompts go to transformers'
    loop over gitfast's forward, which computes exactly that."""
    mask = prompt_mask(input_ids, attention_mask, s)
    return mask.ndim == 2 and mask.shape[1] > 0 and not bool(mask[:, -1].bool().all())


def check_batch(input_ids, pixel_values) -> None:
    """An empty batch is refused by name (transformers fails on it deep inside its model)."""
    if pixel_values is not None and pixel_values.shape[0] == 0:
        raise ValueError("generate() got an empty batch: pixel_values has 0 images")
    if input_ids.shape[0] == 0:
        raise ValueError("generate() got an empty batch: input_ids has 0 rows")


def check_lengths(gc, s, prompt_len: int, positions: int) -> None:
    """Refuses lengths past the text position table, naming the argument and its limit.

    The last token is chosen and never fed, so `positions` text positions make sequences of at most
    `positions + 1` tokens; transformers fails with an IndexError when it gets there, and gitfast would
    size its KV cache for the asked length (10**9 tokens: a terabyte). `min_new_tokens` is named when it
    forces the run past the end (transformers stops at `max_length` first when that comes sooner)."""
    if s.max_length <= prompt_len:
        raise ValueError(f"max_length ({s.max_length}) leaves no room after the {prompt_len}-token prompt; "
                         "set max_new_tokens")
    longest = positions + 1
    if s.max_length <= longest:
        return
    limit = f"the model's {positions} text positions (max_position_embeddings)"
    fit = f"at most {longest - prompt_len} new tokens fit after a {prompt_len}-token prompt"
    if prompt_len + (gc.min_new_tokens or 0) > longest:
        raise ValueError(f"min_new_tokens ({gc.min_new_tokens}) runs past {limit}: {fit}")
    if s.min_length > longest:
        raise ValueError(f"min_length ({s.min_length}) runs past {limit}: at most {longest} tokens in all")
    if gc.max_new_tokens is not None:
        raise ValueError(f"max_new_tokens ({gc.max_new_tokens}) runs past {limit}: {fit}")
    raise ValueError(f"max_length ({s.max_length}) runs past {limit}: at most {longest} tokens in all")


def _gitfast(lm, gc, input_ids=None, pixel_values=None, attention_mask=None, interpolate_pos_encoding=False,
             logits_to_keep=None, token_type_ids=None, use_cache=None, **_):
    # logits_to_keep: gitfast keeps only the last position's logits anyway; token_type_ids: GIT has
    # none; use_cache: gitfast always decodes from its paged cache (the tokens are the same)
    dev, dtype = placement(lm.model)
    input_ids = _prompt_ids(lm, gc, input_ids, pixel_values).to(dev)
    b, t = input_ids.shape
    s = generation.resolve_settings(gc, t)
    attention_mask = prompt_mask(input_ids, attention_mask, s).to(dev)
    check_batch(input_ids, pixel_values)
    check_lengths(gc, s, t, lm.config.max_position_embeddings)
    if pixel_values is not None:
        pixel_values = pixel_values.to(dev, dtype)
        if b % pixel_values.shape[0]:
            raise ValueError(f"{b} text rows cannot share {pixel_values.shape[0]} images; the text batch must be "
                             "a multiple of the image batch")
    # the images tiled over the text rows, as transformers repeats them
    image_of_row = None if pixel_values is None else [i % pixel_values.shape[0] for i in range(b)]

    expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
    continuous = (lm.use_paged_cache and not s.do_sample and not s.output_scores and not s.output_logits
                  and not s.hf_processors and s.min_length == 0 and not interpolate_pos_encoding and expand == 1)
    with lm._engine_guard.hold():  # concurrent callers take turns on the one engine
        engine = lm._engine_for(b * expand, 0 if pixel_values is None else pixel_values.shape[0], t, s)
        if continuous:
            return _output(s, generate_continuous(engine, pixel_values, input_ids, attention_mask, s, image_of_row))
        # transformers' own loops, rows in lockstep (its exact RNG use when sampling)
        processors = _Processors(lm, gc, s, input_ids)
        seqs, scores = generate_lockstep(engine, pixel_values, input_ids, attention_mask, s, expand, processors,
                                         image_of_row, interpolate_pos_encoding)
    return _output(s, seqs, scores, processors.recorder)


def _prompt_ids(lm, gc, input_ids, pixel_values):
    """The prompt ids given, else (as transformers) BOS alone, one row per image (or one row)."""
    if input_ids is not None:
        return input_ids
    bos = gc.bos_token_id if gc.bos_token_id is not None else lm.config.bos_token_id
    if bos is None:
        raise ValueError("generate() without input_ids needs a bos_token_id")
    rows = pixel_values.shape[0] if pixel_values is not None else 1
    return torch.full((rows, 1), bos, dtype=torch.long)


class _Processors:
    """The lockstep loops' logits processor, made once the loop knows each row's padding: gitfast's fast
    steps, or transformers' list when a field only it serves is set; wrapped to record raw logits when
    `output_logits` asks."""

    def __init__(self, lm, gc, s, input_ids):
        self.lm, self.gc, self.s, self.input_ids = lm, gc, s, input_ids
        self.recorder = None

    def __call__(self, pad_lengths, vocab):
        s, ids = self.s, self.input_ids
        proc = (hf_processors(self.lm, self.gc, s, ids) if s.hf_processors
                else generation.Processor(s, ids.shape[1], pad_lengths, vocab, ids.device))
        if s.output_logits:
            proc = self.recorder = _RecordLogits(proc)
        return proc


def _output(s, seqs, scores=None, recorder=None):
    """The ids alone, or transformers' output class when `return_dict_in_generate`."""
    if not s.return_dict:
        return seqs
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
    if s.num_beams > 1:
        return GenerateBeamDecoderOnlyOutput(sequences=seqs, sequences_scores=scores)
    return GenerateDecoderOnlyOutput(sequences=seqs, scores=tuple(scores) if s.output_scores else None,
                                     logits=tuple(recorder.logits) if recorder is not None else None)
