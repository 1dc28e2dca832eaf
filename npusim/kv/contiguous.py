"""Contiguous KV-cache allocator: the "no PagedAttention" baseline of the vLLM paper.

Each request reserves one contiguous range of token slots in a single arena when it is admitted,
sized for its whole lifetime, and placed first-fit. Three kinds of waste follow: slots reserved
for tokens not generated yet, over-reservation ("max" policy, or an output shorter than reserved),
and external fragmentation (free slots split into holes too small for the next request).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable

POLICIES = ("max", "oracle")


class ContiguousKVCache:
    """First-fit arena of `capacity_tokens` slots with one reservation per request."""

    def __init__(self, capacity_tokens: int, *, policy: str = "max", max_model_len: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if max_model_len > capacity_tokens:
            raise ValueError(
                f"max_model_len must be <= capacity_tokens ({capacity_tokens}), got {max_model_len}"
            )
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity_tokens = capacity_tokens
        self.policy = policy
        self.max_model_len = max_model_len
        # Free ranges as (start, length), sorted by start, never adjacent (always coalesced).
        self._holes: list[tuple[int, int]] = [(0, capacity_tokens)]
        # request -> [start, reserved length, filled slots]
        self._res: dict[Hashable, list[int]] = {}
        self._reserved = 0
        self._filled = 0

    # ---- read-only views -------------------------------------------------------------------

    @property
    def reserved_slots(self) -> int:
        return self._reserved

    @property
    def filled_slots(self) -> int:
        return self._filled

    @property
    def free_slots(self) -> int:
        return self.capacity_tokens - self._reserved

    @property
    def largest_hole(self) -> int:
        return max((length for _, length in self._holes), default=0)

    @property
    def holes(self) -> list[tuple[int, int]]:
        return list(self._holes)

    @property
    def fragmentation_ratio(self) -> float:
        """1 - largest_hole / free_slots: how split up the free space is (0 when none is free)."""
        free = self.free_slots
        return 1.0 - self.largest_hole / free if free else 0.0

    def external_fragmentation(self, request_slots: int) -> int:
        """Free slots lying in holes too small to hold a reservation of `request_slots`."""
        return sum(length for _, length in self._holes if length < request_slots)

    def reservation(self, req_id: Hashable) -> tuple[int, int]:
        """(start, length) of the request's reserved range."""
        start, length, _ = self._get(req_id)
        return start, length

    def num_tokens(self, req_id: Hashable) -> int:
        return self._get(req_id)[2]

    def __contains__(self, req_id: Hashable) -> bool:
        return req_id in self._res

    contains = __contains__

    # ---- operations ------------------------------------------------------------------------

    def reservation_size(self, prompt_len: int, output_len: int) -> int:
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if output_len < 0:
            raise ValueError(f"output_len must be >= 0, got {output_len}")
        if prompt_len + output_len > self.max_model_len:
            raise ValueError(
                f"prompt_len + output_len must be <= max_model_len ({self.max_model_len}), "
                f"got {prompt_len + output_len}"
            )
        # "max" is what a system without knowledge of the output length must do; "oracle" is
        # the best a contiguous allocator could do, knowing each output length in advance.
        return self.max_model_len if self.policy == "max" else prompt_len + output_len

    def can_allocate(self, prompt_len: int, output_len: int) -> bool:
        return self._first_fit(self.reservation_size(prompt_len, output_len)) is not None

    def allocate(self, req_id: Hashable, prompt_len: int, output_len: int) -> bool:
        """Reserve a range for the request and fill its prompt; False if no hole is big enough."""
        if req_id in self._res:
            raise ValueError(f"request {req_id!r} is already allocated")
        size = self.reservation_size(prompt_len, output_len)
        i = self._first_fit(size)
        if i is None:
            return False
        start, length = self._holes[i]
        if length == size:
            del self._holes[i]
        else:
            self._holes[i] = (start + size, length - size)
        self._res[req_id] = [start, size, prompt_len]
        self._reserved += size
        self._filled += prompt_len
        return True

    def append_slots(self, req_id: Hashable, n: int = 1) -> bool:
        """Fill n more reserved slots. Always True: the space was reserved at admission."""
        res = self._get(req_id)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if res[2] + n > res[1]:
            raise ValueError(
                f"request {req_id!r} would hold {res[2] + n} tokens, "
                f"more than its reservation of {res[1]}"
            )
        res[2] += n
        self._filled += n
        return True

    def free(self, req_id: Hashable) -> None:
        start, size, filled = self._get(req_id)
        del self._res[req_id]
        self._reserved -= size
        self._filled -= filled
        holes = self._holes
        i = bisect_left(holes, (start, 0))
        # Merge with the hole that ends where this range starts and the one that starts where
        # it ends, so that holes stay maximal and first fit sees all contiguous free space.
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] == start:
            i -= 1
            start, size = holes[i][0], holes[i][1] + size
            del holes[i]
        if i < len(holes) and holes[i][0] == start + size:
            size += holes[i][1]
            del holes[i]
        holes.insert(i, (start, size))

    def check(self) -> None:
        """Raise AssertionError unless reservations and holes tile the arena without overlap and
        the counters equal a recount. For tests."""
        spans = sorted([(s, n) for s, n, _ in self._res.values()] + self._holes)
        pos = 0
        for start, length in spans:
            assert start == pos and length > 0, "ranges overlap or leave a gap"
            pos += length
        assert pos == self.capacity_tokens, "ranges do not cover the arena"
        assert self._reserved == sum(n for _, n, _ in self._res.values()), "reserved miscounted"
        assert self._filled == sum(f for _, n, f in self._res.values()), "filled miscounted"
        assert all(0 <= f <= n for _, n, f in self._res.values()), "a request overfills its range"

    # ---- internals -------------------------------------------------------------------------

    def _get(self, req_id: Hashable) -> list[int]:
        res = self._res.get(req_id)
        if res is None:
            raise ValueError(f"unknown request {req_id!r}")
        return res

    def _first_fit(self, size: int) -> int | None:
        for i, (_, length) in enumerate(self._holes):
            if length >= size:
                return i
        return None
