"""The scheduler without a model: admission order, blocks taken and given back, refusal, shared prefixes.

A scripted executor stands in for the model (each request "chooses" the tokens its script lists), and
the engine's own loop (`Engine._steps`: schedule -> run -> emit, tokens read back a step late) drives
the scheduler over plain `KVBlocks` bookkeeping: no tensors, no model.
"""
import itertools
from types import SimpleNamespace

import pytest

from gitfast.serving import stopping
from gitfast.serving.engine import Engine
from gitfast.serving.paged_cache import KVBlocks, Prefix
from gitfast.serving.scheduler import KVCacheTooSmall, Request, Scheduler, kv_blocks

EOS = 2
IMAGE = object()  # pixels stand-in: the scheduler only asks whether a request has an image


class ScriptedExecutor:
    """Runs plans as the model would for the scheduler's bookkeeping: prefill fills the prompt's
    positions, each step writes one token inside the blocks reserved, and sequence `i` chooses
    `script[i][n]` as its n-th token."""

    def __init__(self, blocks: KVBlocks, script):
        self.blocks, self.script, self.plans = blocks, script, []

    def run(self, plan):
        self.plans.append(plan)
        chosen = []
        for s in plan.prefill:
            s.blocks.length += len(s.request.prompt)  # as PagedRunner.prefill
            chosen.append(self.script[s.index][0])
        for s in plan.decode:
            assert s.blocks.length < len(s.blocks.table) * self.blocks.block_size, "a step past the reserved blocks"
            assert s.launched < s.max_new, "a step past the sequence's new-token limit"
            chosen.append(self.script[s.index][s.launched])
        return plan.prefill + plan.decode, chosen

    def read(self, launched):
        return zip(*launched)


def settings(max_length=20):
    return SimpleNamespace(eos=[EOS], max_length=max_length)


def run(requests, num_blocks, script, *, block_size=4, image_tokens=6, max_rows=8, max_length=20):
    """(outputs in finishing order, the executor, the blocks) of one scheduled run."""
    blocks = KVBlocks(num_blocks, block_size)
    scheduler = Scheduler(iter(enumerate(requests)), settings(max_length), blocks, max_rows=max_rows,
                          image_tokens=image_tokens, positions=32)
    executor = ScriptedExecutor(blocks, script)
    return list(Engine._steps(scheduler, executor)), executor, blocks


def admitted(executor):
    """Request indices admitted by each plan (plans that admitted none left out)."""
    return [[s.index for s in p.prefill] for p in executor.plans if p.prefill]


def test_requests_are_admitted_in_order_as_blocks_come_free():
    # image 6 tokens + prompt 1 + 3 new = 10 tokens: 2 prefix blocks + 2 private (blocks of 4) each
    reqs = [Request(IMAGE, [101], max_new_tokens=3) for _ in range(4)]
    script = {0: [5, EOS, 9], 1: [5, 6, 7], 2: [EOS, 9, 9], 3: [8, 8, 8]}
    outs, executor, blocks = run(reqs, 9, script)  # room for two at a time
    assert admitted(executor) == [[0, 1], [2], [3]]
    assert [(o.index, o.token_ids, o.finish_reason) for o in outs] == [
        (0, [5, EOS], "eos"), (1, [5, 6, 7], "length"), (2, [EOS], "eos"), (3, [8, 8, 8], "length")]
    assert blocks.allocator.num_free == 9


def test_a_request_that_does_not_fit_yet_is_not_overtaken():
    # request 1 needs the whole cache; request 2 would fit beside request 0, but waits its turn
    reqs = [Request(IMAGE, [101], max_new_tokens=3), Request(IMAGE, [101], max_new_tokens=20),
            Request(IMAGE, [101], max_new_tokens=3)]
    script = {0: [5, 6, 7], 1: [EOS] + [9] * 19, 2: [8, EOS, 9]}
    outs, executor, blocks = run(reqs, 9, script)
    assert admitted(executor) == [[0], [1], [2]]
    assert [o.index for o in outs] == [0, 1, 2] and blocks.allocator.num_free == 9


def test_an_impossible_request_is_refused_and_gives_everything_back():
    reqs = [Request(IMAGE, [101], max_new_tokens=3), Request(IMAGE, [101], max_new_tokens=40)]
    blocks = KVBlocks(9, 4)
    scheduler = Scheduler(iter(enumerate(reqs)), settings(), blocks, max_rows=8, image_tokens=6, positions=64)
    steps = Engine._steps(scheduler, ScriptedExecutor(blocks, {0: [5, 6, 7]}))
    with blocks.allocator.lease():  # as Engine.run holds it
        with pytest.raises(KVCacheTooSmall, match=r"request 1 needs more KV cache than the engine has \(9 blocks of 4\)"):
            list(steps)  # request 0 runs first: refused only once the cache is empty
    assert blocks.allocator.num_free == 9


@pytest.mark.parametrize("block_size, image_tokens, prompt, max_new, rows, images", [
    (4, 6, 1, 3, 3, 3),     # a partial prefix block: copied into every row
    (4, 8, 2, 5, 4, 2),     # whole prefix blocks, two rows per image
    (16, 37, 3, 20, 5, 1),  # one image, five prompts
    (8, 0, 3, 4, 2, 2),     # text only
])
def test_kv_blocks_is_exactly_what_admission_takes(block_size, image_tokens, prompt, max_new, rows, images):
    reqs = [Request(IMAGE if image_tokens else None, [101] * prompt, image_key=i % images, max_new_tokens=max_new)
            for i in range(rows)]
    need = kv_blocks(block_size, image_tokens, prompt + max_new, rows, images)
    script = {i: [7] * max_new for i in range(rows)}
    _, executor, _ = run(reqs, need, script, block_size=block_size, image_tokens=image_tokens)
    assert admitted(executor)[0] == list(range(rows))  # all at once
    _, executor, _ = run(reqs, need - 1, script, block_size=block_size, image_tokens=image_tokens)
    assert len(admitted(executor)[0]) < rows  # one block less: not all at once


def test_requests_over_one_image_share_its_prefix_blocks():
    # 10 image tokens, blocks of 4: two full prefix blocks shared, the partial third copied per request
    blocks = KVBlocks(32, 4)
    reqs = [Request(IMAGE, [101, 7 + i], image_key="photo", max_new_tokens=2) for i in range(3)]
    scheduler = Scheduler(iter(enumerate(reqs)), settings(), blocks, max_rows=8, image_tokens=10, positions=32)
    plan = scheduler.schedule()
    assert len(plan.encode) == 1  # one image prefix to compute for three requests
    prefix = plan.encode[0][0]
    assert len(prefix.blocks) == 3 and all(s.prefix is prefix for s in plan.prefill)
    tables = [s.blocks.table for s in plan.prefill]
    assert all(t[:2] == prefix.blocks[:2] for t in tables)
    private = [b for t in tables for b in t[2:]]
    assert len(private) == len(set(private)) and not set(private) & set(prefix.blocks)
    assert [blocks.allocator.refcount(b) for b in prefix.blocks] == [4, 4, 1]  # the prefix + three requests
    scheduler.ran(plan)  # no waiting request uses the image: the prefix is let go, the requests keep theirs
    assert [blocks.allocator.refcount(b) for b in prefix.blocks] == [3, 3, 0]


def test_beams_share_their_image_blocks():
    blocks = KVBlocks(16, 4)
    prefix = blocks.new_prefix(9)  # two full blocks and one partial
    beams = [blocks.reserve_sequence(prefix, 9 + 6) for _ in range(3)]
    blocks.release_prefix(prefix)
    assert all(b.table[:2] == prefix.blocks[:2] and b.shared == 2 and b.length == 9 for b in beams)
    assert [blocks.allocator.refcount(b) for b in prefix.blocks[:2]] == [3, 3]
    for b in beams:
        blocks.release(b)
    assert blocks.allocator.num_free == 16


def test_sequences_grow_one_token_a_step_inside_their_blocks():
    reqs = [Request(IMAGE, [101, 5, 6], max_new_tokens=n) for n in (1, 4, 7)]
    script = {i: [9] * 7 for i in range(3)}
    outs, executor, blocks = run(reqs, 64, script)
    assert sorted((o.index, len(o.token_ids)) for o in outs) == [(0, 1), (1, 4), (2, 7)]
    # request 2: prefill, then six steps (the last token is chosen, never fed)
    assert sum(any(s.index == 2 for s in p.decode) for p in executor.plans) == 6
    assert blocks.allocator.num_free == 64


def test_the_input_is_pulled_lazily_within_the_batch_window():
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield i, Request(IMAGE, [101], max_new_tokens=2)

    blocks = KVBlocks(64, 4)
    scheduler = Scheduler(endless(), settings(), blocks, max_rows=3, image_tokens=6, positions=32)
    plan = scheduler.schedule()
    assert [s.index for s in plan.prefill] == [0, 1, 2] and pulled == [0, 1, 2]


def test_new_token_limits_and_one_kind_of_request_per_run():
    # max_length counts the prompt; the position table's end caps every request
    reqs = [Request(IMAGE, [101] * 3), Request(IMAGE, [101], max_new_tokens=100)]
    blocks = KVBlocks(256, 4)
    scheduler = Scheduler(iter(enumerate(reqs)), settings(max_length=10), blocks, max_rows=8, image_tokens=6,
                          positions=32)
    assert [s.max_new for s in scheduler.schedule().prefill] == [7, 32]
    mixed = [Request(IMAGE, [101]), Request(None, [101])]
    scheduler = Scheduler(iter(enumerate(mixed)), settings(), KVBlocks(64, 4), max_rows=8, image_tokens=6,
                          positions=32)
    with pytest.raises(ValueError, match="either image requests or text-only requests"):
        scheduler.schedule()


def test_stopping_rules():
    assert stopping.eos_ids(None, 102) == [102] and stopping.eos_ids([3, 4]) == [3, 4] and stopping.eos_ids(None) == []
    assert stopping.new_token_limit(None, 20, 3, 64) == 17 and stopping.new_token_limit(None, 2, 3, 64) == 1
    assert stopping.new_token_limit(50, 20, 3, 40) == 38  # the position table's end: 40 + 1 - 3
    assert stopping.finish_reason([5, EOS], {EOS}, 9) == "eos" and stopping.finish_reason([5, 6], {EOS}, 2) == "length"
    assert stopping.finish_reason([5, 6], {EOS}, 3) is None
    assert stopping.until_eos([5, 6, EOS, 7], {EOS}) == [5, 6] and stopping.until_eos([5], set()) == [5]
    assert isinstance(KVBlocks(4, 4).new_prefix(0), Prefix)  # a text-only prefix takes no blocks
