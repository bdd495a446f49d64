"""Dynamic INT8 Linear layers on the CPU: gitfast's against PyTorch's dynamic INT8 and fp32.

One call is a whole layer, y = x W^T + b for fp32 x: quantizing x, the int8 GEMM and dequantizing,
as each provider does it.

Providers:
- ``gitfast``: ``gitfast.quantization.DynamicInt8Linear`` with this machine's measured GEMM backend
  (per-token activation scales; ``gitfast info`` names the backend);
- ``gitfast <backend>``: the same layer forced onto each other backend that is fit here
  (``onednn``, ``cpu ext``: gitfast._C's int8_mm, ``torch._int_mm``, ``reference``);
- ``torch dynamic int8``: ``torch.ao.nn.quantized.dynamic.Linear`` (what
  ``torch.ao.quantization.quantize_dynamic`` gives transformers users: per-tensor activation scale,
  fbgemm / oneDNN underneath);
- ``torch fp32``: ``F.linear`` in fp32.

Shapes: git-base's decoder MLP GEMM at 1 and 8 rows (decode steps) and the vision encoder's two MLP
GEMMs over one image (256 rows; quick mode: 1 and 37 rows). FLOPs are the GEMM's.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn.functional as F

from .common import Case
from .timing import copies_for, rotating

SUITE = "int8"


def _shapes(quick: bool):
    if quick:
        return [(1, 768, 3072), (37, 768, 3072)]
    return [(1, 768, 3072), (8, 768, 3072), (256, 768, 3072), (256, 3072, 768)]


def _torch_dynamic(weight, bias):
    with warnings.catch_warnings():  # torch.ao's deprecation notices: it is what transformers users run today
        warnings.simplefilter("ignore")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear},
                                                      dtype=torch.qint8)[0]


def cases(quick: bool, device: str, dtype: torch.dtype) -> Iterable[Case]:
    from gitfast import int8_backends as B, ops, quantization as Q
    from gitfast.backend_choice import Unfit

    dt = str(dtype).replace("torch.", "")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        yield Case("int8_linear", {}, "gitfast", dt, None,
                   skip_reason="dynamic INT8 runs on the CPU with fp32 activations only")
        return
    chosen = B.backend()
    for rows, k, n in _shapes(quick):
        shape = {"rows": rows, "in": k, "out": n}
        label = f"{rows}x{k}->{n}"
        flops = 2.0 * rows * k * n
        torch.manual_seed(rows + k)
        linear = ops.Linear(k, n)
        inputs = rotating(lambda: (torch.randn(rows, k),), copies_for(4.0 * rows * k, device))
        layer = Q.DynamicInt8Linear.from_linear(linear)
        nbytes = rows * k * 4.0 + n * k + rows * n * 4.0  # fp32 x in, int8 weight, fp32 y out

        def case(provider, fn, reason=None, nbytes=nbytes):
            return Case("int8_linear", shape, provider, dt, fn if reason is None else None, flops=flops,
                        bytes=nbytes, skip_reason=reason, label=label)

        yield case("gitfast", lambda layer=layer: layer(*inputs.next()))
        for name in B.BACKENDS:
            if name == chosen:
                continue
            try:
                B.prepare(name)
            except Unfit as exc:
                yield case(f"gitfast {name}", None, f"{name} is not fit here: {exc}")
                continue
            forced = Q.DynamicInt8Linear.from_linear(linear)
            forced.use(name)
            yield case(f"gitfast {name}", lambda forced=forced: forced(*inputs.next()))
        w, b = linear.weight.detach(), linear.bias.detach()
        dynamic = _torch_dynamic(w, b)
        yield case("torch dynamic int8", lambda dynamic=dynamic: dynamic(*inputs.next()))
        yield case("torch fp32", lambda w=w, b=b: F.linear(*inputs.next(), w, b), nbytes=nbytes + 3.0 * n * k)
