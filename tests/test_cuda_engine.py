"""GPU checks of the engine (run on a GPU machine): CUDA-graph decode equals eager, kernels equal plain torch."""
import pytest
import torch

import gitfast
from gitfast.serving.engine import Engine, Request
from gitfast.serving.generation import resolve_settings
from git_factory import make_hf_model, pixels


def assert_same_as_padded(rows, padded, pad=0):
    """The engine's rows end at EOS; transformers pads the batch to its longest row (as test_engine
    compares them)."""
    assert len(rows) == len(padded)
    for i, (row, ref) in enumerate(zip(rows, padded)):
        n = len(row)
        assert row == ref[:n] and all(t == pad for t in ref[n:]), (i, row, ref)


def _captions(device, dtype, cuda_graphs):
    hf = make_hf_model("hd64_odd_tokens").to(device, dtype)
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd64_odd_tokens", 11).to(device, dtype)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=12)
    engine = Engine(fm.model, max_batch_size=8, block_size=16, cuda_graphs=cuda_graphs)
    return hf, px, engine, [o.token_ids for o in engine.generate([Request(px[i], [101]) for i in range(11)], s)]


def test_the_gpu_tests_comparison_on_the_cpu():
    """The GPU test's inputs on the CPU: a row ends at EOS before max_new_tokens, where transformers
    pads it, so a plain equality with transformers' batch fails although every token agrees."""
    hf, px, _, rows = _captions("cpu", torch.float32, False)
    ref = hf.generate(pixel_values=px, max_new_tokens=12)[:, 1:].tolist()
    assert any(len(r) < 12 for r in rows) and rows != ref
    assert_same_as_padded(rows, ref)
    with pytest.raises(AssertionError):  # a real difference still fails
        assert_same_as_padded([rows[0][:-1] + [rows[0][-1] + 1]], ref[:1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphs_equal_eager_and_transformers(dtype):
    hf, px, graphed, a = _captions("cuda", dtype, True)
    *_, b = _captions("cuda", dtype, False)
    assert not graphed.runner.graphs.failed and graphed.runner.graphs.graphs
    assert a == b
    if dtype == torch.float32:
        ref = hf.generate(pixel_values=px, max_new_tokens=12)
        assert_same_as_padded(a, ref[:, 1:].tolist())


@pytest.mark.cuda
def test_drop_in_on_gpu_matches_cpu_fp32():
    hf = make_hf_model("hd64_odd_tokens")
    px = pixels("hd64_odd_tokens", 4)
    cpu = gitfast.GitForCausalLM.from_transformers(hf).generate(pixel_values=px, max_new_tokens=10, num_beams=3)
    gpu = gitfast.GitForCausalLM.from_transformers(hf, device="cuda").generate(pixel_values=px.cuda(),
                                                                                max_new_tokens=10, num_beams=3)
    assert torch.equal(cpu, gpu.cpu())
