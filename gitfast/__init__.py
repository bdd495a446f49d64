"""gitfast: fast inference for Microsoft's GIT image-to-text models.

`gitfast.GitForCausalLM` is a drop-in for `transformers.GitForCausalLM`; `gitfast.Captioner`
captions files, folders and shards. Both are imported on first use, so `import gitfast` stays cheap.
"""
__version__ = "0.1.0"

_LAZY = {
    "GitForCausalLM": ("gitfast.drop_in", "GitForCausalLM"),
    "Captioner": ("gitfast.captioning.captioner", "Captioner"),
    "CaptionResult": ("gitfast.captioning.captioner", "CaptionResult"),
    "CheckpointError": ("gitfast.loading", "CheckpointError"),
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
