"""GPU checks of the engine (run on a GPU machine): CUDA-graph decode equals eager, kernels equal plain torch."""
import pytest
import torch

import gitfast
from gitfast.serving.engine import Engine, Request
from gitfast.serving.generation import resolve_settings
from git_factory import make_hf_model, pixels

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphs_equal_eager_and_transformers(dtype):
    hf = make_hf_model("hd64_odd_tokens").to("cuda", dtype)
    fm = gitfast.GitForCausalLM.from_transformers(hf)
    px = pixels("hd64_odd_tokens", 11).to("cuda", dtype)
    s = resolve_settings(fm.generation_config, 1, max_new_tokens=12)
    reqs = [Request(px[i], [101]) for i in range(11)]
    graphed = Engine(fm.model, max_batch_size=8, block_size=16, cuda_graphs=True)
    eager = Engine(fm.model, max_batch_size=8, block_size=16, cuda_graphs=False)
    a = [o.token_ids for o in graphed.generate(reqs, s)]
    b = [o.token_ids for o in eager.generate(reqs, s)]
    assert not graphed.runner.graphs.failed and graphed.runner.graphs.graphs
    assert a == b
    if dtype == torch.float32:
        ref = hf.generate(pixel_values=px, max_new_tokens=12)
        assert a == ref[:, 1:].tolist()


def test_drop_in_on_gpu_matches_cpu_fp32():
    hf = make_hf_model("hd64_odd_tokens")
    px = pixels("hd64_odd_tokens", 4)
    cpu = gitfast.GitForCausalLM.from_transformers(hf).generate(pixel_values=px, max_new_tokens=10, num_beams=3)
    gpu = gitfast.GitForCausalLM.from_transformers(hf, device="cuda").generate(pixel_values=px.cuda(),
                                                                                max_new_tokens=10, num_beams=3)
    assert torch.equal(cpu, gpu.cpu())
