import math

import pytest

from npusim.kv import PagedKVCache


def test_block_count_is_ceil_of_tokens():
    for bs in (1, 3, 16):
        for n in (1, bs - 1, bs, bs + 1, 5 * bs, 5 * bs + 2):
            if n < 1:
                continue
            c = PagedKVCache(64, bs, watermark=0)
            assert c.allocate("r", n) == 0
            assert len(c.block_table("r")) == math.ceil(n / bs)
            assert c.num_used_blocks == math.ceil(n / bs)
            assert c.filled_slots == n
            assert c.allocated_slots == math.ceil(n / bs) * bs


def test_new_block_exactly_at_block_size_plus_one():
    c = PagedKVCache(8, 4, watermark=0)
    c.allocate(1, 1)
    for tokens in range(2, 5):
        assert c.append_slots(1)
        assert len(c.block_table(1)) == 1, tokens
    assert c.num_tokens(1) == 4
    assert c.append_slots(1)  # 5th token = block_size + 1
    assert len(c.block_table(1)) == 2
    assert c.num_used_blocks == 2
    assert c.filled_slots == 5 and c.allocated_slots == 8


def test_multi_token_append_spans_blocks():
    c = PagedKVCache(8, 4, watermark=0)
    c.allocate(1, 3)
    assert c.append_slots(1, 10)  # 13 tokens -> 4 blocks
    assert len(c.block_table(1)) == 4
    assert c.filled_slots == 13
    assert c.append_slots(1, 0)
    assert c.num_tokens(1) == 13


def test_append_fails_without_change_when_out_of_blocks():
    c = PagedKVCache(2, 4, watermark=0)
    c.allocate(1, 8)
    before = (c.block_table(1), c.num_tokens(1), c.num_free_blocks, c.filled_slots)
    assert c.append_slots(1) is False
    assert (c.block_table(1), c.num_tokens(1), c.num_free_blocks, c.filled_slots) == before


def test_watermark_refuses_admission():
    c = PagedKVCache(100, 16, watermark=0.05)  # 5 blocks held back
    assert c.watermark_blocks == 5
    assert c.can_allocate(95 * 16)
    assert not c.can_allocate(95 * 16 + 1)
    assert c.allocate(1, 95 * 16 + 1) is None
    assert c.num_free_blocks == 100 and 1 not in c
    assert c.allocate(1, 95 * 16) == 0
    # Appends ignore the watermark: the request may use the last 5 blocks.
    assert c.append_slots(1, 5 * 16)
    assert c.num_free_blocks == 0


def test_free_returns_blocks():
    c = PagedKVCache(10, 4, watermark=0)
    c.allocate("a", 9)
    c.allocate("b", 4)
    assert c.num_free_blocks == 6
    c.free("a")
    assert c.num_free_blocks == 9
    assert c.filled_slots == 4 and c.allocated_slots == 4
    c.free("b")
    assert c.num_free_blocks == 10 and c.num_used_blocks == 0 and c.filled_slots == 0
    assert "a" not in c and not c.contains("b")


def test_fork_shares_and_cow_only_on_partial_shared_last_block():
    c = PagedKVCache(16, 4, watermark=0)
    c.allocate("p", 6)  # blocks [x, y], y holds 2 tokens
    c.fork("p", "c")
    assert c.block_table("c") == c.block_table("p")
    assert c.num_used_blocks == 2 and c.filled_slots == 6 and c.allocated_slots == 8
    shared_last = c.block_table("p")[1]

    assert c.append_slots("c")
    assert c.cow_copies == 1
    tc, tp = c.block_table("c"), c.block_table("p")
    assert tc[0] == tp[0] and tc[1] != tp[1] and tp[1] == shared_last
    # Copied 2 tokens into the new block and wrote 1: 4 + 2 (shared y) + 3 (copy).
    assert c.filled_slots == 9 and c.num_used_blocks == 3

    # The parent now owns y alone: no copy on its next write.
    assert c.append_slots("p")
    assert c.cow_copies == 1 and c.block_table("p") == tp


def test_parent_write_after_fork_copies_too():
    c = PagedKVCache(16, 4, watermark=0)
    c.allocate("p", 1)
    c.append_slots("p")  # decode fast path: 2 tokens in block 0
    c.fork("p", "c")
    assert c.append_slots("p")  # 3rd token, still inside block 0, which is now shared
    assert c.cow_copies == 1
    assert c.block_table("p") != c.block_table("c")
    assert c.filled_slots == 2 + 3


def test_no_cow_when_shared_last_block_is_full():
    c = PagedKVCache(16, 4, watermark=0)
    c.allocate("p", 8)
    c.fork("p", "c")
    assert c.append_slots("c")
    assert c.append_slots("p")
    assert c.cow_copies == 0
    assert c.block_table("c")[:2] == c.block_table("p")[:2]
    assert c.block_table("c")[2] != c.block_table("p")[2]
    assert c.filled_slots == 10 and c.num_used_blocks == 4


def test_cow_fails_cleanly_when_no_block_for_the_copy():
    c = PagedKVCache(2, 4, watermark=0)
    c.allocate("p", 6)
    c.fork("p", "c")
    assert c.append_slots("c") is False
    assert c.cow_copies == 0 and c.block_table("c") == c.block_table("p")


def test_free_of_forked_keeps_shared_blocks():
    c = PagedKVCache(8, 4, watermark=0)
    c.allocate("p", 6)
    c.fork("p", "c")
    c.free("p")
    assert c.num_used_blocks == 2 and c.filled_slots == 6
    assert c.append_slots("c")  # now sole owner: no copy
    assert c.cow_copies == 0
    c.free("c")
    assert c.num_free_blocks == 8 and c.filled_slots == 0


def test_prefix_hits_share_blocks_and_hit_rate():
    c = PagedKVCache(32, 4, watermark=0, enable_prefix_caching=True)
    assert c.allocate("a", 10, [11, 12]) == 0  # 2 full blocks registered, 1 partial
    assert c.prefix_queries == 2 and c.prefix_hits == 0
    assert c.allocate("b", 13, [11, 12, 99]) == 8  # first two shared, third misses
    ta, tb = c.block_table("a"), c.block_table("b")
    assert tb[:2] == ta[:2] and tb[2] != ta[2]
    assert c.num_used_blocks == 3 + 2
    assert c.filled_slots == 10 + 5
    assert c.prefix_cache_hit_rate == pytest.approx(2 / 5)
    # Stop at the first miss even if a later hash is known.
    assert c.allocate("c", 12, [77, 12, 99]) == 0
    assert c.prefix_queries == 8 and c.prefix_hits == 2


def test_without_prefix_caching_hashes_are_ignored():
    c = PagedKVCache(32, 4, watermark=0)
    c.allocate("a", 8, [1, 2])
    assert c.allocate("b", 8, [1, 2]) == 0
    assert set(c.block_table("a")).isdisjoint(c.block_table("b"))
    assert c.prefix_queries == 0 and c.prefix_cache_hit_rate == 0.0


def test_hits_limited_to_blocks_filled_by_this_allocation():
    c = PagedKVCache(32, 4, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 12, [1, 2, 3])
    # A first prefill chunk of 5 tokens can only reuse its one full block; the whole prompt's
    # three blocks count as queried (as vLLM counts the prompt at admission).
    assert c.allocate("b", 5, [1, 2, 3]) == 4
    assert c.prefix_queries == 3 + 3 and c.prefix_hits == 1


def test_blocks_completed_by_append_are_registered():
    c = PagedKVCache(32, 4, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 3, [1, 2])  # chunked prefill: no full block yet
    c.append_slots("a", 5)  # now 8 tokens: blocks 0 and 1 full
    assert c.allocate("b", 8, [1, 2]) == 8
    assert c.block_table("b") == c.block_table("a")


def test_block_filled_token_by_token_is_registered():
    c = PagedKVCache(32, 4, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 1, [1, 2])
    for _ in range(3):
        c.append_slots("a")  # the 3rd append fills block 0 exactly
    assert c.allocate("b", 4, [1]) == 4
    assert c.block_table("b")[0] == c.block_table("a")[0]


def test_freed_prefix_blocks_go_to_lru_and_are_revived():
    c = PagedKVCache(8, 4, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 10, [1, 2])
    ta = c.block_table("a")
    c.free("a")
    # Two full hashed blocks are cached, the partial one is free.
    assert c.num_cached_blocks == 2 and c.num_free_blocks == 6 and c.num_used_blocks == 0
    assert c.filled_slots == 0
    assert c.allocate("b", 9, [1, 2]) == 8
    assert c.block_table("b")[:2] == ta[:2]
    assert c.num_cached_blocks == 0 and c.num_used_blocks == 3
    assert c.filled_slots == 9


def test_can_allocate_counts_revived_blocks_as_not_new():
    c = PagedKVCache(4, 4, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 16, [1, 2, 3, 4])
    c.free("a")
    assert c.num_cached_blocks == 4 and c.num_free_blocks == 0
    # 20 tokens: 4 revived + 1 new would need 5 blocks: refused.
    assert not c.can_allocate(20, [1, 2, 3, 4])
    assert c.can_allocate(16, [1, 2, 3, 4])
    assert c.allocate("b", 16, [1, 2, 3, 4]) == 16
    assert c.evictions == 0


def test_eviction_is_lru_and_drops_hash():
    c = PagedKVCache(4, 2, watermark=0, enable_prefix_caching=True)
    c.allocate("old", 2, [100])
    c.allocate("new", 2, [200])
    b_old, b_new = c.block_table("old")[0], c.block_table("new")[0]
    c.free("old")
    c.free("new")
    c.allocate("x", 4)  # takes the two truly free blocks, no eviction
    assert c.evictions == 0 and c.num_cached_blocks == 2
    c.allocate("y", 2)  # must evict: the least recently freed goes first
    assert c.evictions == 1 and c.block_table("y") == (b_old,)
    c.free("y")  # its block lost hash 100 on eviction, so it goes to the free list
    assert c.num_free_blocks == 1 and c.num_cached_blocks == 1
    assert c.allocate("z", 2, [100]) == 0 and c.block_table("z") == (b_old,)
    assert c.allocate("w", 2, [200]) == 2 and c.block_table("w") == (b_new,)
    assert c.num_used_blocks + c.num_free_blocks + c.num_cached_blocks == 4


def test_eviction_prefers_tail_of_freed_prefix():
    c = PagedKVCache(4, 2, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 6, [1, 2, 3])
    head = c.block_table("a")[0]
    c.free("a")
    c.allocate("x", 2)  # free block
    c.allocate("y", 4)  # evicts two: the tail blocks 3 and 2
    assert c.evictions == 2
    assert c.allocate("z", 2, [1]) == 2 and c.block_table("z") == (head,)


def test_append_may_evict_cached_blocks():
    c = PagedKVCache(3, 2, watermark=0, enable_prefix_caching=True)
    c.allocate("a", 2, [5])
    c.free("a")
    c.allocate("b", 4)
    assert c.num_free_blocks == 0 and c.num_cached_blocks == 1
    assert c.append_slots("b")
    assert c.evictions == 1 and c.num_cached_blocks == 0
    assert c.allocate("c", 2, [5]) is None


def test_swap_round_trip():
    c = PagedKVCache(8, 4, watermark=0, num_host_blocks=4)
    c.allocate("a", 10)
    assert c.can_swap_out("a")
    assert c.swap_out("a") == 3
    assert c.num_free_blocks == 8 and c.num_free_host_blocks == 1 and c.filled_slots == 0
    assert "a" in c and c.is_swapped("a") and c.num_tokens("a") == 10
    with pytest.raises(ValueError, match="swapped out"):
        c.append_slots("a")
    assert c.can_swap_in("a")
    assert c.swap_in("a") == 3
    assert len(c.block_table("a")) == 3 and c.num_tokens("a") == 10
    assert c.filled_slots == 10 and c.num_free_host_blocks == 4
    assert (c.swaps_out, c.swaps_in) == (1, 1)
    assert c.append_slots("a", 3)
    assert len(c.block_table("a")) == 4


def test_swap_limits():
    c = PagedKVCache(8, 4, watermark=0, num_host_blocks=2)
    c.allocate("a", 10)
    assert not c.can_swap_out("a")
    with pytest.raises(ValueError, match="host blocks"):
        c.swap_out("a")
    assert c.swaps_out == 0 and len(c.block_table("a")) == 3

    c = PagedKVCache(4, 4, watermark=0, num_host_blocks=4)
    c.allocate("a", 12)
    c.swap_out("a")
    c.allocate("b", 8)
    assert not c.can_swap_in("a")
    with pytest.raises(ValueError, match="cannot swap in"):
        c.swap_in("a")
    c.free("a")  # aborting a swapped request releases its host blocks
    assert c.num_free_host_blocks == 4 and "a" not in c


def test_swap_in_keeps_the_watermark():
    c = PagedKVCache(10, 4, watermark=0.2, num_host_blocks=8)  # 2 blocks held back
    c.allocate("a", 12)
    c.swap_out("a")
    c.allocate("b", 24)  # 6 used, 4 available
    assert not c.can_swap_in("a")  # 4 - 3 < 2
    c.free("b")
    c.allocate("b", 20)  # 5 used, 5 available
    assert c.can_swap_in("a") and c.swap_in("a") == 3


def test_swap_out_of_forked_request_keeps_shared_blocks():
    c = PagedKVCache(8, 4, watermark=0, num_host_blocks=8)
    c.allocate("p", 6)
    c.fork("p", "c")
    assert c.swap_out("c") == 2
    assert c.num_used_blocks == 2 and c.block_table("p") is not None
    assert c.swap_in("c") == 2
    assert set(c.block_table("c")).isdisjoint(c.block_table("p"))
    assert c.num_used_blocks == 4 and c.filled_slots == 12


def test_validation_errors():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        PagedKVCache(10, 0)
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        PagedKVCache(0, 16)
    with pytest.raises(ValueError, match="watermark"):
        PagedKVCache(10, 16, watermark=1.0)
    with pytest.raises(ValueError, match="watermark"):
        PagedKVCache(10, 16, watermark=-0.1)
    with pytest.raises(ValueError, match="num_host_blocks"):
        PagedKVCache(10, 16, num_host_blocks=-1)
    c = PagedKVCache(10, 16)
    with pytest.raises(ValueError, match="num_tokens"):
        c.allocate(1, 0)
    c.allocate(1, 5)
    with pytest.raises(ValueError, match="already allocated"):
        c.allocate(1, 5)
    c.allocate(2, 1)
    with pytest.raises(ValueError, match="already allocated"):
        c.fork(2, 1)
    with pytest.raises(ValueError, match="unknown request 7"):
        c.free(7)
    with pytest.raises(ValueError, match="unknown request"):
        c.append_slots(7)
    with pytest.raises(ValueError, match="unknown request"):
        c.num_tokens(7)
    with pytest.raises(ValueError, match="num_tokens"):
        c.append_slots(1, -1)
    with pytest.raises(ValueError, match="not swapped out"):
        c.can_swap_in(1)


def test_block_table_is_a_copy():
    c = PagedKVCache(4, 4, watermark=0)
    c.allocate(1, 4)
    t = c.block_table(1)
    assert isinstance(t, tuple)
    c.append_slots(1)
    assert len(t) == 1 and len(c.block_table(1)) == 2


def test_usage():
    c = PagedKVCache(10, 4, watermark=0)
    c.allocate(1, 9)
    assert c.usage == pytest.approx(0.3)
