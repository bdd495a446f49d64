"""The public entry points of gitfast's Triton kernels (``gitfast.kernels.api``).

The kernels live in the repository's top-level ``kernels/`` folder, which the package reaches as
``gitfast.kernels`` through the link ``gitfast/kernels -> ../kernels`` (a wheel holds the files
themselves). The folder has no ``__init__.py`` on purpose: ``kernels`` is also the name of a Hugging
Face package that transformers imports, and a *regular* package named ``kernels`` in the repository
root (on ``sys.path`` for ``python -m pytest``, ``python -c``, subprocesses and Ray workers started
there) would shadow it; a folder without ``__init__.py`` is only a namespace portion, which any
installed package of that name outranks. ``tests/test_loading.py`` fails if the shadowing returns.
Triton itself is imported lazily by the kernel modules, so importing this module never needs it.

Public API (signatures are the contract with the model code; see each module's docstring):

- ``git_attention(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=None, sm_scale=None)``
- ``write_kv_cache(k, v, k_cache, v_cache, slot_mapping)``
- ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None)``
- ``paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
  num_image_tokens, sm_scale=None)``
- ``triton_available()``: whether the above can run here; ``triton_importable()``: whether triton imports
- plain-torch references in ``gitfast.kernels.reference`` (``*_reference``)
"""
import functools
import os


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether triton imports here (a GPU or the interpreter is needed too: `triton_available`)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton install must mean "unavailable", not a crash
        return False
    return True


def triton_available() -> bool:
    """True when the Triton kernels can run: triton imports and either CUDA is available or
    Triton's CPU interpreter is on (TRITON_INTERPRET=1, set before the kernels are first used)."""
    if not triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def git_attention(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=None, sm_scale=None):
    """GIT prefix-LM varlen attention; see ``gitfast.kernels.attention.git_attention``."""
    from .attention import git_attention as impl
    return impl(q, k, v, cu_seqlens, num_image_tokens, max_seqlen=max_seqlen, sm_scale=sm_scale)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """Scatter K/V into the paged cache; see ``gitfast.kernels.kv_write.write_kv_cache``."""
    from .kv_write import write_kv_cache as impl
    return impl(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None,
                           **kwargs):
    """Decode attention over the paged cache; see ``gitfast.kernels.paged_decode``."""
    from .paged_decode import paged_decode_attention as impl
    return impl(q, k_cache, v_cache, block_tables, context_lens, sm_scale, **kwargs)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                            num_image_tokens, sm_scale=None, **kwargs):
    """Prefill of new text tokens over a cached prefix; see ``gitfast.kernels.paged_prefill``."""
    from .paged_prefill import paged_prefill_attention as impl
    return impl(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, num_image_tokens,
                sm_scale, **kwargs)


__all__ = [
    "git_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "triton_available",
    "triton_importable",
    "write_kv_cache",
]
