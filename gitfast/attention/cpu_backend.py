"""The C++ attention backend: GIT attention on the CPU through `gitfast._C` (csrc/cpu/attention.cpp),
loaded as `ops.extension_loaded` loads it; `BACKEND` implements `interface.AttentionBackend` over
these kernel calls, which keep the signatures of the Triton kernels' API in `gitfast.kernels`:

- ``git_attention(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=None, sm_scale=None)``
- ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None)``
- ``paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
  num_image_tokens, sm_scale=None)``
- ``write_kv_cache(k, v, k_cache, v_cache, slot_mapping)``: new K/V rows into their cache slots
  (negative slots skipped), in place; a decode step's few rows are copied without waking a thread.
- ``available()``: whether the built extension has these ops; ``isa()``: the vector ISA serving
  them ("avx512", "avx2" or "generic"), chosen on first use by measuring each ISA this CPU has
  (gitfast.backend_choice: checked against the plain-torch reference, then timed on a decoder
  prefill and a decode step at git-base's shapes; widest first, kept within 15%). GITFAST_CPU_ISA
  caps the ISAs, GITFAST_ATTENTION_ISA forces one.

`num_image_tokens` is an int or a tensor (per sequence, or 0-dim for all), clamped per sequence
to its length as in `gitfast.kernels.reference`. fp32, fp16 and bf16 inputs; fp32 arithmetic.
No autograd: these are inference kernels.

The vision encoder's attention (and an image prefix's: every token sees every token) takes the kernel's
all-keys path (whole score rows, an exact softmax, register tiles over panels of keys and values) where
`vision_decision` measured it no more than backend_choice.PREFERENCE_MARGIN slower than plain torch's
SDPA, on two vision-shaped calls of 12 heads of 64 (fp32; both with the model's flatten of the heads
after); GITFAST_VISION_ATTENTION_BACKEND forces "torch" or "cpu ext". AMD Zen 3, 2 threads, 13 x 197
tokens, 12 heads: 13.1-13.5 ms against SDPA's 17.5-17.9 ms (before this path the kernel's tiled path was
0.6-0.7x SDPA's speed there). The kernel comes first in the preference order because the decision's
lone calls understate what the model sees: there the two alternate call by call at 1.1-1.2x, within the
margin, so SDPA first made the choice flip between processes (SDPA in 2 of 6 on that CPU), and with it
the last bits that low-precision captions turn on; in the model the encoder's pass over 13 images ran
1.03x faster with the kernel (2.75 against 2.83 s, 5 pairs), whole caption calls 1.016x (median of 6).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import ops
from .interface import DECODE, DENSE, KERNEL_HEAD_DIMS, PREFILL, VISION, WRITE_KV, packed_dense

_OPS = ("git_attention", "paged_decode_attention", "paged_prefill_attention")
_ALL_OPS = (*_OPS, "write_kv_cache")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when gitfast._C is built with the CPU attention ops (their fakes registered then)."""
    if not ops.extension_loaded():
        return False
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"gitfast::{op}", "CPU") for op in _ALL_OPS):
        return False
    _register_fakes()
    return True


def isa() -> str | None:
    """The vector ISA the CPU attention kernels run (measured on first use), or None without them."""
    if not available():
        return None
    return decision().chosen


def decision():
    """backend_choice.Decision for the attention ISA; the chosen one is set in gitfast._C."""
    from ..backend_choice import choose, decided

    made = decided("cpu_attention_isa")
    if made is not None:
        return made
    isas = list(torch.ops.gitfast.cpu_isas())  # widest first: the order of preference
    # no one-off set-up in these kernels: a first call far behind the best is a verdict
    made = choose("cpu_attention_isa", {name: functools.partial(_prepare, name) for name in isas},
                  "GITFAST_ATTENTION_ISA", first_call_floor=0.002)
    torch.ops.gitfast.set_cpu_isa(made.chosen)
    return made


def _prepare(name: str):
    """backend_choice candidate: attention on ISA `name` must match the plain-torch reference on a
    small case with GIT's mask; then a decode step (8 sequences, 217 cached tokens) and a decoder
    prefill (197 image + 20 text tokens), 4 heads of 64 (a third of git-base's: start-up pays for
    this once per process), each call run on `name`."""
    from ..backend_choice import Unfit
    from ..kernels.reference import git_attention_reference

    set_isa = functools.partial(torch.ops.gitfast.set_cpu_isa, name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(23, 2, 40, generator=g) for _ in range(3))
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    ops = torch.ops.gitfast  # the kernels themselves, not this module's wrappers (tests spy on those)
    set_isa()
    got = ops.git_attention(q, k, v, cu, None, 5, None)
    if not torch.allclose(got, git_attention_reference(q, k, v, cu, 5), atol=1e-5, rtol=1e-5):
        raise Unfit("wrong results on the check case")
    heads, dim, image, text = 4, 64, 197, 20
    qp, kp, vp = (torch.randn(image + text, heads, dim, generator=g) for _ in range(3))
    cu = torch.tensor([0, image + text], dtype=torch.int32)
    blocks, block_size = 8 * 14, 16
    kc, vc = (torch.randn(blocks, block_size, heads, dim, generator=g) for _ in range(2))
    tables = torch.arange(blocks, dtype=torch.int32).view(8, 14)
    lens = torch.full((8,), image + text, dtype=torch.int32)
    qd = torch.randn(8, heads, dim, generator=g)

    def prefill():
        set_isa()
        ops.git_attention(qp, kp, vp, cu, None, image, None)

    def decode():
        set_isa()
        ops.paged_decode_attention(qd, kc, vc, tables, lens, None)
    return [decode, prefill]


VISION_KIND, VISION_ENV = "vision_attention", "GITFAST_VISION_ATTENTION_BACKEND"


def vision_decision():
    """backend_choice.Decision for attention where every token sees every token: "cpu ext" (the
    kernel's all-keys path, on the measured ISA; preferred within the margin, see the module docstring)
    or "torch" (SDPA)."""
    from ..backend_choice import choose, decided

    made = decided(VISION_KIND)
    if made is not None:
        return made
    decision()  # the ISA the kernel candidate will run on
    return choose(VISION_KIND, {name: functools.partial(_prepare_vision, name) for name in ("cpu ext", "torch")},
                  VISION_ENV, first_call_floor=0.002)


def _prepare_vision(name: str):
    """backend_choice candidate: `name`'s image-token attention must match an fp64 softmax on a small
    odd case (2 images of 37 tokens, 3 heads of 64); then one image and two, 197 tokens, 12 heads of 64
    (git-base's vision attention; start-up pays about 0.05 s for this once per process), heads flattened
    after as the model does (SDPA's output is head-major, the kernel's token-major)."""
    from ..backend_choice import Unfit
    from ..kernels.reference import git_attention_reference
    from .torch_backend import BACKEND as plain

    attend = plain.dense if name == "torch" else BACKEND.dense
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 64, generator=g) for _ in range(3))
    cu = torch.tensor([0, 37, 74], dtype=torch.int32)  # two sequences of image tokens only
    want = git_attention_reference(*(t.double().flatten(0, 1) for t in (q, k, v)), cu, 37,
                                   compute_dtype=torch.float64).view(q.shape)
    if not torch.allclose(attend(q, k, v).double(), want, atol=1e-5, rtol=1e-5):
        raise Unfit("wrong results on the check case")
    calls = []
    for images in (1, 2):
        qkv = torch.randn(images, 197, 3, 12, 64, generator=g)
        calls.append(functools.partial(lambda t: attend(*t.unbind(2)).flatten(-2), qkv))
    return calls


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile traces the ops."""
    for op in _OPS:
        torch.library.register_fake(f"gitfast::{op}")(lambda q, *args: q.new_empty(q.shape))
    torch.library.register_fake("gitfast::write_kv_cache")(lambda k, v, k_cache, v_cache, slot_mapping: None)


def _image_counts(num_image_tokens):
    if isinstance(num_image_tokens, torch.Tensor):
        return num_image_tokens, 0
    return None, int(num_image_tokens)


def git_attention(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=None, sm_scale=None):
    """Varlen GIT attention over packed q, k, v `[N, H, D]`; `max_seqlen` is accepted for the Triton
    API's sake and unused (the CPU kernel reads the lengths)."""
    counts, n = _image_counts(num_image_tokens)
    return torch.ops.gitfast.git_attention(q, k, v, cu_seqlens, counts, n, sm_scale)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None):
    """One query per sequence `[B, H, D]` over its `context_lens[b]` cached tokens (none: zeros)."""
    return torch.ops.gitfast.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, num_image_tokens,
                            sm_scale=None):
    """New tokens (packed by `cu_seqlens_q`) at the end of each sequence's cached context, with
    GIT's mask."""
    counts, n = _image_counts(num_image_tokens)
    return torch.ops.gitfast.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                     context_lens, counts, n, sm_scale)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """Stores `k`, `v` [N, H, D] at `slot_mapping` [N] (block * block_size + offset; negative =
    skipped) of the contiguous caches [num_blocks, block_size, H, D], in place."""
    torch.ops.gitfast.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


class CpuBackend:
    """`interface.AttentionBackend` over these kernels (CPU tensors; the ISA measured before first use)."""

    name = "cpu ext"

    def serves(self, op: str, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> bool:
        if op == WRITE_KV:
            return cache.is_contiguous()
        if op == VISION:
            return x.shape[-1] in KERNEL_HEAD_DIMS and not torch.compiler.is_compiling() \
                and vision_decision().chosen == "cpu ext"
        return op in (DENSE, PREFILL, DECODE) and x.shape[-1] in KERNEL_HEAD_DIMS

    def dense(self, q, k, v, num_image: Optional[int] = None, text_mask: Optional[torch.Tensor] = None):
        return packed_dense(git_attention, q, k, v, num_image)

    def decode(self, q, k_pool, v_pool, meta):
        return paged_decode_attention(q, k_pool, v_pool, meta.block_tables, meta.context_lens)

    def prefill(self, q, k_pool, v_pool, meta):
        return paged_prefill_attention(q, k_pool, v_pool, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                                       meta.num_image)

    def write_kv(self, k, v, k_pool, v_pool, slot_mapping) -> None:
        write_kv_cache(k, v, k_pool, v_pool, slot_mapping)


BACKEND = CpuBackend()


# Load now rather than on the first call: that call may be inside torch.compile's tracing, which
# cannot import modules.
available()
