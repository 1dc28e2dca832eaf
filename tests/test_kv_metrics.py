from itertools import pairwise

import pytest

from npusim.kv import MemoryTimeline, PagedKVCache, waste_fraction


def test_waste_fraction():
    assert waste_fraction(0, 0) == 0.0
    assert waste_fraction(16, 4) == pytest.approx(0.75)
    assert waste_fraction(16, 16) == 0.0
    with pytest.raises(ValueError):
        waste_fraction(4, 5)
    with pytest.raises(ValueError):
        waste_fraction(4, -1)


def test_time_weighted_means_and_peaks():
    tl = MemoryTimeline()
    # (t, allocated, filled, used, free, cached); capacity 10 blocks.
    tl.record(0.0, 100, 50, 5, 5, 0)  # waste .5, used .5, held 1 s
    tl.record(1.0, 200, 200, 10, 0, 0)  # waste 0, used 1, held 3 s
    tl.record(4.0, 0, 0, 0, 8, 2)  # end
    s = tl.summary()
    assert s["num_samples"] == 3
    assert s["duration"] == 4.0
    assert s["mean_waste_fraction"] == pytest.approx(0.5 * 1 / 4)
    assert s["peak_waste_fraction"] == pytest.approx(0.5)
    assert s["mean_used_fraction"] == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)
    assert s["peak_used_fraction"] == pytest.approx(1.0)
    assert s["mean_allocated_slots"] == pytest.approx((100 + 600) / 4)
    assert s["mean_filled_slots"] == pytest.approx((50 + 600) / 4)
    assert s["mean_unfilled_slots"] == pytest.approx(50 / 4)
    assert s["aggregate_waste_fraction"] == pytest.approx(50 / 700)
    assert s["peak_allocated_slots"] == 200 and s["peak_unfilled_slots"] == 50
    assert s["mean_cached_blocks"] == 0.0
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_zero_duration_and_empty():
    s = MemoryTimeline().summary()
    assert s["num_samples"] == 0 and s["mean_waste_fraction"] == 0.0
    tl = MemoryTimeline()
    tl.record(5.0, 16, 4, 1, 3, 0)
    s = tl.summary()
    assert s["duration"] == 0.0
    assert s["mean_waste_fraction"] == pytest.approx(0.75)
    assert s["mean_used_fraction"] == pytest.approx(0.25)


def test_time_must_not_decrease():
    tl = MemoryTimeline()
    tl.record(1.0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="decrease"):
        tl.record(0.5, 0, 0, 0, 1)


def test_series_is_bounded_and_evenly_decimated():
    tl = MemoryTimeline(max_points=8)
    for i in range(1000):
        tl.record(float(i), i, 0, 0, 1)
    pts = tl.series()
    assert 4 <= len(pts) <= 8
    ts = [p[0] for p in pts]
    assert ts[0] == 0.0
    gaps = {b - a for a, b in pairwise(ts)}
    assert len(gaps) == 1  # evenly spaced in sample count
    assert tl.summary()["peak_allocated_slots"] == 999  # peaks see every sample


def test_summary_of_a_paged_run():
    c = PagedKVCache(8, 4, watermark=0)
    tl = MemoryTimeline()

    def rec(t):
        tl.record(
            t, c.allocated_slots, c.filled_slots, c.num_used_blocks, c.num_free_blocks,
            c.num_cached_blocks,
        )

    c.allocate(1, 5)  # 8 allocated, 5 filled
    rec(0.0)
    c.append_slots(1, 3)  # 8 allocated, 8 filled
    rec(2.0)
    c.free(1)
    rec(4.0)
    s = tl.summary()
    assert s["mean_waste_fraction"] == pytest.approx((3 / 8) * 2 / 4)
    assert s["mean_used_fraction"] == pytest.approx(2 / 8)
    assert s["mean_unfilled_slots"] == pytest.approx(3 * 2 / 4)
