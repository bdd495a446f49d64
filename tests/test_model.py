"""gitfast's model against transformers' on random checkpoints: logits, loss, generation."""
import pytest
import torch

import gitfast
from git_factory import CONFIGS, make_hf_model, pixels


def on_both_paths(fm, call):
    """Runs `call()` with generate on the paged cache (engine) and on the plain path; both must agree."""
    fm.use_paged_cache = True
    paged = call()
    fm.use_paged_cache = False
    plain = call()
    fm.use_paged_cache = True
    assert torch.equal(paged, plain), (paged, plain)
    return paged


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = make_hf_model(request.param)
    return request.param, hf, gitfast.GitForCausalLM.from_transformers(hf)


def test_logits_and_loss_match(pair):
    name, hf, fm = pair
    px = pixels(name, 3)
    ids = torch.tensor([[101, 5, 6, 7, 8], [101, 9, 10, 11, 12], [101, 40, 41, 42, 43]])
    labels = ids.clone()
    labels[1, 3:] = -100
    with torch.no_grad():
        a = hf(input_ids=ids, pixel_values=px, labels=labels)
        b = fm(input_ids=ids, pixel_values=px, labels=labels)
    assert b.logits.shape == a.logits.shape  # image positions included, as transformers
    assert rel_err(b.logits, a.logits) < 1e-4
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)


def test_padded_text_logits_match_on_real_tokens(pair):
    name, hf, fm = pair
    px = pixels(name, 2)
    ids = torch.tensor([[101, 5, 6, 7], [101, 9, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = fm(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    n = a.shape[1] - ids.shape[1]
    keep = torch.cat([torch.ones(2, n, dtype=torch.bool), mask.bool()], dim=1)
    assert rel_err(b[keep], a[keep]) < 1e-4


def test_greedy_identical(pair):
    name, hf, fm = pair
    px = pixels(name, 4)
    a = hf.generate(pixel_values=px, max_new_tokens=12)
    b = on_both_paths(fm, lambda: fm.generate(pixel_values=px, max_new_tokens=12))
    assert torch.equal(a, b)
    assert len({tuple(r) for r in b.tolist()}) > 1, "captions should depend on the image"


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(num_beams=4, length_penalty=0.5, early_stopping=True),
                                dict(num_beams=3, num_return_sequences=2, early_stopping="never")])
def test_beam_identical(pair, kw):
    name, hf, fm = pair
    px = pixels(name, 2)
    a = hf.generate(pixel_values=px, max_new_tokens=10, **kw)
    b = on_both_paths(fm, lambda: fm.generate(pixel_values=px, max_new_tokens=10, **kw))
    assert torch.equal(a, b)


def test_sampling_with_seed_identical(pair):
    name, hf, fm = pair
    px = pixels(name, 3)
    kw = dict(do_sample=True, max_new_tokens=10, temperature=0.8, top_k=30, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(7)
    a = hf.generate(pixel_values=px, **kw)
    torch.manual_seed(7)
    b = fm.generate(pixel_values=px, **kw)
    assert torch.equal(a, b)


def test_min_new_tokens_and_repetition_penalty(pair):
    name, hf, fm = pair
    px = pixels(name, 2)
    kw = dict(max_new_tokens=10, min_new_tokens=8, repetition_penalty=1.5)
    assert torch.equal(hf.generate(pixel_values=px, **kw), on_both_paths(fm, lambda: fm.generate(pixel_values=px, **kw)))


def test_eos_stops_and_pads():
    hf = make_hf_model("hd32")
    with torch.no_grad():  # make EOS win right after two tokens for every image
        hf.output.bias[102] = 0
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd32", 3)
    a = hf.generate(pixel_values=px, max_new_tokens=6, eos_token_id=[102, 7])
    b = on_both_paths(fm, lambda: fm.generate(pixel_values=px, max_new_tokens=6, eos_token_id=[102, 7]))
    assert torch.equal(a, b)


def test_vqa_batch_equals_alone_and_transformers(pair):
    name, hf, fm = pair
    px = pixels(name, 3)
    ids = torch.tensor([[0, 0, 101, 5, 6], [101, 7, 8, 9, 10], [0, 101, 11, 12, 13]])
    mask = (ids != 0).long()
    batched = on_both_paths(fm, lambda: fm.generate(pixel_values=px, input_ids=ids, attention_mask=mask,
                                                    max_new_tokens=8))
    assert torch.equal(batched, hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=8))
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        alone = fm.generate(pixel_values=px[i:i + 1], input_ids=row, max_new_tokens=8)
        # the batched row is the lone result, left-padded (and padded after EOS) to the batch width
        real = batched[i, ids.shape[1] - row.shape[1]:]
        assert torch.equal(real[:alone.shape[1]], alone[0])
        assert set(real[alone.shape[1]:].tolist()) <= {0, 102}


def test_one_image_many_questions():
    hf = make_hf_model("hd32")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd32", 1)
    ids = torch.tensor([[101, 5, 6], [101, 7, 8], [101, 9, 9]])
    assert torch.equal(hf.generate(pixel_values=px, input_ids=ids, max_new_tokens=5),
                       on_both_paths(fm, lambda: fm.generate(pixel_values=px, input_ids=ids, max_new_tokens=5)))
    assert torch.equal(hf.generate(pixel_values=px, input_ids=ids, max_new_tokens=5, num_beams=2),
                       on_both_paths(fm, lambda: fm.generate(pixel_values=px, input_ids=ids, max_new_tokens=5,
                                                             num_beams=2)))


def test_return_dict_and_unsupported_arguments():
    hf = make_hf_model("hd32")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd32", 1)
    out = fm.generate(pixel_values=px, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (1, 5) and len(out.scores) == 4
    # transformers' own processors serve the options gitfast has no fast step for
    assert torch.equal(fm.generate(pixel_values=px, max_new_tokens=4, no_repeat_ngram_size=2),
                       hf.generate(pixel_values=px, max_new_tokens=4, no_repeat_ngram_size=2))
    with pytest.raises(TypeError, match="not_an_argument"):
        fm.generate(pixel_values=px, max_new_tokens=4, not_an_argument=1)


def test_text_only_and_interpolated_positions():
    hf = make_hf_model("hd32")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    ids = torch.tensor([[101, 5, 6, 7]])
    with torch.no_grad():
        assert rel_err(fm(input_ids=ids).logits, hf(input_ids=ids).logits) < 1e-4
        px = torch.randn(1, 3, 48, 48)
        a = hf(input_ids=ids, pixel_values=px, interpolate_pos_encoding=True).logits
        b = fm(input_ids=ids, pixel_values=px, interpolate_pos_encoding=True).logits
    assert rel_err(b, a) < 1e-4
    with pytest.raises(ValueError, match="doesn't match"):
        fm(input_ids=ids, pixel_values=torch.randn(1, 3, 48, 48))


def test_engine_is_reused_and_can_be_freed():
    hf = make_hf_model("hd32")
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd32", 2)
    fm.generate(pixel_values=px, max_new_tokens=4)
    engine = fm.gitfast_engine
    fm.generate(pixel_values=px[:1], max_new_tokens=4)   # smaller call: same engine
    assert fm.gitfast_engine is engine
    fm.free_kv_cache()
    assert fm.gitfast_engine is None
    assert torch.equal(fm.generate(pixel_values=px, max_new_tokens=4), hf.generate(pixel_values=px, max_new_tokens=4))
