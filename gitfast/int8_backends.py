"""The int8 GEMM backends of dynamic INT8 (gitfast/quantization.py's module docstring says what each is
and why), their check against the exact integers, and the choices among them, measured once per
process on decoder- and vision-sized shapes (gitfast.backend_choice), `gitfast info` showing the times:
- `backend()`: text tokens' rows (the decoder's prompt and decode passes), the fastest 8-bit one
  (GITFAST_INT8_BACKEND);
- `image_backend()`: image tokens' rows (the vision encoder, the projection, the decoder's pass over
  an image prefix), that same backend or a 7-bit one where that measures more than
  PREFERENCE_MARGIN faster (GITFAST_INT8_IMAGE_BACKEND).
Why image tokens alone may take 7 bits (AMD Zen 3, git-base shapes, 40 images, greedy captions
identical to transformers fp32): 7-bit activations everywhere 4/32 (the text rows' precision picks
the tokens); 7 bits in the vision encoder only 13/40, in every pass of 64 rows or more (vision,
image prefix, prompt) 14/40; 8-bit everywhere 10/40; transformers + torch's dynamic INT8 4/32. The
split is by token kind, never by rows per call, so a row's result does not depend on its batch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import ops

BACKENDS = ("onednn", "cpu ext", "cpu ext vnni", "cpu ext u7", "torch._int_mm", "reference")  # in order of preference
SEVEN_BIT = ("cpu ext u7",)  # backends whose activations are quantized to 7 bits (quantize_rows_u7)
EIGHT_BIT = tuple(name for name in BACKENDS if name not in SEVEN_BIT)
PACKED = ("cpu ext vnni", *SEVEN_BIT)  # backends reading pack_u7_weight's layout and the weight's row sums


def _onednn_pack(w_int8):
    return torch.ops.onednn.qlinear_prepack(w_int8, None)


def _onednn_mm(q, packed, w_scale, w_zero):
    # activation scale 1, zero point 0: acc * w_scale in fp32; the per-row scale comes after
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32,
                                              "none", [], "")


class Int8Weight:
    """An int8 weight [N, K] made ready for one backend's GEMM: oneDNN's packing, or, for the packed
    GEMMs (the 7-bit one and the VNNI one), the row sums that take their zero points (the VNNI
    kernel's +128) back out and the packed copy (pack_u7_weight: +1 byte per weight, N and K padded
    to 16 and 4)."""

    def __init__(self, backend: str, w_int8: torch.Tensor):
        if backend == "cpu ext" and not (ops.extension_loaded() and hasattr(torch.ops.gitfast, "int8_mm")):
            raise RuntimeError("gitfast._C is not built with int8_mm")
        if backend in SEVEN_BIT and not (ops.extension_loaded() and hasattr(torch.ops.gitfast, "int8_mm_u7_packed")):
            raise RuntimeError("gitfast._C is not built with int8_mm_u7_packed")
        if backend == "cpu ext vnni" and not (ops.extension_loaded() and hasattr(torch.ops.gitfast, "int8_mm_vnni")):
            raise RuntimeError("gitfast._C is not built with int8_mm_vnni")
        self.backend, self.w = backend, w_int8
        packs = backend in PACKED
        self.colsum = w_int8.sum(1, dtype=torch.int32) if packs else None
        # the packed GEMMs' outer-product layout, packed once
        self.packed_quads = torch.ops.gitfast.pack_u7_weight(w_int8) if packs else None
        if backend == "onednn":  # its packed weight, unit scales and zero points (the layer's scales come after)
            n = w_int8.shape[0]
            self.packed, self._ones, self._zeros = _onednn_pack(w_int8), torch.ones(n), torch.zeros(n, dtype=torch.int64)

    def products(self, q: torch.Tensor, zero: Optional[torch.Tensor], w_scale: Optional[torch.Tensor] = None):
        """(acc, column scale still to apply): acc holds the exact (q - zero) @ w^T (int32, or fp32
        values; `zero` only for a 7-bit backend's uint8 rows), times `w_scale` already where the
        backend applies it (oneDNN: the scale left is then None)."""
        name = self.backend
        if name == "onednn":
            return _onednn_mm(q, self.packed, self._ones if w_scale is None else w_scale, self._zeros), None
        if name == "cpu ext":
            return torch.ops.gitfast.int8_mm(q, self.w), w_scale
        if name in SEVEN_BIT:
            return torch.ops.gitfast.int8_mm_u7_packed(q, zero, self.packed_quads, self.colsum), w_scale
        if name == "cpu ext vnni":
            return torch.ops.gitfast.int8_mm_vnni(q, self.packed_quads, self.colsum), w_scale
        if name == "torch._int_mm":
            return torch._int_mm(q, self.w.t()), w_scale
        return q.float() @ self.w.float().t(), w_scale


def gemm_for(name: str, w_int8: torch.Tensor):
    """`(q, zero=None) -> (q - zero) @ w_int8^T` (int32-exact values, float or int32) through backend `name`."""
    weight = Int8Weight(name, w_int8)
    return lambda q, zero=None: weight.products(q, zero)[0]


def check_rows(name: str, rows: int, k: int, generator: torch.Generator):
    """Random (q, zero) of the kind backend `name` takes: int8 rows (zero None), or 0..127 uint8 rows
    and their zero points for a 7-bit backend."""
    if name in SEVEN_BIT:
        return (torch.randint(0, 128, (rows, k), generator=generator, dtype=torch.uint8),
                torch.randint(0, 128, (rows,), generator=generator, dtype=torch.int32))
    return torch.randint(-127, 128, (rows, k), generator=generator, dtype=torch.int8), None


def reference_products(q: torch.Tensor, zero: Optional[torch.Tensor], w_int8: torch.Tensor) -> torch.Tensor:
    """(q - zero) @ w^T in float64: exact, the ground truth for every backend."""
    x = q.double() if zero is None else q.double() - zero.double()[:, None]
    return x @ w_int8.double().t()


# (rows, in, out), cheapest first: a decode step's MLP GEMM at one sequence and its attention GEMM at
# a batch of 32, then a vision encoder's MLP GEMM at one image (a pathological backend, 41M MAC/s,
# costs 0.06 s on the first before it drops out)
MEASURED_SHAPES = ((1, 768, 3072), (32, 768, 768), (256, 768, 3072))
# image rows': an MLP's two GEMMs at about one image (197 tokens)
IMAGE_SHAPES = ((256, 768, 3072), (256, 3072, 768))


def prepare(name: str, shapes=MEASURED_SHAPES):
    """backend_choice candidate: `name` must give the reference integers on a small odd case; then one
    GEMM call per (rows, in, out) of `shapes` (none: the check alone)."""
    from .backend_choice import Unfit

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    q, zero = check_rows(name, 17, 40, g)
    try:
        got = gemm_for(name, w)(q, zero)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        raise Unfit(f"does not run here ({str(exc).splitlines()[0][:120]})") from exc
    if not torch.equal(got.double(), reference_products(q, zero, w)):
        raise Unfit("wrong integers on the check case")
    calls = []
    for rows, k, n in shapes:
        mm = gemm_for(name, torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
        calls.append(functools.partial(mm, *check_rows(name, rows, k, g)))
    return calls


def backend() -> str:
    """The 8-bit int8 GEMM serving text tokens' rows here: measured once per process."""
    return decision().chosen


def image_backend() -> str:
    """The int8 GEMM serving image tokens' rows: backend(), or a 7-bit one measured faster."""
    return image_decision().chosen


def activation_bits(name: str) -> int:
    """Bits per activation of backend `name`: 8, or 7 for a 7-bit backend."""
    return 7 if name in SEVEN_BIT else 8


def decision():
    """backend_choice.Decision for text rows' int8 GEMM (its times and the candidates ruled out)."""
    from .backend_choice import choose

    return choose("int8_gemm", {name: functools.partial(prepare, name) for name in EIGHT_BIT},
                  "GITFAST_INT8_BACKEND")


def image_decision():
    """backend_choice.Decision for image rows' int8 GEMM: the text rows' backend first, so a 7-bit one
    must beat it by PREFERENCE_MARGIN."""
    from .backend_choice import choose

    names = (backend(), *SEVEN_BIT)
    return choose("int8_gemm_image", {name: functools.partial(prepare, name, IMAGE_SHAPES) for name in names},
                  "GITFAST_INT8_IMAGE_BACKEND")
