import pytest

from npusim.kv import ContiguousKVCache


def test_reservation_sizes_max_vs_oracle():
    m = ContiguousKVCache(1000, policy="max", max_model_len=100)
    o = ContiguousKVCache(1000, policy="oracle", max_model_len=100)
    assert m.reservation_size(10, 20) == 100
    assert o.reservation_size(10, 20) == 30
    assert o.reservation_size(100, 0) == 100
    for c in (m, o):
        with pytest.raises(ValueError, match="max_model_len"):
            c.reservation_size(90, 11)
        with pytest.raises(ValueError, match="max_model_len"):
            c.allocate("big", 90, 11)
    assert m.allocate(1, 10, 20) and m.reserved_slots == 100 and m.filled_slots == 10
    assert o.allocate(1, 10, 20) and o.reserved_slots == 30 and o.filled_slots == 10


def test_first_fit_and_coalescing():
    c = ContiguousKVCache(100, policy="oracle", max_model_len=100)
    for rid, size in [("a", 10), ("b", 20), ("c", 30), ("d", 40)]:
        assert c.allocate(rid, size, 0)
    assert c.reservation("c") == (30, 30)
    assert c.free_slots == 0 and not c.can_allocate(1, 0)
    c.free("b")  # hole (10, 20)
    c.free("d")  # hole (60, 40)
    assert c.holes == [(10, 20), (60, 40)]
    # First fit takes the first hole that is big enough, not the best fitting one.
    assert c.allocate("e", 15, 0) and c.reservation("e") == (10, 15)
    assert c.allocate("f", 10, 0) and c.reservation("f") == (60, 10)
    assert c.holes == [(25, 5), (70, 30)]
    c.free("c")  # (30,30) merges with (25,5) on its left; (60..) is still f
    assert c.holes == [(25, 35), (70, 30)]
    c.free("f")  # joins both neighbours into one hole
    assert c.holes == [(25, 75)]
    c.free("a")
    c.free("e")
    assert c.holes == [(0, 100)]
    assert c.reserved_slots == 0 and c.filled_slots == 0 and c.free_slots == 100


def test_allocate_fails_when_no_hole_fits_despite_free_space():
    c = ContiguousKVCache(100, policy="oracle", max_model_len=100)
    for i in range(10):
        c.allocate(i, 10, 0)
    for i in range(0, 10, 2):
        c.free(i)
    assert c.free_slots == 50 and c.largest_hole == 10
    assert not c.can_allocate(11, 0)
    assert c.allocate("x", 11, 0) is False
    assert "x" not in c and c.free_slots == 50


def test_external_fragmentation_numbers():
    c = ContiguousKVCache(100, policy="oracle", max_model_len=100)
    sizes = [5, 10, 15, 20, 30, 20]  # holes will be 5, 15, 30 (at 0, 15, 50)
    for i, s in enumerate(sizes):
        c.allocate(i, s, 0)
    for i in (0, 2, 4):
        c.free(i)
    assert c.holes == [(0, 5), (15, 15), (50, 30)]
    assert c.free_slots == 50 and c.largest_hole == 30
    assert c.external_fragmentation(1) == 0
    assert c.external_fragmentation(10) == 5
    assert c.external_fragmentation(16) == 20
    assert c.external_fragmentation(31) == 50
    assert c.fragmentation_ratio == pytest.approx(1 - 30 / 50)


def test_fragmentation_ratio_edge_cases():
    c = ContiguousKVCache(10, policy="oracle", max_model_len=10)
    assert c.fragmentation_ratio == 0.0  # one hole
    c.allocate(1, 10, 0)
    assert c.free_slots == 0 and c.fragmentation_ratio == 0.0 and c.largest_hole == 0


def test_append_within_reservation():
    c = ContiguousKVCache(100, policy="oracle", max_model_len=50)
    c.allocate(1, 10, 3)
    assert c.append_slots(1) and c.append_slots(1, 2)
    assert c.num_tokens(1) == 13 and c.filled_slots == 13
    with pytest.raises(ValueError, match="reservation of 13"):
        c.append_slots(1)
    assert c.filled_slots == 13
    c.free(1)
    assert c.filled_slots == 0


def test_validation():
    with pytest.raises(ValueError, match="capacity_tokens must be >= 1, got 0"):
        ContiguousKVCache(0, max_model_len=1)
    with pytest.raises(ValueError, match="max_model_len must be >= 1"):
        ContiguousKVCache(10, max_model_len=0)
    with pytest.raises(ValueError, match="max_model_len must be <= capacity_tokens"):
        ContiguousKVCache(10, max_model_len=11)
    with pytest.raises(ValueError, match="max, oracle.*'best'"):
        ContiguousKVCache(10, policy="best", max_model_len=10)
    c = ContiguousKVCache(10, max_model_len=10)
    with pytest.raises(ValueError, match="prompt_len"):
        c.allocate(1, 0, 1)
    with pytest.raises(ValueError, match="output_len"):
        c.allocate(1, 1, -1)
    c.allocate(1, 1, 1)
    with pytest.raises(ValueError, match="already allocated"):
        c.allocate(1, 1, 1)
    with pytest.raises(ValueError, match="unknown request 2"):
        c.free(2)
    with pytest.raises(ValueError, match="unknown request"):
        c.append_slots(2)
