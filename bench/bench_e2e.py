"""End-to-end captioning: images in, tokens out, gitfast against transformers in the same run.

Providers:
- `gitfast`: the engine (paged KV cache, continuous batching, CUDA-graph decode), kept across calls
  as `gitfast.Captioner` keeps it;
- `gitfast_generate`: the drop-in `gitfast.GitForCausalLM.generate` (the same engine underneath);
- `transformers`: `transformers.GitForCausalLM.generate`, eager attention everywhere (its default);
- `transformers_sdpa`: the same with SDPA in the vision encoder (the decoder only has eager).
Every call decodes exactly `new_tokens` tokens (`min_new_tokens` = `max_new_tokens`), so all
providers do the same work, except the `EOS` rows (`lengths: "natural"`): there captions end at EOS
after varied numbers of tokens, as real ones do, so sequences retire and new ones are admitted on most
decode steps (what the forced rows never exercise: the engine's per-admission host work). With random
weights EOS would never win, so the EOS ids are tokens of a free run, picked greedily (rarest
first) while they make the caption lengths more varied; `mean_tokens` in the row says how long the captions were. Weights are random (speed does not depend on them). `images` in each
row is the number of images one call captions; the runner adds `images_per_s` (images / median
seconds) and, on CUDA, `peak_mem_gb`: the most memory one call allocates above what is already resident
(the weights), measured with a fresh gitfast engine so that its KV cache and CUDA graphs count. The VQA
case asks 8 questions per image, where gitfast computes each image's prefix once and shares it.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable

import torch

from .common import Case

SUITE = "e2e"
NEW_TOKENS = 20

# name -> (vision hidden, vision layers, vision heads, vision MLP, patch, image size)
SIZES = {
    "git-base": (768, 12, 12, 3072, 16, 224),
    "git-large": (1024, 24, 16, 4096, 14, 224),
    "tiny": (128, 2, 2, 256, 16, 64),
}
FULL = [(size, batch) for size in ("git-base", "git-large") for batch in (1, 32, 256)]
QUICK = [("tiny", 1), ("tiny", 4)]


def _full_shapes():
    """FULL, or the `model:batch` pairs of GITFAST_BENCH_E2E (e.g. "git-base:32,git-base:256": a GPU
    session's time box holds a few shapes, not all six)."""
    chosen = os.environ.get("GITFAST_BENCH_E2E", "").strip()
    if not chosen:
        return FULL
    pairs = [item.split(":") for item in chosen.split(",") if item.strip()]
    return [(size.strip(), int(batch)) for size, batch in pairs]


def _config(size: str):
    from transformers import GitConfig

    vh, vl, vheads, vmlp, patch, image = SIZES[size]
    tiny = size == "tiny"
    return GitConfig(
        vision_config=dict(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vheads,
                           intermediate_size=vmlp, patch_size=patch, image_size=image),
        hidden_size=128 if tiny else 768, num_hidden_layers=2 if tiny else 6,
        num_attention_heads=2 if tiny else 12, intermediate_size=256 if tiny else 3072,
        vocab_size=1000 if tiny else 30522,
    )


@functools.lru_cache(maxsize=2)
def _models(size: str, device: str, dtype: torch.dtype):
    import transformers

    import gitfast

    torch.manual_seed(0)
    hf = transformers.GitForCausalLM(_config(size)).eval().to(device, dtype)
    cfg = _config(size)
    cfg.vision_config._attn_implementation = "sdpa"
    try:
        hf_sdpa = transformers.GitForCausalLM(cfg).eval().to(device, dtype)
        hf_sdpa.load_state_dict(hf.state_dict())
    except (ValueError, TypeError) as exc:  # older transformers without SDPA for GIT's vision model
        hf_sdpa = exc
    return hf, hf_sdpa, gitfast.GitForCausalLM.from_transformers(hf)


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    from gitfast.serving.engine import Engine, Request
    from gitfast.serving.generation import resolve_settings

    dt = str(dtype).replace("torch.", "")
    new_tokens = 8 if quick else NEW_TOKENS
    if device == "cpu" and dtype != torch.float32:
        return  # half precision generate on CPU is not what anyone runs
    shapes = QUICK if quick else _full_shapes()
    for size, batch in shapes:
        hf, hf_sdpa, fm = _models(size, device, dtype)
        image = SIZES[size][5]
        g = torch.Generator().manual_seed(1)
        px = torch.randn(batch, 3, image, image, generator=g).to(device, dtype)
        forced = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        shape = {"model": size, "batch": batch, "new_tokens": new_tokens, "image_tokens": fm.num_image_tokens}
        label = f"{size} B{batch}"

        def case(provider, fn, reason=None, images=batch, memory_fn=None):
            return Case(SUITE, shape, provider, dt, fn if reason is None else None, skip_reason=reason,
                        label=label, extra={"images": images}, memory_fn=memory_fn or fn)

        engine = Engine(fm.model, max_batch_size=batch)
        reqs = [Request(px[i], [fm.config.bos_token_id]) for i in range(batch)]
        s = resolve_settings(fm.generation_config, 1, **forced)

        def fresh_generate():  # peak memory counts the engine's KV cache and CUDA graphs it builds
            fm.free_kv_cache()
            fm.generate(pixel_values=px, **forced)

        yield case("gitfast", lambda: engine.generate(reqs, s),
                   memory_fn=lambda: Engine(fm.model, max_batch_size=batch).generate(reqs, s))
        yield case("gitfast_generate", lambda: fm.generate(pixel_values=px, **forced), memory_fn=fresh_generate)
        yield case("transformers", lambda: hf.generate(pixel_values=px, **forced))
        if isinstance(hf_sdpa, Exception):
            yield case("transformers_sdpa", None, reason="this transformers has no SDPA for GIT's vision encoder: " + str(hf_sdpa).split(".")[0])
        else:
            yield case("transformers_sdpa", lambda: hf_sdpa.generate(pixel_values=px, **forced))
        if batch == max(b for z, b in shapes if z == size):
            yield from _vqa_cases(size, hf, fm, px, forced, dt, device)
        if batch > 1:
            yield from _natural_cases(size, hf, fm, px, new_tokens, dt, engine, reqs)


def _varied_eos(runs, new_tokens: int):
    """EOS ids that end the free-run captions `runs` after as many different lengths as they can."""
    def lengths(ids):
        return [next((i + 1 for i, t in enumerate(r) if t in ids), new_tokens) for r in runs]

    rows_with = {}
    for r in runs:
        for t in set(r[1:]):  # never the first token: every caption keeps at least two
            rows_with[t] = rows_with.get(t, 0) + 1
    chosen = set()
    for t in sorted(rows_with, key=lambda t: (rows_with[t], t)):
        if len(set(lengths(chosen | {t}))) > len(set(lengths(chosen))):
            chosen.add(t)
    return sorted(chosen)


def _natural_cases(size, hf, fm, px, new_tokens, dt, engine, reqs):
    """Captions ending at EOS after varied lengths (see the module docstring)."""
    from gitfast.serving.generation import resolve_settings

    batch = px.shape[0]
    free = resolve_settings(fm.generation_config, 1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    runs = [o.token_ids for o in engine.generate(reqs, free)]
    eos = _varied_eos(runs, new_tokens) + [fm.config.eos_token_id]
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=new_tokens, eos_token_id=eos)
    lengths = [len(o.token_ids) for o in engine.generate(reqs, s)]
    shape = {"model": size, "batch": batch, "new_tokens": new_tokens, "lengths": "natural",
             "image_tokens": fm.num_image_tokens}
    extra = {"images": batch, "mean_tokens": round(sum(lengths) / batch, 2), "max_tokens": max(lengths)}

    def case(provider, fn):
        return Case(SUITE, shape, provider, dt, fn, label=f"{size} B{batch} EOS", extra=extra)

    yield case("gitfast", lambda: engine.generate(reqs, s))
    yield case("transformers", lambda: hf.generate(pixel_values=px, max_new_tokens=new_tokens, eos_token_id=eos))


def _vqa_cases(size, hf, fm, px, forced, dt, device, questions: int = 8):
    """Each image asked `questions` different 6-token questions."""
    from gitfast.serving.engine import Engine, Request
    from gitfast.serving.generation import resolve_settings

    images = min(px.shape[0], 32)
    px = px[:images]
    q = torch.randint(1000, 2000, (questions, 5)) if size != "tiny" else torch.randint(110, 900, (questions, 5))
    ids = torch.cat([torch.full((questions, 1), fm.config.bos_token_id), q], dim=1)
    ids_all = ids.repeat(images, 1).to(device)                     # row r asks question r % 8 ...
    px_rows = px.repeat_interleave(questions, 0)                    # ... about image r // 8
    shape = {"model": size, "batch": images * questions, "images": images, "questions": questions,
             "new_tokens": forced["max_new_tokens"]}
    label = f"{size} VQA {images}x{questions}"
    engine = Engine(fm.model, max_batch_size=images * questions)
    reqs = [Request(px[r // questions], ids[r % questions].tolist(), image_key=r // questions)
            for r in range(images * questions)]
    s = resolve_settings(fm.generation_config, ids.shape[1], **forced)

    def case(provider, fn, memory_fn=None):
        return Case(SUITE, shape, provider, dt, fn, label=label, extra={"images": images}, memory_fn=memory_fn or fn)

    yield case("gitfast", lambda: engine.generate(reqs, s),
               memory_fn=lambda: Engine(fm.model, max_batch_size=images * questions).generate(reqs, s))
    yield case("transformers", lambda: hf.generate(pixel_values=px_rows, input_ids=ids_all, **forced))
