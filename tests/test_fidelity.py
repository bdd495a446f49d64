"""The low-precision contract's checker: identical share and near-tie detection."""
import pytest
import torch

import gitfast
from gitfast.tools.fidelity import compare_greedy
from git_factory import make_hf_model, pixels


def test_fp32_is_fully_identical():
    hf = make_hf_model("hd32")
    report = compare_greedy(gitfast.GitForCausalLM.from_transformers(hf), hf, pixels("hd32", 4), max_new_tokens=8)
    assert report.identical_share == 1.0 and not report.divergences


def test_a_real_difference_is_not_a_near_tie():
    hf = make_hf_model("hd32")
    fm = gitfast.GitForCausalLM.from_transformers(make_hf_model("hd32"))  # same weights, separate tensors
    with torch.no_grad():  # break gitfast's copy: one token becomes overwhelmingly likely
        fm.model.lm_head.bias[77] += 1e4
    report = compare_greedy(fm, hf, pixels("hd32", 3), max_new_tokens=6)
    assert report.identical == 0 and len(report.divergences) == 3
    assert all(d.ours == 77 and d.step == 0 for d in report.divergences)
    assert not report.all_near_ties  # 77 is nowhere near transformers' top-5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_contract_on_gpu(dtype):
    """The contract itself: in half precision gitfast's greedy captions agree with the fp32 reference
    at least as often as transformers' do in the same dtype, and every difference from transformers
    is a near-tie."""
    ref = make_hf_model("hd64_odd_tokens").to("cuda")
    px = pixels("hd64_odd_tokens", 64).to("cuda")
    want = ref.generate(pixel_values=px, max_new_tokens=20, min_new_tokens=20)
    hf = make_hf_model("hd64_odd_tokens").to("cuda", dtype)
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    ours = fm.generate(pixel_values=px.to(dtype), max_new_tokens=20, min_new_tokens=20)
    theirs = hf.generate(pixel_values=px.to(dtype), max_new_tokens=20, min_new_tokens=20)
    agree = lambda got: int((got == want).all(dim=1).sum())  # noqa: E731
    assert agree(ours) >= agree(theirs), f"{dtype}: gitfast {agree(ours)}/64 vs transformers {agree(theirs)}/64"
    report = compare_greedy(fm, hf, px.to(dtype), max_new_tokens=20)
    assert report.all_near_ties, report.divergences
