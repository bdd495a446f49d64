"""`gitfast.GitForCausalLM`, the drop-in for `transformers.GitForCausalLM` (causal_lm.py), with its
forward (forward.py), generate routing (generate.py), from_pretrained (pretrained.py) and the
transformers-equal initial weights (init.py)."""
from ..compat import check_transformers

check_transformers()  # an older transformers than gitfast needs: an ImportError naming the fix, not wrong tokens

from .causal_lm import GitForCausalLM  # noqa: E402

__all__ = ["GitForCausalLM"]
