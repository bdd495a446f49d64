"""The drop-in's forward and from_pretrained against transformers' class in fp32: attentions, hidden
states, the DynamicCache and continuing from it, the loss with labels or shift_labels, refusals."""
import pytest
import torch
import transformers
from transformers import DynamicCache

import gitfast
from git_factory import make_config, make_hf_model, pixels


@pytest.fixture(scope="module")
def pair():
    hf = make_hf_model("hd32")
    return hf, gitfast.GitForCausalLM.from_transformers(hf)


IDS = torch.tensor([[101, 5, 6, 7, 8], [101, 9, 10, 11, 12]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])


def close(a, b, tol=1e-5):
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_attentions_hidden_states_and_cache(pair):
    hf, fm = pair
    kw = dict(input_ids=IDS, pixel_values=pixels("hd32", 2), attention_mask=MASK, output_attentions=True,
              output_hidden_states=True)
    with torch.no_grad():
        a, b = hf(**kw), fm(**kw)
    assert len(b.attentions) == len(a.attentions) == 2 and len(b.hidden_states) == len(a.hidden_states) == 3
    for x, y in zip(a.attentions, b.attentions):
        assert y.shape == x.shape == (2, 2, 31, 31)
        close(x, y)
    for x, y in zip(a.hidden_states, b.hidden_states):
        close(x, y)
    close(a.logits, b.logits, 1e-4)
    assert isinstance(b.past_key_values, DynamicCache)  # use_cache defaults to config.use_cache, as transformers
    for x, y in zip(a.past_key_values.layers, b.past_key_values.layers):
        close(x.keys, y.keys)
        close(x.values, y.values)


@pytest.mark.parametrize("positions", [None, torch.tensor([[4], [3]])])
def test_continuing_from_a_cache(pair, positions):
    """With position_ids the continuation equals the full sequence; without, both count positions from
    the cache length (image tokens included), as transformers does."""
    hf, fm = pair
    px = pixels("hd32", 2)
    with torch.no_grad():
        full = fm(input_ids=IDS, pixel_values=px, attention_mask=MASK).logits
        outs = []
        for model in (hf, fm):
            cache = model(input_ids=IDS[:, :4], pixel_values=px, attention_mask=MASK[:, :4], use_cache=True).past_key_values
            assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 26 + 4
            outs.append(model(input_ids=IDS[:, 4:], past_key_values=cache, attention_mask=MASK,
                              position_ids=positions).logits)
    close(outs[0], outs[1], 1e-4)
    if positions is not None:
        close(full[0, -1], outs[1][0, -1], 1e-4)


def test_labels_and_shift_labels_loss(pair):
    hf, fm = pair
    px = pixels("hd32", 2)
    labels = IDS.clone()
    labels[1, :2] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    for kw in (dict(labels=labels), dict(labels=labels, shift_labels=shifted), dict(labels=labels, num_items_in_batch=5)):
        with torch.no_grad():
            a = hf(input_ids=IDS, pixel_values=px, **kw).loss
            b = fm(input_ids=IDS, pixel_values=px, **kw).loss
        assert b.item() == pytest.approx(a.item(), rel=1e-5), kw
    out = fm(input_ids=IDS, pixel_values=px, labels=labels)
    assert out.past_key_values is None  # training keeps no cache, as transformers


def test_unknown_forward_keyword_is_refused(pair):
    with pytest.raises(TypeError, match="foo"):
        pair[1](input_ids=IDS, foo=1)


def test_from_pretrained_arguments(tmp_path, pair):
    hf, fm = pair
    fm.save_pretrained(tmp_path)
    model, info = gitfast.GitForCausalLM.from_pretrained(pretrained_model_name_or_path=str(tmp_path),
                                                         output_loading_info=True, attn_implementation="sdpa")
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": [], "error_msgs": []}
    again = gitfast.GitForCausalLM.from_pretrained(None, config=fm.config, state_dict=fm.state_dict())
    via_hf_names = gitfast.GitForCausalLM.from_pretrained(None, config=hf.config, state_dict=hf.state_dict())
    for m in (model, again, via_hf_names):
        for k, v in fm.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    # a checkpoint missing tensors loads leniently with output_loading_info, as transformers
    from safetensors.torch import save_file
    save_file({"tensor": torch.tensor([1, 2])}, str(tmp_path / "model.safetensors"))
    _, info = gitfast.GitForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["unexpected_keys"] == {"tensor"} and info["missing_keys"] == set(fm.state_dict())
    with pytest.raises(gitfast.CheckpointError, match="missing"):
        gitfast.GitForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="attn_implementation"):
        gitfast.GitForCausalLM.from_pretrained(str(tmp_path), attn_implementation="flash_attention_2")
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta device context manager"):
        gitfast.GitForCausalLM.from_pretrained(str(tmp_path))


def test_a_base_model_checkpoint_loads_into_the_head(tmp_path):
    torch.manual_seed(0)
    base = transformers.GitModel(make_config("hd32"))
    base.save_pretrained(tmp_path)
    model, info = gitfast.GitForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == {"model.lm_head.weight", "model.lm_head.bias"}
    assert torch.equal(model.model.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_old_cache_keyword_warns_as_transformers(pair):
    """`past_key_values=` is taken for `cache=` with transformers' own FutureWarning (its GIT test
    test_bc_cache_name_forward expects it); with both given, `cache` wins and both warn alike."""
    hf, fm = pair
    px = pixels("hd32", 2)

    def prefix_cache(images):
        with torch.no_grad():
            out = fm(input_ids=IDS[:, :4], pixel_values=images, attention_mask=MASK[:, :4], use_cache=True)
            return out.past_key_values

    for case in ("old name", "both names"):
        got = []
        for model in (hf, fm):
            # each forward extends the cache it continues from: fresh ones per model, the old name's of
            # other images, so that taking it instead of `cache` would show in the logits
            old, new = prefix_cache(px.flip(0) if case == "both names" else px), prefix_cache(px)
            keywords = dict(past_key_values=old) if case == "old name" else dict(cache=new, past_key_values=old)
            with torch.no_grad(), pytest.warns(FutureWarning) as caught:
                out = model(input_ids=IDS[:, 4:], attention_mask=MASK, **keywords)
            got.append(([str(w.message) for w in caught if "past_key_values" in str(w.message)], out.logits))
        (hf_messages, hf_logits), (messages, logits) = got
        assert messages == hf_messages and len(messages) == 1, (case, messages, hf_messages)
        close(hf_logits, logits, 1e-4)
