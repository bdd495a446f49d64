"""generate's options against transformers' class in fp32: transformers' own logits processors applied
to gitfast's logits, per-step scores and logits, attentions and hidden states, the inputs it accepts."""
import pytest
import torch

import gitfast
from gitfast.serving.engine import Engine
from git_factory import make_hf_model, pixels


@pytest.fixture(scope="module")
def pair():
    hf = make_hf_model("hd32")
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


def same(hf, fm, **kw):
    torch.manual_seed(3)
    a = hf.generate(**kw)
    torch.manual_seed(3)
    b = fm.generate(**kw)
    return a, b


PROCESSORS = [dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5], [7, 8]]), dict(remove_invalid_values=True),
              dict(suppress_tokens=[3, 4, 5]), dict(begin_suppress_tokens=[9, 10]), dict(forced_bos_token_id=7),
              dict(forced_eos_token_id=102), dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=102),
              dict(renormalize_logits=True, repetition_penalty=1.3), dict(sequence_bias={(5,): 4.0}),
              dict(do_sample=True, epsilon_cutoff=3e-4), dict(do_sample=True, eta_cutoff=1e-3),
              dict(do_sample=True, typical_p=0.9), dict(do_sample=True, min_p=0.05, top_k=0)]


@pytest.mark.parametrize("kw", PROCESSORS, ids=lambda kw: ",".join(kw))
@pytest.mark.parametrize("beams", [1, 2])
def test_transformers_processors_on_gitfast_logits(pair, kw, beams):
    hf, fm = pair
    a, b = same(*pair, pixel_values=pixels("hd32", 2), max_new_tokens=8, num_beams=beams, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=20), dict(num_beams=3),
                                dict(output_attentions=True, output_hidden_states=True),
                                dict(no_repeat_ngram_size=2, num_beams=2, num_return_sequences=2)])
def test_scores_and_logits_equal_transformers(pair, kw):
    a, b = same(*pair, pixel_values=pixels("hd32", 2), max_new_tokens=6, return_dict_in_generate=True,
                output_scores=True, output_logits=True, **kw)
    assert type(a) is type(b)
    assert torch.equal(a.sequences, b.sequences)
    assert len(b.scores) == len(a.scores) and len(b.logits) == len(a.logits)
    for x, y in zip(a.scores + a.logits, b.scores + b.logits):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    if kw.get("num_beams"):
        torch.testing.assert_close(b.sequences_scores, a.sequences_scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.beam_indices, b.beam_indices)
    if kw.get("output_attentions"):
        assert len(b.attentions) == len(a.attentions)
        for x, y in zip(a.attentions[-1] + a.hidden_states[-1], b.attentions[-1] + b.hidden_states[-1]):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_inputs_transformers_accepts(pair):
    hf, fm = pair
    ids = torch.tensor([[101, 5, 6], [101, 7, 8]])
    emb = hf.get_input_embeddings()(ids)
    a, b = same(*pair, inputs_embeds=emb, max_new_tokens=4)
    assert torch.equal(a, b)
    a, b = same(*pair, max_new_tokens=4)  # no input: from BOS
    assert torch.equal(a, b) and b[0, 0] == 101
    a, b = same(*pair, input_ids=ids, pixel_values=pixels("hd32", 2), max_new_tokens=4,
                position_ids=torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert torch.equal(a, b)
    a, b = same(*pair, inputs=ids, pixel_values=pixels("hd32", 2), max_new_tokens=4, logits_to_keep=1)
    assert torch.equal(a, b)


def test_refusals(pair):
    fm = pair[1]
    with pytest.raises(ValueError, match="num_beams"):
        fm.generate(pixel_values=pixels("hd32", 1), num_beams=0)
    with pytest.raises(TypeError, match="foo"):
        fm.generate(pixel_values=pixels("hd32", 1), foo=1)


def test_plain_greedy_runs_continuously_and_processors_in_lockstep_on_one_engine(pair, monkeypatch):
    """No processor beyond gitfast's own: greedy runs in the engine's continuous mode; a transformers
    processor takes the lockstep mode of the same engine (no cache of its own)."""
    hf, fm = pair
    lockstep_runs, real = [], Engine.run

    def spy(self, requests, settings, seed=0, lockstep=None):
        lockstep_runs.append(lockstep is not None)
        return real(self, requests, settings, seed, lockstep)

    monkeypatch.setattr(Engine, "run", spy)
    fm.free_kv_cache()
    a, b = same(hf, fm, pixel_values=pixels("hd32", 2), max_new_tokens=5, repetition_penalty=1.2)
    assert torch.equal(a, b) and lockstep_runs == [False]
    engine = fm.gitfast_engine
    a, b = same(hf, fm, pixel_values=pixels("hd32", 2), max_new_tokens=5, no_repeat_ngram_size=2)
    assert torch.equal(a, b) and lockstep_runs == [False, True] and fm.gitfast_engine is engine


def test_continuing_from_a_cache_in_generate(pair):
    hf, fm = pair
    ids = torch.tensor([[101, 5, 6]])
    outs = []
    for model in (hf, fm):
        first = model.generate(input_ids=ids, max_new_tokens=3, return_dict_in_generate=True, num_beams=1)
        cache = model(input_ids=first.sequences[:, :-1], use_cache=True).past_key_values
        outs.append(model.generate(input_ids=first.sequences, past_key_values=cache, max_new_tokens=3))
    assert torch.equal(outs[0], outs[1])
