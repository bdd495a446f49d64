"""Memory stays flat over a long stream: resident memory (RSS, from /proc) after 20% of a few thousand
small images against the end, inline and with worker processes (whose RSS is checked too).
The 100k-image run is `python -m gitfast.bench.bench_pipeline --memory 100000`."""
import functools
import os

import pytest
import torch

from gitfast import Captioner
from gitfast.captioning.records import Source
from image_factory import small_images

N = 3000
GROWTH_MB = 10  # a leak of one preprocessed 32x32 image per input would be ~12 KB x 2400 = 29 MB

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


def rss_mb(pid="self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _same(data: bytes) -> bytes:
    return data


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU stalls multi-threaded tiny matmuls for tens of ms
    yield
    torch.set_num_threads(before)


def stream(n: int):
    encoded = list(small_images(50).values())
    return (Source(f"img{i}", functools.partial(_same, encoded[i % len(encoded)])) for i in range(n))


def watch(captioner, n: int, pids=lambda: []):
    """RSS (MB) of this process and of `pids()` at the 20% mark and at the end of a stream of n images."""
    marks, count = {}, 0
    for count, r in enumerate(captioner.caption_iter(stream(n), max_new_tokens=4), 1):
        assert r.ok, r.error
        if count in (n // 5, n):
            marks[count] = (rss_mb(), sum(rss_mb(p) for p in pids()))
    assert count == n
    return marks[n // 5], marks[n]


@pytest.mark.parametrize("workers", [0, 1])
def test_rss_is_flat_over_a_long_stream(checkpoint, one_thread, workers):
    with Captioner(checkpoint, device="cpu", max_batch_size=32, num_workers=workers) as captioner:
        pids = captioner.worker_pids
        (main_at_20, workers_at_20), (main_end, workers_end) = watch(captioner, N, pids)
    assert main_end - main_at_20 < GROWTH_MB, (main_at_20, main_end)
    assert workers_end - workers_at_20 < GROWTH_MB, (workers_at_20, workers_end)
    if workers:
        assert workers_at_20 > 50  # really measured the worker (it has torch and transformers loaded)
