"""A drop-in built from a config is initialised as transformers' class is, seed for seed, and carries
transformers' per-instance bookkeeping (tied weights, base model, embeddings accessors)."""
import pytest
import torch
import transformers

import gitfast
from git_factory import CONFIGS, make_config
from gitfast.checkpoint.hf_format import to_hf_state_dict


def both(cfg, seed=5):
    torch.manual_seed(seed)
    theirs = transformers.GitForCausalLM(cfg)
    after_theirs = torch.rand(3)
    torch.manual_seed(seed)
    ours = gitfast.GitForCausalLM(cfg)
    after_ours = torch.rand(3)
    assert torch.equal(after_theirs, after_ours), "the RNG must be left where transformers leaves it"
    return theirs, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_weights(name):
    cfg = make_config(name)
    theirs, ours = both(cfg)
    a, b = theirs.state_dict(), to_hf_state_dict(ours.model.state_dict(), cfg)
    assert set(b) <= set(a)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert torch.all(ours.model.word_embeddings.weight[cfg.pad_token_id] == 0)


def test_tied_embeddings_share_one_parameter_and_no_pad():
    cfg = make_config("hd32")
    cfg.tie_word_embeddings, cfg.pad_token_id = True, None
    theirs, ours = both(cfg, seed=11)
    assert ours.model.lm_head.weight is ours.model.word_embeddings.weight
    assert ours.all_tied_weights_keys == {"model.lm_head.weight": "model.word_embeddings.weight"}
    assert torch.equal(ours.model.lm_head.weight, theirs.output.weight)
    untied = gitfast.GitForCausalLM(make_config("hd32"))
    assert untied.all_tied_weights_keys == {}
    assert untied.model.lm_head.weight is not untied.model.word_embeddings.weight


def test_post_init_bookkeeping_and_base_model():
    m = gitfast.GitForCausalLM(make_config("hd32"))
    assert m._keep_in_fp32_modules == set() and m._no_split_modules == set()
    assert m.base_model is m.model and m.base_model_prefix == "model"
    assert m.supports_gradient_checkpointing


def test_meta_construction_then_init_weights():
    cfg = make_config("hd32")
    with torch.device("meta"):
        m = gitfast.GitForCausalLM(cfg)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    torch.manual_seed(2)
    m.init_weights()
    torch.manual_seed(2)
    ref = gitfast.GitForCausalLM(cfg)
    # the same draws, minus nothing: init_weights replays transformers' whole sequence
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_embeddings_accessors_and_resize():
    cfg = make_config("hd32")
    torch.manual_seed(0)
    theirs = transformers.GitForCausalLM(cfg).eval()  # no dropout
    ours = gitfast.GitForCausalLM.from_transformers(theirs)
    assert ours.get_input_embeddings() is ours.model.word_embeddings
    assert ours.get_output_embeddings() is ours.model.lm_head
    ours.resize_token_embeddings(160)
    theirs.resize_token_embeddings(160)
    assert ours.config.vocab_size == 160 and ours.model.lm_head.out_features == 160
    ids = torch.tensor([[101, 5, 15]])  # new rows are random draws (mean resizing): compare old tokens
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert b.shape == a.shape
    torch.testing.assert_close(b[..., :150], a[..., :150], rtol=1e-4, atol=1e-5)  # old rows unchanged
    assert torch.isfinite(ours.model.word_embeddings.weight[150:]).all()
    new = torch.nn.Embedding(160, cfg.hidden_size)
    ours.set_input_embeddings(new)
    assert ours.get_input_embeddings() is new
    assert ours.generate(input_ids=torch.tensor([[101, 5, 155]]), max_new_tokens=2).shape == (1, 5)


def test_resize_keeps_the_head_tied():
    cfg = make_config("hd32")
    cfg.tie_word_embeddings = True
    m = gitfast.GitForCausalLM(cfg)
    m.resize_token_embeddings(170)
    assert m.model.lm_head.weight is m.model.word_embeddings.weight
    assert m.model.lm_head.weight.shape[0] == 170


def test_post_init_after_resize_redraws_nothing():
    m = gitfast.GitForCausalLM(make_config("hd32"))
    m.resize_token_embeddings(160)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.post_init()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
