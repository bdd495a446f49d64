"""`gitfast info`: versions, devices, and which backend serves each fused op on each device."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    devices = [{
        "name": "cpu",
        "description": platform.processor() or platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({
                "name": f"cuda:{i}",
                "description": p.name,
                "capability": f"sm_{p.major}{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
            })
    return devices


def collect() -> dict:
    """Everything `gitfast info` reports, as plain data."""
    from .. import __version__, ops

    loaded = ops.extension_loaded()
    return {
        "versions": {
            "gitfast": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "devices": _devices(),
        "extension": {
            "loaded": loaded,
            "cuda_kernels": bool(loaded and ops.backend("bias_act", "cuda") == "cuda ext"),
            "cuda_build_note": _build_note() if loaded else None,
            "cpu_isa": _cpu_isa(),
            "cpu_isa_choice": _cpu_isa_choice(),
        },
        # the cuda column is what a CUDA tensor would get, also on a machine without a GPU
        "ops": {op: {kind: ops.backend(op, kind) for kind in ("cpu", "cuda")} for op in ops.OPS},
        "attention": _attention_backends(),
        "linear": _linear_backends(),
    }


def _linear_backends() -> dict:
    """The GEMMs behind the model's Linear layers: fp32 at decode rows, bf16 (pre-packed or not), a bf16
    model's fp32 logits and dynamic INT8's; each row from the decision the layer itself reads
    (fp32_backends.describe, ops.linear_backend, ops.logits_backend, int8_backends.decision:
    gitfast.backend_choice's measurements)."""
    from .. import fp32_backends, int8_backends, ops

    return {"linear_fp32": {"cpu": fp32_backends.describe("cpu"), "cuda": "torch"},
            "linear_bf16": {"cpu": _with_times(ops.linear_backend("cpu", torch.bfloat16), "linear_bf16"),
                            "cuda": "torch"},
            "logits_bf16": {"cpu": ops.logits_backend("cpu"), "cuda": ops.logits_backend("cuda")},
            "linear_int8": {"cpu": int8_backends.decision().summary(), "cuda": "refused (CPU only)"},
            "linear_int8_image": {"cpu": int8_backends.image_decision().summary(), "cuda": "refused (CPU only)"}}


def _with_times(row: str, kind: str) -> str:
    """`row`, then the measurement behind `kind`'s decision where one was made: "(measured; ...)"."""
    from ..backend_choice import decided

    made = decided(kind)
    return row if made is None else f"{row} {made.summary()[len(made.chosen):].strip()}"


def _build_note():
    from .. import ops

    return getattr(ops.extension(), "cuda_build_note", None)


def _cpu_isa():
    """The vector ISA the extension's CPU attention runs (None without the extension)."""
    from ..attention import cpu_backend

    return cpu_backend.isa() if cpu_backend.available() else None


def _cpu_isa_choice():
    """How that ISA was chosen, with the measured times (None without the extension)."""
    from ..attention import cpu_backend

    return cpu_backend.decision().summary() if cpu_backend.available() else None


def _attention_backends() -> dict:
    """Attention: Triton kernels on CUDA when triton imports, the extension's C++ kernels on the CPU
    when built (the vision encoder's unmasked attention: the kernel or SDPA, as measured), PyTorch
    otherwise."""
    try:
        from ..kernels.api import triton_importable
        triton_ok = triton_importable()
    except Exception:  # noqa: BLE001 - reporting only
        triton_ok = False
    cuda = "triton" if triton_ok else "torch sdpa"
    cpu = "cpu ext" if _cpu_isa() else "torch sdpa"
    return {"git_attention": {"cpu": cpu, "cuda": cuda}, "vision_attention": {"cpu": _vision_cpu(), "cuda": cuda},
            "paged_decode": {"cpu": cpu, "cuda": cuda}, "paged_prefill": {"cpu": cpu, "cuda": cuda},
            "write_kv_cache": {"cpu": cpu if cpu == "cpu ext" else "torch index", "cuda": cuda}}


def _vision_cpu() -> str:
    """The vision encoder's attention on the CPU, with the measurement: "cpu ext (measured; ...)" or
    "torch sdpa (...)"."""
    if not _cpu_isa():
        return "torch sdpa"
    from ..attention import cpu_backend

    chosen = cpu_backend.vision_decision().chosen
    return _with_times("cpu ext" if chosen == "cpu ext" else "torch sdpa", cpu_backend.VISION_KIND)


def problems(info: dict) -> list:
    """What makes this install slower than it should be here, loudly: a GPU the extension was built
    without kernels for (every fused op would quietly run its plain-torch reference)."""
    out = []
    gpus = [d for d in info["devices"] if d["name"].startswith("cuda")]
    ext = info["extension"]
    if gpus and not ext["cuda_kernels"]:
        why = ext["cuda_build_note"] or ("gitfast._C is not built" if not ext["loaded"] else "built without CUDA")
        out.append(f"a CUDA device is present but gitfast._C has no CUDA kernels ({why}); rebuild with the CUDA "
                   "toolkit: GITFAST_REQUIRE_CUDA=1 pip install --no-build-isolation -e .")
    return out


def _text(info: dict) -> str:
    v = info["versions"]
    lines = [f"gitfast {v['gitfast']}  (python {v['python']})"]
    lines.append(f"torch {v['torch']}" + (f"  (CUDA {v['torch_cuda']})" if v["torch_cuda"] else "  (no CUDA)"))
    for name in ("triton", "transformers"):
        lines.append(f"{name} {v[name] or 'not installed'}")
    lines.append("devices:")
    for d in info["devices"]:
        if d["name"] == "cpu":
            lines.append(f"  cpu      {d['description']}, {d['isa']}, {d['threads']} threads")
        else:
            lines.append(f"  {d['name']:<8} {d['description']}, {d['capability']}, {d['memory_gib']} GiB")
    if not any(d["name"].startswith("cuda") for d in info["devices"]):
        lines.append("  (no CUDA device)")
    ext = info["extension"]
    state = "not built (ops use the plain-torch reference)" if not ext["loaded"] else (
        "loaded, CPU and CUDA kernels" if ext["cuda_kernels"] else "loaded, CPU kernels only")
    lines.append(f"extension gitfast._C: {state}")
    if ext.get("cuda_build_note"):
        lines.append(f"  CUDA build: {ext['cuda_build_note']}")
    if ext.get("cpu_isa"):
        lines.append(f"  CPU attention ISA: {ext.get('cpu_isa_choice') or ext['cpu_isa']}")
    lines.append("ops (backend per device):")
    rows = {**info["ops"], **info["attention"], **info.get("linear", {})}
    # cpu last: its measured decisions run long
    op_w, cuda_w = max(map(len, [*rows, "op"])), max(len(r["cuda"]) for r in rows.values())
    lines.append(f"  {'op':<{op_w}} {'cuda':<{cuda_w}} cpu")
    for op, by_device in rows.items():
        lines.append(f"  {op:<{op_w}} {by_device['cuda']:<{cuda_w}} {by_device['cpu']}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    info = collect()
    info["problems"] = problems(info)
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if args.json else _text(info))
    for p in info["problems"]:
        sys.stderr.write(f"gitfast info: ERROR: {p}\n")
    return 1 if info["problems"] else 0
