"""Block manager: allocation, reference counts, prefix-cache hits, LRU eviction of cached blocks."""
import pytest

from porter.engine.block_manager import BlockManager
from porter.engine.sampling_params import SamplingParams
from porter.engine.sequence import Sequence

BS = 4


def seq(ids, seq_id=0):
    return Sequence(seq_id, list(ids), SamplingParams())


def run_prefill(bm, s):
    """What a step does for a sequence whose whole prompt was computed."""
    s.num_computed_tokens = s.num_tokens
    bm.cache_computed_blocks(s)


def test_allocate_and_free_restore_the_pool():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    s = seq(range(10))  # 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_can_allocate_counts_blocks():
    bm = BlockManager(2, BS)
    assert bm.can_allocate(seq(range(8)))
    assert not bm.can_allocate(seq(range(9)))


def test_append_adds_a_block_only_at_a_boundary():
    bm = BlockManager(4, BS)
    s = seq(range(4))
    bm.allocate(s)
    run_prefill(bm, s)
    assert len(s.block_table) == 1
    s.append_token(99)  # token 5 starts block 2
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.block_table) == 2
    s.append_token(98)
    bm.append(s)
    assert len(s.block_table) == 2  # still room in block 2


def test_can_append_false_when_pool_is_empty():
    bm = BlockManager(1, BS)
    s = seq(range(4))
    bm.allocate(s)
    s.append_token(5)
    assert not bm.can_append(s)


def test_shared_prefix_reuses_blocks_with_refcounts():
    bm = BlockManager(16, BS)
    a = seq(list(range(10)), 0)  # blocks [0..3], [4..7], [8, 9]
    bm.allocate(a)
    assert a.num_cached_tokens == 0
    run_prefill(bm, a)
    b = seq(list(range(8)) + [50, 51, 52], 1)  # same two full blocks, different tail
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.num_hit_blocks == 2
    bm.free(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1  # still held by b


def test_different_prefix_misses_even_with_equal_later_block():
    bm = BlockManager(16, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 0)
    bm.allocate(a)
    run_prefill(bm, a)
    b = seq([0, 2, 3, 4, 5, 6, 7, 8, 9], 1)  # block 2 equal in content, but the chain differs
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_last_token_is_always_computed():
    bm = BlockManager(16, BS)
    a = seq(range(8), 0)
    bm.allocate(a)
    run_prefill(bm, a)
    b = seq(range(8), 1)  # identical prompt, exactly two full blocks
    bm.allocate(b)
    assert b.num_computed_tokens == 4  # the second block is recomputed to get the last hidden state


def test_uncomputed_blocks_are_not_shared():
    bm = BlockManager(16, BS)
    a = seq(range(9), 0)
    bm.allocate(a)  # allocated, never computed
    b = seq(range(9), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, BS)
    a = seq(range(9), 0)  # 3 blocks, 2 full
    bm.allocate(a)
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = seq(list(range(8)) + [77], 1)
    assert bm.can_allocate(again)
    bm.allocate(again)  # the freed-but-cached blocks come back
    assert again.num_cached_tokens == 8
    assert bm.num_evicted_blocks == 0
    bm.free(again)
    other = seq(range(100, 116), 2)  # 4 fresh blocks: every cached block must be evicted
    bm.allocate(other)
    assert bm.num_evicted_blocks == 2
    bm.free(other)
    third = seq(list(range(8)) + [77], 3)
    bm.allocate(third)
    assert third.num_cached_tokens == 0


def test_eviction_takes_the_least_recently_freed_cached_block():
    bm = BlockManager(3, BS)
    a = seq([1] * 5, 0)  # 2 blocks, the first full and cached
    bm.allocate(a)
    run_prefill(bm, a)
    bm.free(a)
    b = seq([2] * 5, 1)  # takes the never-used block and a's (uncached) tail: no eviction
    bm.allocate(b)
    run_prefill(bm, b)
    assert bm.num_evicted_blocks == 0
    bm.free(b)
    c = seq([3] * 3, 2)  # one fresh block: a's head was freed before b's, so it goes
    bm.allocate(c)
    assert bm.num_evicted_blocks == 1
    a2, b2 = seq([1] * 4 + [9], 3), seq([2] * 4 + [9], 4)
    bm.allocate(b2)
    assert b2.num_cached_tokens == 4
    bm.free(c)
    bm.free(b2)
    assert bm.can_allocate(a2)
    bm.allocate(a2)
    assert a2.num_cached_tokens == 0


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a = seq(range(9), 0)
    bm.allocate(a)
    run_prefill(bm, a)
    b = seq(range(9), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.num_hit_blocks == 0


def test_can_allocate_counts_shared_hits_as_free():
    bm = BlockManager(3, BS)
    a = seq(range(9), 0)  # 3 blocks: pool exhausted
    bm.allocate(a)
    run_prefill(bm, a)
    b = seq(list(range(8)) + [42], 1)  # shares 2 in-use blocks, needs 1 more: none free
    assert not bm.can_allocate(b)
    c = seq(list(range(8)), 2)  # shares block 0 (last token's block recomputed) -> needs 1 new
    assert not bm.can_allocate(c)
    bm2 = BlockManager(4, BS)
    a2 = seq(range(9), 0)
    bm2.allocate(a2)
    run_prefill(bm2, a2)
    b2 = seq(list(range(8)) + [42], 1)
    assert bm2.can_allocate(b2)  # 1 free block suffices
    bm2.allocate(b2)
    assert bm2.num_free_blocks == 0


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_reset_prefix_cache_drops_only_unused_cached_blocks():
    bm = BlockManager(16, BS)
    a, b = seq(list(range(10)), 0), seq(list(range(100, 110)), 1)
    for s in (a, b):
        bm.allocate(s)
        run_prefill(bm, s)
    bm.free(a)  # a's two full blocks stay cached while free; b's are in use
    assert bm.reset_prefix_cache() == 2
    again = seq(list(range(10)), 2)
    bm.allocate(again)
    assert again.num_cached_tokens == 0  # a's prefix is gone
    twin = seq(list(range(100, 110)), 3)
    bm.allocate(twin)
    assert twin.num_cached_tokens == 8  # b's blocks, in use, were kept
