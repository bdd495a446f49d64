"""GIT's BERT tokenizer on the `tokenizers` library directly, without importing transformers.

transformers 5's `BertTokenizer` is a thin layer over a `tokenizers.Tokenizer` that it rebuilds from
tokenizer.json's vocabulary and tokenizer_config.json's settings: a WordPiece model, the BERT
normalizer and pre-tokenizer, a WordPiece decoder, a [CLS] A [SEP] template, the added tokens (from
tokenizer_config.json's `added_tokens_decoder`, else tokenizer.json's) and the named special tokens.
`BertWordPiece.load` builds that same pipeline (tests/test_bert_tokenizer.py compares the serialised
pipelines and the ids and texts with `AutoTokenizer`'s) for the settings it knows, and returns None for
anything else, which `processor.load` then leaves to `AutoTokenizer`. Methods beyond encoding and
decoding one text are served by transformers' tokenizer, built on first use (`__getattr__`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

NAMED = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}  # BertTokenizer's defaults, in the order it adds the missing ones
_SETTINGS = {"do_lower_case": True, "strip_accents": None, "tokenize_chinese_chars": True,
             "clean_up_tokenization_spaces": False}
# tokenizer_config.json keys that do not change ids or texts (BertTokenizer keeps the slow tokenizer's
# do_basic_tokenize/never_split only as init arguments)
_INERT = {"tokenizer_class", "model_max_length", "processor_class", "backend", "model_input_names",
          "name_or_path", "special_tokens_map_file", "do_basic_tokenize", "never_split"}
_CLASSES = {"BertTokenizer", "BertTokenizerFast"}


@dataclass
class Encoding:
    input_ids: List[int]


class BertWordPiece:
    """Encodes and decodes as transformers' `BertTokenizer` does, for one checkpoint."""

    def __init__(self, backend, named: dict, clean_up_spaces: bool, folder: Path):
        self._backend, self._named, self._clean_up = backend, named, clean_up_spaces
        self._folder, self._transformers_tokenizer = folder, None
        for role, token in named.items():
            setattr(self, role, token)
            setattr(self, f"{role}_id", backend.token_to_id(token))
        self.bos_token = self.eos_token = self.bos_token_id = self.eos_token_id = None  # BERT names neither

    @classmethod
    def load(cls, folder: Path) -> Optional["BertWordPiece"]:
        """The tokenizer of `folder`, or None where its files hold settings this class does not reproduce."""
        plan = _plan(Path(folder))
        if plan is None:
            return None
        return cls(_backend(plan), plan["named"], plan["settings"]["clean_up_tokenization_spaces"], Path(folder))

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if kwargs or not isinstance(text, str):
            return self.transformers_tokenizer()(text, add_special_tokens=add_special_tokens, **kwargs)
        return Encoding(self.encode(text, add_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else list(ids)
        if kwargs or (ids and not isinstance(ids[0], int)):  # a batch, or options this class does not take
            return self.transformers_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up else text

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def transformers_tokenizer(self):
        """transformers' own tokenizer of the checkpoint, built once, on first use."""
        if self._transformers_tokenizer is None:
            from transformers import AutoTokenizer

            self._transformers_tokenizer = AutoTokenizer.from_pretrained(str(self._folder))
        return self._transformers_tokenizer

    def __getattr__(self, name):
        if name.startswith("_"):  # never for the attributes set in __init__ (copy, pickle probe these)
            raise AttributeError(name)
        return getattr(self.transformers_tokenizer(), name)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _plan(folder: Path) -> Optional[dict]:
    """Vocabulary, settings, named and added tokens as BertTokenizer would take them; None where unsure."""
    config, pipeline = _json(folder / "tokenizer_config.json"), _json(folder / "tokenizer.json")
    if config is None or pipeline is None or (folder / "added_tokens.json").exists():
        return None
    if config.get("tokenizer_class") not in _CLASSES or not set(config) <= _INERT | set(_SETTINGS) | set(NAMED) | {
            "added_tokens_decoder"}:
        return None
    model = pipeline.get("model")
    if (not isinstance(model, dict) or model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict)
            or pipeline.get("truncation") is not None or pipeline.get("padding") is not None):
        return None
    named = {role: config.get(role, default) for role, default in NAMED.items()}
    if "added_tokens_decoder" in config:
        added = _added_tokens(config["added_tokens_decoder"])
    else:
        named.update(_json(folder / "special_tokens_map.json") or {})  # the legacy file wins, as in transformers
        added = _added_tokens({str(t.get("id")): t for t in pipeline.get("added_tokens", [])})
    vocab = model["vocab"]
    if (added is None or set(named) != set(NAMED) or not all(isinstance(t, str) and t in vocab for t in named.values())
            or any(vocab.get(t["content"]) != i for i, t in added.items())):
        return None  # tokens outside the vocabulary get new ids: left to transformers
    settings = {key: config.get(key, default) for key, default in _SETTINGS.items()}
    return {"vocab": vocab, "named": named, "added": added, "settings": settings}


def _added_tokens(table) -> Optional[dict]:
    """id -> token fields, from an `added_tokens_decoder`-shaped table; None if any entry is unusual."""
    keys = {"content", "single_word", "lstrip", "rstrip", "normalized", "special"}
    added = {}
    for index, token in (table.items() if isinstance(table, dict) else ()):
        if not isinstance(token, dict) or not str(index).isdigit():
            return None
        fields = {k: v for k, v in token.items() if k not in ("id", "__type")}
        if not set(fields) <= keys or not isinstance(fields.get("content"), str):
            return None
        added[int(index)] = fields
    return added if isinstance(table, dict) else None


def _backend(plan: dict):
    """The `tokenizers.Tokenizer` BertTokenizer.__init__ builds, with the added and named tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    named, settings = plan["named"], plan["settings"]
    backend = Tokenizer(WordPiece(plan["vocab"], unk_token=named["unk_token"]))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings["tokenize_chinese_chars"],
        strip_accents=settings["strip_accents"], lowercase=settings["do_lower_case"])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    added = [AddedToken(**fields) for _, fields in sorted(plan["added"].items())]
    present = {t.content for t in added}
    added += [AddedToken(t, special=True) for t in named.values() if t not in present]
    backend.add_tokens(added)
    cls, sep = named["cls_token"], named["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    return backend


def _json(path: Path):
    """A JSON object file's content; None where the file is missing or not a readable object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
