"""gitfast: fast inference for Microsoft's GIT image-to-text models.

`gitfast.GitForCausalLM` is a drop-in for `transformers.GitForCausalLM`; `gitfast.Captioner`
captions files, folders and shards. Both are imported on first use, so `import gitfast` stays cheap.

The package's root is the model runtime: `model` (GIT, declarative), what its calls run on (`attention/`,
`ops` with `op_fakes`, `quantization`'s INT8 layers, the backends measured on first use: `backend_choice`,
`bf16_backends`, `fp32_backends`, `int8_backends`), `devices`, and `defaults` (the shipped `assets/`). Every other job has
a room of its own: `checkpoint/` (checkpoint I/O), `serving/` (pixels to tokens), `drop_in/`,
`captioning/`, `explain/` (word maps), `tools/` (the `gitfast` command, `gitfast info`, fidelity),
`training/`; the Triton kernels are `gitfast.kernels` (ARCHITECTURE.md draws the map).
"""
import os

__version__ = "0.1.0"

# OpenMP threads that wait by spinning keep their core while the thread they wait for is descheduled:
# on a shared or oversubscribed CPU every parallel region then costs a scheduler time slice. Passive
# waiting measured 2.4x faster bf16 generate on 2 loaded cores, and 1.13x instead of 1.84x slowdown
# beside a busy process (bench/RESULTS.md). libgomp reads this once, when torch loads it: it takes
# effect when gitfast is imported first (the `gitfast` command always is); a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "GitForCausalLM": ("gitfast.drop_in", "GitForCausalLM"),
    "register_auto_classes": ("gitfast.drop_in", "register_auto_classes"),
    "Captioner": ("gitfast.captioning.captioner", "Captioner"),
    "CaptionResult": ("gitfast.captioning.captioner", "CaptionResult"),
    "CheckpointError": ("gitfast.checkpoint.loading", "CheckpointError"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gitfast' has no attribute {name!r}")
