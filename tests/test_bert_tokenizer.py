"""Issue #25 item 1: GIT's BERT tokenizer on the `tokenizers` library (gitfast/checkpoint/bert_tokenizer.py) encodes
and decodes exactly as transformers' AutoTokenizer does — same pipeline, same ids, same texts, same
special-token ids — on the test checkpoints, the embedded model, and tokenizer files with other
settings; files with settings it does not reproduce are left to AutoTokenizer."""
import json
import random
import shutil

import pytest
from transformers import AutoTokenizer, BertTokenizer

from gitfast.checkpoint import processor
from gitfast.checkpoint.bert_tokenizer import BertWordPiece
from gitfast.defaults import EMBEDDED_MODEL

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "on", "mat", "run", "##ning", "##s", "un", "##able", "don", "'", "t", "it",
         "we", "re", "##re", "cafe", "café", "naive", "naïve", "e", "é", "##é", "中", "文", "日", "本", "n", "ñ",
         "ü", "hello", "world", "Hello", "World", "THE", "über", "uber", "1", "2", "##0", "##00", "..."]
PUNCT = list(".,!?;:'\"()[]-/#&%$@*+=<>")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
VOCAB = SPECIAL + WORDS + PUNCT + LETTERS + ["##" + c for c in LETTERS] + [str(d) for d in range(10)]

TEXTS = [
    "", " ", "\t\n", "the cat", "The Cat on THE mat.", "running unable", "don't it's we're I'm you've",
    "hello , world ! is it ? yes . no", "a ' b ' c", "café naïve über Ünïcödé", "caf\u00e9 vs cafe\u0301",
    "中文 日本", "中文日本語", "emoji 🙂 here", "zero\u200bwidth", "ctrl\x00char\x07s", "[CLS] the [SEP] cat [MASK]",
    "[cls] lower [sep]", "[MASK]ed", "x" * 150, "supercalifragilisticexpialidocious", "1000 200 3.5",
    "Hello World", "ÀÉÎÕÜ àéîõü", "ﬁ ligature", "tab\tand\nnewline", "  leading and trailing  ",
    " ".join(["the cat ran on the mat"] * 120),
]


def make_folder(tmp_path, name, edit_config=None, **settings):
    """A tokenizer saved by transformers' BertTokenizer (as checkpoints are), then its config edited."""
    folder = tmp_path / name
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, **settings).save_pretrained(str(folder))
    if edit_config is not None:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    return folder


def assert_same(folder):
    ours, theirs = BertWordPiece.load(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours is not None, "fell back to transformers"
    assert json.loads(ours._backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for role in ("cls", "sep", "pad", "unk", "mask", "bos", "eos"):
        assert getattr(ours, f"{role}_token_id") == getattr(theirs, f"{role}_token_id"), role
    assert len(ours) == len(theirs)
    for text in TEXTS:
        for special in (False, True):
            ids = ours(text, add_special_tokens=special).input_ids
            assert ids == theirs(text, add_special_tokens=special).input_ids, (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    for _ in range(200):  # arbitrary id sequences, special ids among them, as a model may generate
        ids = [rng.randrange(len(theirs)) for _ in range(rng.randrange(0, 12))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), ids
    return ours, theirs


def test_embedded_model():
    assert_same(EMBEDDED_MODEL)


def test_test_checkpoint(checkpoint):
    ours, theirs = assert_same(checkpoint)
    assert ours.decode([2, 5, 3, 0], skip_special_tokens=True) == theirs.decode([2, 5, 3, 0], skip_special_tokens=True)


@pytest.mark.parametrize("settings", [
    {}, {"do_lower_case": False}, {"strip_accents": True}, {"strip_accents": False, "do_lower_case": False},
    {"tokenize_chinese_chars": False}, {"clean_up_tokenization_spaces": True},
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_settings(tmp_path, settings):
    ours, _ = assert_same(make_folder(tmp_path, "tok", **settings))
    assert ours._clean_up is bool(settings.get("clean_up_tokenization_spaces"))


def test_legacy_and_git_base_style_files(tmp_path):
    def git_base_like(config):
        config.update(do_basic_tokenize=True, never_split=None, name_or_path="bert-base-uncased",
                      special_tokens_map_file=None, model_max_length=512, tokenizer_class="BertTokenizerFast")
    folder = make_folder(tmp_path, "legacy", git_base_like)
    (folder / "special_tokens_map.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]"}))
    assert_same(folder)


def test_the_legacy_special_tokens_map_wins_over_the_config(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(EMBEDDED_MODEL, folder)
    edit_json(folder / "tokenizer_config.json", sep_token="[END]")
    assert assert_same(folder)[0].sep_token == "[SEP]"


def test_added_tokens_decoder_in_the_config(tmp_path):
    added = {str(VOCAB.index(t)): {"content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": t == "hello", "special": t != "hello"}
             for t in SPECIAL + ["hello"]}
    assert_same(make_folder(tmp_path, "decoder", lambda c: c.update(added_tokens_decoder=added)))


@pytest.mark.parametrize("edit", [
    lambda folder: (folder / "tokenizer.json").unlink(),
    lambda folder: edit_json(folder / "tokenizer_config.json", tokenizer_class="RobertaTokenizer"),
    lambda folder: edit_json(folder / "tokenizer_config.json", add_prefix_space=True),
    lambda folder: edit_json(folder / "special_tokens_map.json", sep_token="[END]"),
    lambda folder: edit_json(folder / "tokenizer.json", truncation={"max_length": 4, "strategy": "LongestFirst",
                                                                    "stride": 0, "direction": "Right"}),
    lambda folder: (folder / "added_tokens.json").write_text("{}"),
], ids=["no tokenizer.json", "other class", "unknown setting", "token outside the vocabulary", "truncation",
        "added_tokens.json"])
def test_files_it_does_not_reproduce_are_left_to_transformers(tmp_path, edit):
    folder = tmp_path / "copy"
    shutil.copytree(EMBEDDED_MODEL, folder)
    edit(folder)
    assert BertWordPiece.load(folder) is None
    assert not isinstance(processor.load_tokenizer(folder), BertWordPiece)


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_other_methods_are_transformers(checkpoint):
    ours, theirs = BertWordPiece.load(checkpoint), AutoTokenizer.from_pretrained(str(checkpoint))
    assert ours.convert_ids_to_tokens([2, 5, 6]) == theirs.convert_ids_to_tokens([2, 5, 6])
    assert ours.batch_decode([[5, 6], [7]]) == theirs.batch_decode([[5, 6], [7]])
    assert ours(["a b", "c"]).input_ids == theirs(["a b", "c"]).input_ids
    assert ours.decode([[5, 6], [7]]) == theirs.decode([[5, 6], [7]])
