"""The drop-in's generate from `input_ids` (gitfast's own loops) against generate from `inputs_embeds`
(transformers' loop over gitfast's forward) and against transformers' class, on padding masks drawn as
transformers' tests draw them (`random_attention_mask`: first column 1, the rest random), so some rows
end in padding. transformers predicts a right-padded row's first new token from its last column (a
padding query); gitfast's loops predict from the last real token, so such prompts must take
transformers' loop (transformers' test_generate_from_inputs_embeds_0_greedy failed on them)."""
import pytest
import torch
import transformers

import gitfast
from git_factory import make_hf_model, pixels

SEEDS = range(20)
KW = dict(return_dict_in_generate=True, output_scores=True, do_sample=False, max_new_tokens=5, min_new_tokens=5,
          use_cache=True)


def inputs(seed: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.randint(0, 2, (2, 7), generator=g)
    mask[:, 0] = 1
    return ids, mask, pixels("hd32", 2, seed=seed)


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for seed in SEEDS:
        hf = make_hf_model("hd32", seed=seed, lm_scale=1.0, vocab=99)
        hf.generation_config.eos_token_id = None  # exactly 5 new tokens, as transformers' test
        fm = gitfast.GitForCausalLM.from_transformers(hf)
        out[seed] = hf, fm
    return out


def test_the_masks_include_right_padding():
    assert sum(int((inputs(s, 99)[1][:, -1] == 0).any()) for s in SEEDS) >= 5


def close(a, b, tol=1e-5):
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", SEEDS)
def test_scores_from_ids_equal_scores_from_embeds_and_transformers(pairs, seed):
    hf, fm = pairs[seed]
    ids, mask, px = inputs(seed, 99)
    common = dict(attention_mask=mask, pixel_values=px, **KW)
    from_ids = fm.generate(input_ids=ids, **common)
    from_embeds = fm.generate(input_ids=ids, inputs_embeds=fm.get_input_embeddings()(ids).detach(), **common)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, **common)
    for other in (from_embeds, ref):
        assert torch.equal(from_ids.sequences, other.sequences)
        assert len(from_ids.scores) == len(other.scores) == 5
        for a, b in zip(from_ids.scores, other.scores):
            close(b, a)


@pytest.mark.parametrize("seed", SEEDS[:5])
def test_plain_greedy_and_beams_equal_transformers(pairs, seed):
    """The engine's greedy path and the lockstep beam search serve right-padded prompts as transformers."""
    hf, fm = pairs[seed]
    ids, mask, px = inputs(seed, 99)
    for kw in (dict(), dict(num_beams=2)):
        common = dict(attention_mask=mask, pixel_values=px, max_new_tokens=5, min_new_tokens=5, **kw)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, **common)
        assert torch.equal(fm.generate(input_ids=ids, **common), ref)


def test_an_inferred_mask_ending_in_padding_is_served_as_transformers(pairs):
    """Without attention_mask, trailing pad tokens make the inferred mask end in padding."""
    hf, fm = pairs[0]
    ids, _, px = inputs(0, 99)
    ids[ids == hf.config.pad_token_id] = 1
    ids[0, -2:] = hf.config.pad_token_id
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, **KW)
    out = fm.generate(input_ids=ids, pixel_values=px, **KW)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(ref.scores, out.scores):
        close(a, b)


def test_no_pad_and_no_eos_id_infers_no_padding():
    """With neither pad_token_id nor eos_token_id, transformers infers no attention mask: token 0 in a
    prompt is a token like any other (gitfast's stand-in pad of 0 used to mask it)."""
    from transformers import GenerationConfig

    hf = make_hf_model("hd32")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    gc = GenerationConfig(max_new_tokens=4, pad_token_id=None, eos_token_id=None, bos_token_id=101)
    ids = torch.tensor([[101, 0, 7, 0, 9]])
    px = pixels("hd32", 1)
    got = fm.generate(pixel_values=px, input_ids=ids, generation_config=gc)
    want = fm.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    assert torch.equal(got, want)
