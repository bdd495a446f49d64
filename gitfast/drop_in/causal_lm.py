"""`gitfast.GitForCausalLM`: a drop-in for `transformers.GitForCausalLM`, computed by gitfast.

It subclasses transformers' `PreTrainedModel` and `GenerationMixin` for the plumbing users, trainers
and pipelines rely on (config, generation config, weight tying, resizing embeddings, gradient
checkpointing, `.to()`); every tensor operation is gitfast's (`model.py`), and `generate` runs gitfast's
own loops (`generate.py`). The base model, gitfast's `GitModel`, sits at `.model`; state-dict names are
gitfast's (`model.layers.0.qkv.weight`), checkpoints are read and written with transformers' names.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from transformers import GenerationConfig, GitConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.utils.deprecation import deprecate_kwarg

from .. import quantization
from ..checkpoint import hf_format, loading
from ..devices import placement
from ..model import GitModel, num_image_tokens
from .engine_calls import BLOCK_SIZE
from ..serving.engine import Engine, KeptEngine, batch_budget
from ..serving.exclusive import Exclusive
from .checkpointing import make_checkpointable
from .forward import run as forward_run
from .generate import run as generate_run
from .init import initial_hf_weights
from .pretrained import load as load_pretrained

_FORWARD_EXTRAS = {"shift_labels", "num_items_in_batch"}
# transformers' GIT renamed forward's `past_key_values` to `cache`, warning with this decorator and
# removal version (models/git/modeling_git.py); the drop-in gives the same FutureWarning
_OLD_CACHE_NAME = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")


class GitForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GitConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"model.lm_head.weight": "model.word_embeddings.weight"}
    # generate() runs plain greedy in the engine's continuous batching; False runs it, like sampling
    # and beam search always are, in the engine's lockstep mode (transformers' own loops)
    use_paged_cache = True

    def __init__(self, config: GitConfig):
        super().__init__(config)
        # built without drawing random numbers (post_init draws them as transformers' class does);
        # inside `with torch.device("meta")` the model stays empty, as transformers' does
        target = torch.get_default_device()
        with torch.device("meta"):
            model = GitModel(config)
        self.model = make_checkpointable(model if target.type == "meta" else model.to_empty(device=target))
        self._kept = KeptEngine()  # the engine generate keeps between calls (both its modes)
        self._engine_guard = Exclusive("generate() on this model's engine")  # one call at a time
        self.post_init()

    @torch.no_grad()
    def initialize_weights(self):
        """Draws the initial weights exactly as `transformers.GitForCausalLM(config)` does for the same
        seed (`init.py`; gitfast's fused QKV rows come from the q, k and v draws in transformers' order)."""
        dev, dt = placement(self.model)
        hf = initial_hf_weights(self.config, device=dev, dtype=dt)
        shapes = {k: v.shape for k, v in self.model.state_dict().items()}
        for name, value in hf_format.from_hf_state_dict(hf, self.config, shapes).items():
            owner = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
            if not getattr(owner, "_is_hf_initialized", False):  # as transformers: set once, never redrawn
                self.model.get_parameter(name).copy_(value)
        for module in self.model.modules():
            module._is_hf_initialized = True

    def _init_weights(self, module):
        """One module's init (for modules transformers re-creates, e.g. when resizing embeddings):
        N(0, initializer_range) weights, zero biases, LayerNorms 1/0, as transformers' `_init_weights`."""
        super()._init_weights(module)
        v = getattr(module, "class_embedding", None)
        if v is not None:  # the vision embeddings' own parameters
            std = self.config.vision_config.initializer_range
            for p in (module.class_embedding, module.patch_embedding, module.position_embedding):
                torch.nn.init.normal_(p, std=std)

    # --- embeddings ------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value
        self.free_kv_cache()

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.model.lm_head = new_embeddings
        self.free_kv_cache()

    # --- loading and saving ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, state_dict=None,
                        output_loading_info=False, dtype=None, torch_dtype=None, device_map=None, device=None,
                        revision: Optional[str] = None, cache_dir: Optional[str] = None, attn_implementation=None,
                        ignore_mismatched_sizes=False, token=None, local_files_only=False, quantization_config=None,
                        subfolder: str = "", force_download: bool = False, use_safetensors: Optional[bool] = None,
                        **kwargs):
        """Loads a GIT checkpoint (a folder or a hub id) with transformers' arguments.

        `pretrained_model_name_or_path=None` takes `config=` and `state_dict=` (transformers' or
        gitfast's own names). `output_loading_info=True` returns `(model, info)` and loads leniently,
        as transformers does (missing tensors keep their initial values and are listed). `attn_implementation`
        is accepted for compatibility: "eager", "sdpa" and None all mean gitfast's attention (fused
        kernels; plain torch when probabilities are asked for); others are refused. Inside a
        `torch.device("meta")` context this raises, as transformers does. `quantization_config="dynamic"`
        makes the Linear layers dynamic INT8 (CPU only; gitfast.quantization). `subfolder`,
        `force_download` and `use_safetensors` (None: safetensors, else `.bin`; True: safetensors only;
        False: `.bin` only) as transformers reads them, through huggingface_hub (gitfast.checkpoint.hub).
        """
        quantization.method_of(quantization_config)  # an unknown method fails before any loading
        # transformers' Auto classes always pass adapter_kwargs (hub arguments for a PEFT adapter search);
        # they name an adapter only when the checkpoint is one
        if (kwargs.pop("adapter_kwargs", None) or {}).get("_adapter_model_path"):
            raise NotImplementedError(f"{pretrained_model_name_or_path} is a PEFT adapter; gitfast loads full GIT "
                                      "checkpoints (merge the adapter into its base model and save that)")
        harmless = {"low_cpu_mem_usage", "trust_remote_code", "proxies", "_from_auto", "_from_pipeline"}
        unknown = set(kwargs) - harmless
        if model_args or unknown:
            raise TypeError(f"from_pretrained() got unsupported arguments: {', '.join(sorted(unknown)) or model_args}")
        if attn_implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"attn_implementation={attn_implementation!r}: gitfast runs its own attention; "
                             "use None, 'eager' or 'sdpa'")
        hub = {k: v for k, v in (("token", token), ("local_files_only", local_files_only), ("subfolder", subfolder),
                                 ("force_download", force_download)) if v}
        loaded = load_pretrained(cls, pretrained_model_name_or_path, config=config, state_dict=state_dict,
                               output_loading_info=output_loading_info,
                               dtype=dtype if dtype is not None else torch_dtype,
                               device=device if device is not None else device_map, revision=revision,
                               cache_dir=cache_dir, ignore_mismatched_sizes=ignore_mismatched_sizes, hub_kwargs=hub,
                               use_safetensors=use_safetensors)
        quantization.quantize((loaded[0] if output_loading_info else loaded).model, quantization_config)
        return loaded

    @classmethod
    def from_transformers(cls, hf_model, dtype=None, device=None, quantization_config=None):
        """Converts an in-memory `transformers.GitForCausalLM` into gitfast's layout.

        Tensors whose layout is unchanged are shared with `hf_model`, not copied (no second copy in
        memory); the fused QKV weights are new. Don't modify one model's weights expecting the other
        to stay as it was.
        """
        if getattr(hf_model.config, "model_type", None) != "git":
            raise loading.CheckpointError(f"expected a GIT model, got model_type {hf_model.config.model_type!r}")
        dev, dt = placement(hf_model)
        model = cls._from_weights(copy.deepcopy(hf_model.config), hf_model.state_dict(), dtype or dt, device or dev)
        model.generation_config = GenerationConfig.from_dict(hf_model.generation_config.to_dict())
        quantization.quantize(model.model, quantization_config)
        return model

    @classmethod
    def _from_weights(cls, config, hf_weights, dtype, device):
        return cls._wrap(config, loading.build_model(config, hf_weights, dtype, device))

    @classmethod
    def _wrap(cls, config, model: GitModel) -> "GitForCausalLM":
        with torch.device("meta"):  # the placeholder GitModel costs nothing; the loaded one replaces it
            wrapper = cls(config)
        wrapper.model = make_checkpointable(model)
        wrapper.tie_weights()
        return wrapper.eval()

    def save_pretrained(self, save_directory, **kwargs):
        """Writes a transformers-compatible checkpoint: config.json, generation_config.json, model.safetensors."""
        hf_format.save(self.model, self.config, save_directory, self.generation_config)

    # --- forward and generate --------------------------------------------------------------------
    @_OLD_CACHE_NAME
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, inputs_embeds=None,
                labels=None, cache=None, use_cache=None, interpolate_pos_encoding=False, logits_to_keep=0,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        """transformers' GIT forward: logits over `[image | text]` positions, the next-token loss on the
        text when `labels` (or pre-shifted `shift_labels`) are given, the keys and values as a
        `DynamicCache` when `use_cache` (default `config.use_cache`), attention probabilities and hidden
        states when asked. Continues from `cache` (the deprecated `past_key_values` is taken for it with
        transformers' warning): positions then count from the cache's length, image tokens included, as
        transformers'; pass `position_ids` for text positions."""
        unknown = set(kwargs) - _FORWARD_EXTRAS
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        return forward_run(self, input_ids, attention_mask, position_ids, pixel_values, inputs_embeds, labels,
                                cache, use_cache, interpolate_pos_encoding, logits_to_keep, output_attentions,
                                output_hidden_states, return_dict, **kwargs)

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 prefix_allowed_tokens_fn=None, **kwargs):
        """transformers-compatible `generate`: same arguments, same outputs (see `generate.py` for
        which path serves which call)."""
        return generate_run(self, inputs, generation_config, logits_processor, stopping_criteria,
                             prefix_allowed_tokens_fn, **kwargs)

    # --- the engine generate keeps ---------------------------------------------------------------
    def _engine_for(self, rows: int, images: int, prompt_len: int, s) -> Engine:
        """The engine kept between generate calls, rebuilt only when this call needs more."""
        budget = batch_budget(self.model, s, rows, images, prompt_len, block_size=BLOCK_SIZE)
        return self._kept.get(self.model, rows, budget, block_size=BLOCK_SIZE)

    @property
    def gitfast_engine(self) -> Optional[Engine]:
        """The engine `generate` keeps between calls (None before the first call gitfast's loops serve,
        or after `free_kv_cache()`)."""
        return self._kept.engine

    def free_kv_cache(self) -> None:
        """Releases the engine (its KV-cache pools and CUDA graphs) that generate keeps between calls."""
        self._kept.free()

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.config)
