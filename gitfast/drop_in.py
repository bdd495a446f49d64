"""`gitfast.GitForCausalLM`: a drop-in for `transformers.GitForCausalLM`, computed by gitfast.

It subclasses transformers' `PreTrainedModel` and `GenerationMixin` only for the plumbing users and
pipelines rely on (`config`, `generation_config`, `device`, `dtype`, `.to()`, `can_generate()`);
every tensor operation is gitfast's (`model.py`), and `generate` is gitfast's own loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GitConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import attention, loading
from .devices import placement
from .model import GitModel, num_image_tokens
from .serving import generation, paged_generate
from .serving.engine import Engine
from .compat import check_transformers; check_transformers()  # noqa: E702 (transformers<5.18: an ImportError naming the fix, not wrong tokens)


class GitForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GitConfig
    base_model_prefix = "gitfast"
    main_input_name = "input_ids"
    _supports_cache_class = False
    # generate() runs plain greedy through the engine (continuous batching); False runs it, like
    # sampling and beam search always are, under transformers' own loops with rows in lockstep
    use_paged_cache = True

    def __init__(self, config: GitConfig):
        super().__init__(config)
        self.model = GitModel(config)
        self._engine: Optional[Engine] = None

    def _init_weights(self, module):  # weights always come from a checkpoint
        pass

    # --- loading and saving ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, *, torch_dtype=None, dtype=None, device=None, device_map=None,
                        revision: Optional[str] = None, cache_dir: Optional[str] = None, **kwargs):
        """Loads a GIT checkpoint folder, or a hub id from the local Hugging Face cache (never downloads)."""
        harmless = {"low_cpu_mem_usage", "use_safetensors", "trust_remote_code", "local_files_only"}
        unknown = set(kwargs) - harmless
        if unknown:
            raise TypeError(f"from_pretrained() got unsupported arguments: {', '.join(sorted(unknown))}")
        ck = loading.load_checkpoint(name_or_path, dtype=dtype if dtype is not None else torch_dtype,
                                     device=device if device is not None else device_map,
                                     revision=revision, cache_dir=cache_dir)
        model = cls._wrap(ck.config, ck.model)
        model.generation_config = ck.generation_config
        model.name_or_path = str(name_or_path)
        model.config._name_or_path = str(name_or_path)
        return model

    @classmethod
    def from_transformers(cls, hf_model, dtype=None, device=None):
        """Converts an in-memory `transformers.GitForCausalLM` into gitfast's layout.

        Tensors whose layout is unchanged are shared with `hf_model`, not copied (no second copy in
        memory); the fused QKV weights are new. Don't modify one model's weights expecting the other
        to stay as it was.
        """
        if getattr(hf_model.config, "model_type", None) != "git":
            raise loading.CheckpointError(f"expected a GIT model, got model_type {hf_model.config.model_type!r}")
        dev, dt = placement(hf_model)
        model = cls._from_weights(hf_model.config, hf_model.state_dict(), dtype or dt, device or dev)
        model.generation_config = GenerationConfig.from_dict(hf_model.generation_config.to_dict())
        return model

    @classmethod
    def _from_weights(cls, config, hf_weights, dtype, device):
        return cls._wrap(config, loading.build_model(config, hf_weights, dtype, device))

    @classmethod
    def _wrap(cls, config, model: GitModel) -> "GitForCausalLM":
        with torch.device("meta"):  # the placeholder GitModel costs nothing; the loaded one replaces it
            wrapper = cls(config)
        wrapper.model = model
        return wrapper.eval()

    def save_pretrained(self, save_directory, **kwargs):
        """Writes a transformers-compatible checkpoint: config.json, generation_config.json, model.safetensors."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(out))
        self.generation_config.save_pretrained(str(out))
        save_file(loading.to_hf_state_dict(self.model.state_dict(), self.config), str(out / loading.SAFE_SINGLE),
                  metadata={"format": "pt"})

    # --- forward --------------------------------------------------------------------------------
    def _image_tokens(self, pixel_values, text_batch, interpolate_pos_encoding=False):
        dev, dt = placement(self.model)
        if pixel_values is None:
            return torch.empty(text_batch, 0, self.config.hidden_size, dtype=dt, device=dev)
        tokens = self.model.encode_images(pixel_values.to(device=dev, dtype=dt), interpolate_pos_encoding)
        if tokens.shape[0] != text_batch:
            if text_batch % tokens.shape[0]:
                raise ValueError(f"{text_batch} text rows cannot share {tokens.shape[0]} images; the text batch "
                                 "must be a multiple of the image batch")
            tokens = tokens.repeat(text_batch // tokens.shape[0], 1, 1)  # as transformers: tiled, not interleaved
        return tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, inputs_embeds=None,
                labels=None, past_key_values=None, use_cache=None, interpolate_pos_encoding=False,
                return_dict=None, logits_to_keep=0, **kwargs):
        """Logits over `[image | text]` positions (and the next-token loss on text when `labels` are given)."""
        if past_key_values is not None:
            raise NotImplementedError("gitfast keeps its KV cache inside generate(); call forward on whole sequences")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        m = self.model
        dev, _ = placement(m)
        if input_ids is not None:
            input_ids = input_ids.to(dev)
            words = m.word_embeddings(input_ids)
        else:
            words = inputs_embeds.to(dev)
        b, t = words.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(t, device=dev).expand(b, t)
        from . import ops
        text = ops.add_layer_norm(words, m.position_embeddings(position_ids.to(dev)), m.embed_ln.weight,
                                  m.embed_ln.bias, m.embed_ln.eps)[0]
        image = self._image_tokens(pixel_values, b, interpolate_pos_encoding)
        n_img = image.shape[1]
        mask = None if attention_mask is None else attention_mask.to(dev)
        h = m.decode(torch.cat([image, text], dim=1),
                     lambda layer, q, k, v: attention.prefill(q, k, v, n_img, mask))
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = m.lm_head(h)
        loss = None
        if labels is not None:
            shifted = logits[:, n_img:-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].to(dev).reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # --- generate -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, generation_config=None,
                 interpolate_pos_encoding=False, **kwargs):
        """transformers-compatible `generate`: same arguments, same token tensor (prompt included)."""
        for ignored in ("logits_processor", "stopping_criteria", "streamer", "assistant_model", "prefix_allowed_tokens_fn"):
            if kwargs.get(ignored) is not None:
                raise NotImplementedError(f"gitfast's generate does not support {ignored}")
            kwargs.pop(ignored, None)
        kwargs.pop("use_cache", None)
        kwargs.pop("token_type_ids", None)  # some BERT tokenizers emit it; GIT has no token types
        dev, dtype = placement(self.model)
        gc = generation_config if generation_config is not None else self.generation_config
        if input_ids is None:
            if pixel_values is None:
                raise ValueError("generate() needs pixel_values, input_ids, or both")
            bos = gc.bos_token_id if gc.bos_token_id is not None else self.config.bos_token_id
            input_ids = torch.full((pixel_values.shape[0], 1), bos, dtype=torch.long, device=dev)
        input_ids = input_ids.to(dev)
        b, t = input_ids.shape
        s = generation.resolve_settings(self.generation_config, t, generation_config, **kwargs)
        if attention_mask is None:
            # as transformers: padding is inferred from pad tokens unless pad == EOS
            if s.pad is not None and s.pad not in s.eos and bool((input_ids == s.pad).any()):
                attention_mask = (input_ids != s.pad).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        if s.max_length <= t:
            raise ValueError(f"max_length ({s.max_length}) leaves no room after the {t}-token prompt; "
                             "set max_new_tokens")

        expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
        continuous = (self.use_paged_cache and not s.do_sample and not s.output_scores and s.min_length == 0
                      and not interpolate_pos_encoding and s.num_beams == 1 and expand == 1)
        scores = seq_scores = None
        if continuous:
            if pixel_values is not None:
                pixel_values = pixel_values.to(dev, dtype)
                image_of_row = [i % pixel_values.shape[0] for i in range(b)]  # tiled, as transformers
                if b % pixel_values.shape[0]:
                    raise ValueError(f"{b} text rows cannot share {pixel_values.shape[0]} images")
            else:
                image_of_row = None
            engine = self._engine_for(b, 0 if pixel_values is None else pixel_values.shape[0], t, s)
            seqs = paged_generate.greedy(engine, pixel_values, input_ids, attention_mask, s, image_of_row)
        else:  # transformers' own loops, rows in lockstep (its exact RNG use when sampling)
            image = self._image_tokens(pixel_values, b, interpolate_pos_encoding)
            seqs, loop_scores = paged_generate.lockstep(
                self.model, image, input_ids, attention_mask, s, expand,
                lambda pads, vocab: generation.Processor(s, t, pads, vocab, dev))
            if s.num_beams > 1:
                seq_scores = loop_scores
            else:
                scores = loop_scores
        if not s.return_dict:
            return seqs
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
        if s.num_beams > 1:
            return GenerateBeamDecoderOnlyOutput(sequences=seqs, sequences_scores=seq_scores)
        return GenerateDecoderOnlyOutput(sequences=seqs, scores=tuple(scores) if s.output_scores else None)

    def _engine_for(self, rows: int, images: int, prompt_len: int, s) -> Engine:
        """The engine kept between generate calls, rebuilt only when this call needs more."""
        budget = paged_generate.engine_budget(self.model, rows, images, prompt_len, s)
        if not paged_generate.engine_serves(self._engine, self.model, rows, budget):
            self._engine = None  # let the old pools go before allocating new ones
            self._engine = Engine(self.model, max_batch_size=rows, kv_cache_bytes=budget,
                                  block_size=paged_generate.BLOCK_SIZE)
        return self._engine

    @property
    def gitfast_engine(self) -> Optional[Engine]:
        """The engine `generate` keeps between calls (None before the first greedy call, or after
        `free_kv_cache()`)."""
        return self._engine

    def free_kv_cache(self) -> None:
        """Releases the engine (its KV-cache pools and CUDA graphs) that generate keeps between calls."""
        self._engine = None

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.config)
