"""Time-weighted KV-cache memory metrics.

The simulator records one sample per iteration, so a run can produce millions of samples. The
timeline therefore keeps running integrals for its summary (constant memory) and only a bounded,
evenly decimated series for plotting.

A sample's values hold from its time until the next sample's time (a step function); the last
sample marks the end of the run and adds no duration.
"""

from __future__ import annotations


def waste_fraction(allocated: int, filled: int) -> float:
    """(allocated - filled) / allocated: the share of allocated KV slots holding no token."""
    if filled < 0 or filled > allocated:
        raise ValueError(f"filled must be in [0, allocated={allocated}], got {filled}")
    return (allocated - filled) / allocated if allocated else 0.0


class MemoryTimeline:
    """Samples of KV memory state over simulated time; see `record` and `summary`.

    Units: `allocated_slots`/`filled_slots` are token slots; `used/free/cached_blocks` are blocks
    (for a contiguous cache pass slots as blocks: reserved, free, 0). Capacity is taken per sample
    as used + free + cached.
    """

    def __init__(self, max_points: int = 1024) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.max_points = max_points
        self.num_samples = 0
        self._t0 = 0.0
        self._t = 0.0
        # Values of the latest sample, integrated over time when the next sample arrives.
        self._alloc = 0
        self._filled = 0
        self._waste = 0.0
        self._used_frac = 0.0
        self._cached = 0
        self._int_alloc = 0.0
        self._int_filled = 0.0
        self._int_waste = 0.0
        self._int_used_frac = 0.0
        self._int_cached = 0.0
        self._peak_alloc = 0
        self._peak_filled = 0
        self._peak_unfilled = 0
        self._peak_waste = 0.0
        self._peak_used_frac = 0.0
        self._series: list[tuple[float, int, int, int, int, int]] = []
        self._stride = 1

    def record(
        self,
        t: float,
        allocated_slots: int,
        filled_slots: int,
        used_blocks: int,
        free_blocks: int,
        cached_blocks: int = 0,
    ) -> None:
        # Called once per simulated iteration: kept to plain arithmetic on a few attributes.
        if filled_slots < 0 or filled_slots > allocated_slots:
            raise ValueError(f"filled must be in [0, allocated={allocated_slots}], got {filled_slots}")
        waste = (allocated_slots - filled_slots) / allocated_slots if allocated_slots else 0.0
        capacity = used_blocks + free_blocks + cached_blocks
        used_frac = used_blocks / capacity if capacity else 0.0
        n = self.num_samples
        if n:
            dt = t - self._t
            if dt < 0:
                raise ValueError(f"t must not decrease: got {t} after {self._t}")
            if dt:
                self._int_alloc += self._alloc * dt
                self._int_filled += self._filled * dt
                self._int_waste += self._waste * dt
                self._int_used_frac += self._used_frac * dt
                self._int_cached += self._cached * dt
        else:
            self._t0 = t
        self._t = t
        self._alloc = allocated_slots
        self._filled = filled_slots
        self._waste = waste
        self._used_frac = used_frac
        self._cached = cached_blocks
        if allocated_slots > self._peak_alloc:
            self._peak_alloc = allocated_slots
        if filled_slots > self._peak_filled:
            self._peak_filled = filled_slots
        if allocated_slots - filled_slots > self._peak_unfilled:
            self._peak_unfilled = allocated_slots - filled_slots
        if waste > self._peak_waste:
            self._peak_waste = waste
        if used_frac > self._peak_used_frac:
            self._peak_used_frac = used_frac
        if n % self._stride == 0:
            self._series.append(
                (t, allocated_slots, filled_slots, used_blocks, free_blocks, cached_blocks)
            )
            if len(self._series) > self.max_points:
                # Keeping every other point halves memory and keeps the points evenly spaced in
                # sample count; later samples are then kept at the doubled stride.
                self._series = self._series[::2]
                self._stride *= 2
        self.num_samples = n + 1

    @property
    def duration(self) -> float:
        return self._t - self._t0

    def series(self) -> list[tuple[float, int, int, int, int, int]]:
        """Decimated samples (t, allocated, filled, used, free, cached), at most max_points."""
        return list(self._series)

    def summary(self) -> dict[str, float | int]:
        T = self.duration
        if T > 0:
            mean_alloc = self._int_alloc / T
            mean_filled = self._int_filled / T
            mean_waste = self._int_waste / T
            mean_used = self._int_used_frac / T
            mean_cached = self._int_cached / T
        else:
            # No elapsed time (zero or one sample, or all at one instant): the state is the mean.
            mean_alloc, mean_filled = float(self._alloc), float(self._filled)
            mean_waste, mean_used = self._waste, self._used_frac
            mean_cached = float(self._cached)
        return {
            "num_samples": self.num_samples,
            "duration": float(T),
            # Time-weighted mean of the per-sample waste fraction.
            "mean_waste_fraction": float(mean_waste),
            "peak_waste_fraction": float(self._peak_waste),
            # Unfilled slot-time over allocated slot-time: weights busy periods by their size.
            "aggregate_waste_fraction": (
                float((mean_alloc - mean_filled) / mean_alloc) if mean_alloc else 0.0
            ),
            "mean_used_fraction": float(mean_used),
            "peak_used_fraction": float(self._peak_used_frac),
            "mean_allocated_slots": float(mean_alloc),
            "peak_allocated_slots": self._peak_alloc,
            "mean_filled_slots": float(mean_filled),
            "peak_filled_slots": self._peak_filled,
            # For a paged cache this is internal fragmentation (unfilled last blocks); for a
            # contiguous one it also includes slots reserved for tokens not generated yet.
            "mean_unfilled_slots": float(mean_alloc - mean_filled),
            "peak_unfilled_slots": self._peak_unfilled,
            "mean_cached_blocks": float(mean_cached),
        }
