"""The paged cache's bookkeeping: allocation, sharing, freeing, exhaustion, fragmentation."""
import pytest
import torch

from gitfast.serving.paged_cache import BlockAllocator, OutOfBlocks, PagedKVCache


def test_allocate_free_and_exhaustion():
    a = BlockAllocator(6)
    x = a.allocate(4)
    assert len(set(x)) == 4 and a.num_free == 2
    with pytest.raises(OutOfBlocks, match="asked for 3 blocks, 2 free of 6"):
        a.allocate(3)
    a.free(x[:2])
    assert a.num_free == 4
    with pytest.raises(ValueError, match="freed more often"):
        a.free(x[:1])


def test_sharing_keeps_blocks_until_last_user():
    a = BlockAllocator(4)
    x = a.allocate(2)
    a.share(x)
    a.free(x)
    assert a.num_free == 2 and all(a.refcount(b) == 1 for b in x)
    a.free(x)
    assert a.num_free == 4
    with pytest.raises(ValueError, match="not allocated"):
        a.share(x)


def test_fragmentation_reuses_scattered_blocks():
    a = BlockAllocator(8)
    blocks = a.allocate(8)
    a.free(blocks[1::2])  # every other block comes back
    again = a.allocate(4)
    assert sorted(again) == sorted(blocks[1::2])


def cache(num_blocks=16, block_size=4):
    return PagedKVCache(num_layers=2, num_blocks=num_blocks, block_size=block_size, heads=2, head_dim=3,
                        dtype=torch.float32, device="cpu")


def test_prefix_shared_and_partial_block_copied():
    c = cache()
    prefix = c.new_prefix(10)            # 4 + 4 + 2 tokens: two full blocks and a partial one
    assert len(prefix.blocks) == 3
    for layer in range(2):
        c.k[layer][prefix.blocks[2], :2] = 7.0
    s1, s2 = c.start_sequence(prefix, 15), c.start_sequence(prefix, 13)
    assert s1.table[:2] == s2.table[:2] == prefix.blocks[:2]      # full blocks shared
    assert s1.table[2] != s2.table[2] != prefix.blocks[2]         # partial block copied privately
    assert torch.all(c.k[1][s2.table[2], :2] == 7.0)
    assert len(s1.table) == 4 and len(s2.table) == 4
    assert c.slots(s1, 10, 3) == [s1.table[2] * 4 + 2, s1.table[2] * 4 + 3, s1.table[3] * 4]
    c.release_prefix(prefix)
    assert c.allocator.num_free == 16 - 2 - 4                      # shared blocks live on in the sequences
    c.release(s1)
    c.release(s2)
    assert c.allocator.num_free == 16


def test_block_aligned_prefix_needs_no_copy():
    c = cache()
    prefix = c.new_prefix(8)
    s = c.start_sequence(prefix, 9)
    assert s.table[:2] == prefix.blocks and s.shared == 2 and len(s.table) == 3


def test_copy_private_blocks_handles_overlap():
    c = cache()
    prefix = c.new_prefix(4)
    seqs = [c.start_sequence(prefix, 9) for _ in range(3)]
    for i, s in enumerate(seqs):
        for b in s.table[s.shared:]:
            c.v[0][b] = float(i)
    c.copy_private_blocks(seqs, [2, 0, 0])  # a permutation with a repeat, sources overwritten too
    got = [float(c.v[0][s.table[s.shared]][0, 0, 0]) for s in seqs]
    assert got == [2.0, 0.0, 0.0]


def test_budget_sizing():
    class Cfg:
        num_attention_heads, hidden_size, num_hidden_layers = 2, 8, 3
    per_block = PagedKVCache.bytes_per_block(3, 16, 2, 4, torch.float16)
    assert per_block == 2 * 3 * 16 * 2 * 4 * 2
    c = PagedKVCache.from_budget(Cfg, per_block * 5 + 1, 16, torch.float16, "cpu")
    assert c.allocator.num_blocks == 5
    with pytest.raises(ValueError, match="holds no"):
        PagedKVCache.from_budget(Cfg, 10, 16, torch.float16, "cpu")


def test_slot_state_gathers_the_same_step_inputs_as_the_block_tables():
    """The engine's device-side decode inputs equal those built from the host block tables."""
    from gitfast.serving.paged_runner import SlotState

    cache = PagedKVCache(1, 64, 4, 1, 2, torch.float32, "cpu")
    prefix = cache.new_prefix(6)  # one full block shared, a partial one copied
    seqs = [cache.start_sequence(prefix, 6 + 3 + n) for n in (2, 5, 7)]
    for s in seqs:
        s.length += 3  # a three-token prompt, as prefill leaves it
    state = SlotState(cache, capacity=5, width=6)
    slots = [4, 0, 2]  # engine slots in no particular order
    state.start(slots, seqs, [3, 3, 3], torch.tensor([7, 8, 9]))
    for step in range(2):
        rows = state.rows(tuple(slots))
        tokens, positions, meta = state.inputs(rows, max(s.length for s in seqs) + 1)
        context = meta.context_lens
        assert meta.phase == "decode" and meta.max_context == max(s.length for s in seqs) + 1
        assert meta.slot_mapping.tolist() == [cache.slots(s, s.length, 1)[0] for s in seqs]
        assert context.tolist() == [s.length + 1 for s in seqs]
        assert meta.block_tables.tolist() == cache.block_table_tensor(seqs, 6).tolist()
        assert positions.tolist() == [3 + step] * 3
        assert tokens.tolist() == ([7, 8, 9] if step == 0 else [1, 2, 3])
        state.advance(rows, context, positions, torch.tensor([1, 2, 3]))
        for s in seqs:
            s.length += 1
    assert state.rows(tuple(slots)) is rows  # unchanged running set: the index is reused
    with pytest.raises(ValueError, match="room for 2"):
        SlotState(cache, capacity=5, width=2).start([1], seqs[2:], [3], torch.tensor([0]))
