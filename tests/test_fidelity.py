"""The low-precision contract's checker: identical share and near-tie detection."""
import pytest
import torch

import gitfast
from gitfast.fidelity import compare_greedy
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
    hf = make_hf_model("hd64_odd_tokens").to("cuda", dtype)
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    report = compare_greedy(fm, hf, pixels("hd64_odd_tokens", 64).to("cuda", dtype), max_new_tokens=20)
    assert report.all_near_ties, report.divergences
    print(f"{dtype}: {report.identical_share:.1%} identical of {report.rows}")
