"""The Captioner on a GPU gives the CPU's captions in fp32: continuous batching with fewer slots than
images, mixed prompts (none, empty, short and long VQA questions), inline preprocessing and a worker."""
import pytest

from gitfast import Captioner
from image_factory import small_images, write_files

pytestmark = pytest.mark.cuda

PROMPTS = [None, "what color is the shape?", "", "how many", "is there a big red circle on the left?", "what"] * 2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_files(str(tmp_path_factory.mktemp("images")), small_images(12, seed=300))


@pytest.fixture(scope="module")
def on_cpu(checkpoint, images):
    return [(r.token_ids, r.text, r.error) for r in
            Captioner(checkpoint, device="cpu", max_batch_size=4).caption(images, PROMPTS, max_new_tokens=10)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_gpu_captions_equal_cpu_captions_fp32(checkpoint, images, on_cpu, num_workers):
    assert all(e is None for *_, e in on_cpu) and len({len(t) for t, *_ in on_cpu}) > 1, on_cpu
    with Captioner(checkpoint, device="cuda", dtype="float32", max_batch_size=4, num_workers=num_workers) as gpu:
        got = [(r.token_ids, r.text, r.error) for r in gpu.caption(images, PROMPTS, max_new_tokens=10)]
    assert got == on_cpu
