"""Argument checks and launch helpers shared by gitfast's Triton kernels (no Triton import here)."""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch

# Head sizes the kernels are built and tested for. GIT checkpoints all use 64; the others are padded
# to the next power of two inside the kernels with masked loads.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2, so scores are pre-scaled by it


# Triton's CPU interpreter before 3.8 cannot run loops whose bounds derive from program ids (it
# hands range() one-element arrays); compiled for a GPU, 3.6 and later build every kernel
# (tests/test_kernels_compile.py, run with 3.6 and 3.9).
MIN_INTERPRETER = (3, 8)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    _check_interpreter_version()
    return True


@functools.lru_cache(maxsize=None)
def _check_interpreter_version() -> None:
    import triton

    version = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_INTERPRETER:
        raise RuntimeError(
            f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run gitfast's "
            f"kernels; it needs triton>={'.'.join(map(str, MIN_INTERPRETER))}. (On a GPU, without "
            "TRITON_INTERPRET, triton>=3.6 compiles them.)")


def launch_device(device: torch.device):
    """Context to launch kernels in: Triton launches on the *current* CUDA device and its current
    stream, so tensors on `cuda:1` need that device made current (its stream follows). A no-op for
    CPU tensors and under the interpreter; entering torch.cuda.device costs ~1 us."""
    if device.type != "cuda" or interpreting():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim={head_dim} is not supported by gitfast's Triton attention kernels; "
            f"supported: {SUPPORTED_HEAD_DIMS} (use the plain-torch reference for other sizes)"
        )


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device; got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"gitfast's Triton kernels need CUDA tensors (got {dev}); on CPU use the plain-torch "
            "references in gitfast.kernels.reference, or set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels in Triton's (slow) interpreter"
        )


def index_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An index tensor (cu_seqlens, context_lens, slot_mapping, block_tables) as `dtype`, packed:
    the kernels step through it with unit strides. No copy when it already is."""
    return t.to(dtype).contiguous()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any token/head strides but need the head_dim axis packed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def per_seq_image_tokens(num_image_tokens, batch: int, device: torch.device):
    """(tensor_or_None, int): a per-sequence int32 tensor, or one count shared by the batch."""
    if isinstance(num_image_tokens, torch.Tensor):
        if num_image_tokens.dim() == 0:
            return None, int(num_image_tokens.item())
        if num_image_tokens.shape != (batch,):
            raise ValueError(
                f"num_image_tokens must be an int or a [batch]={batch} tensor, got shape "
                f"{tuple(num_image_tokens.shape)}"
            )
        return index_tensor(num_image_tokens.to(device), torch.int32), 0
    return None, int(num_image_tokens)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32 on tensor cores: the fp32 path is the exact one.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """K/V pools `[num_blocks, block_size, heads, head_dim]` matching q's heads and head_dim."""
    num_heads, head_dim = q.shape[1:]
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != q.shape[1:]:
        raise ValueError(f"caches must be [num_blocks, block_size, {num_heads}, {head_dim}]; got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
