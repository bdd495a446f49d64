"""`gitfast.GitForCausalLM`, the drop-in for `transformers.GitForCausalLM` (causal_lm.py), with its
forward (forward.py), generate routing (generate.py), from_pretrained (pretrained.py) and the
transformers-equal initial weights (init.py), gradient checkpointing through transformers'
layer class (checkpointing.py) and the opt-in for transformers' Auto classes (auto.py)."""
from ..checkpoint.compat import check_transformers

check_transformers()  # an older transformers than gitfast needs: an ImportError naming the fix, not wrong tokens

from .auto import register_auto_classes  # noqa: E402
from .causal_lm import GitForCausalLM  # noqa: E402

__all__ = ["GitForCausalLM", "register_auto_classes"]
