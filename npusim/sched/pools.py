"""The KV pool the scheduler sees: one interface, a paged and a contiguous implementation.

The scheduler tells the pool how many tokens of a request it must hold (`grow(r, held, upto)`);
a paged pool takes pages as they fill, a contiguous one reserved the whole request at admission.
"""

from __future__ import annotations

from npusim.costmodel import MemoryPlan
from npusim.kv import ContiguousKVCache, PagedKVCache
from npusim.sched.request import Request
from npusim.specs import EngineConfig, ceil_div


class PagedPool:
    """vLLM's paged KV cache: fixed-size blocks, prefix caching, swap to host memory."""

    paged = True

    def __init__(self, plan: MemoryPlan, engine: EngineConfig):
        host_blocks = (int(engine.swap_space_gib * 2**30 // plan.block_bytes)
                       if engine.preemption_mode == "swap" else 0)
        self.kv = PagedKVCache(plan.num_blocks, engine.block_size, watermark=engine.watermark,
                               enable_prefix_caching=engine.enable_prefix_caching,
                               num_host_blocks=host_blocks)
        self.page_tokens = engine.block_size
        self.block_bytes = plan.block_bytes
        self.capacity_tokens = plan.num_blocks * engine.block_size
        self.prefix_caching = engine.enable_prefix_caching

    def capacity_problem(self, r: Request) -> str | None:
        need = ceil_div(r.prompt_len + r.output_len - 1, self.page_tokens)
        usable = self.kv.num_blocks - self.kv.watermark_blocks
        if need > usable:
            return (f"needs {need} KV blocks of {self.page_tokens} tokens at its longest, the pool has "
                    f"{usable} usable ({self.kv.num_blocks} minus the watermark)")
        return None

    def cached_tokens(self, r: Request) -> int:
        """Tokens of r's known tokens that the prefix cache holds now."""
        if not self.prefix_caching:
            return 0
        if r.hashes is None:
            r.hashes = r.block_hashes(self.page_tokens)
        return self.kv.cached_prefix_tokens(r.num_tokens, r.hashes)

    def admit(self, r: Request, num_tokens: int) -> bool:
        """Hold the first num_tokens of r (its prefix-cache hits, then fresh pages), unless that
        would dip into the admission watermark."""
        return self.kv.allocate(r.id, num_tokens, r.hashes if self.prefix_caching else None) is not None

    def grow(self, r: Request, held: int, upto: int) -> bool:
        return self.kv.append_slots(r.id, upto - held)

    def trim(self, r: Request, num_tokens: int) -> None:
        self.kv.trim(r.id, num_tokens)

    def held(self, r: Request) -> int:
        return self.kv.num_tokens(r.id)

    def holds(self, r: Request, tokens: int) -> bool:
        """Whether the pool holds exactly what `tokens` told tokens of r should occupy."""
        return self.kv.num_tokens(r.id) == tokens

    def free(self, r: Request) -> None:
        self.kv.free(r.id)

    def swap_out(self, r: Request) -> float | None:
        """Move r's pages to host memory and return the bytes copied, or None if there is no room."""
        if not self.kv.can_swap_out(r.id):
            return None
        return self.kv.swap_out(r.id) * self.block_bytes

    def swap_in(self, r: Request, then_append: int = 0) -> float | None:
        """Bring r's pages back (bytes copied), or None if the device has no room above the
        watermark for them and the `then_append` tokens it will write at once."""
        if not self.kv.can_swap_in(r.id, then_append):
            return None
        return self.kv.swap_in(r.id) * self.block_bytes

    def sample(self, untold: int) -> tuple[int, int, int, int, int]:
        """(allocated slots, filled slots, used, free and cached blocks) for the memory timeline;
        `untold` decoded tokens are in the pages but not yet counted by the allocator."""
        allocated, filled, used, free, cached = self.kv.occupancy()
        return allocated, filled + untold, used, free, cached

    def used(self) -> int:
        return self.kv.num_used_blocks

    def layout(self, requests) -> dict:
        return {r.id: self.kv.block_table(r.id) for r in requests}

    @property
    def swaps(self) -> int:
        return self.kv.swaps_out + self.kv.swaps_in

    @property
    def prefix_counts(self) -> tuple[int, int]:
        return self.kv.prefix_queries, self.kv.prefix_hits

    def check(self) -> None:
        self.kv.check()


class ContiguousPool:
    """One contiguous reservation per request, sized at admission for its whole life (the vLLM
    paper's baseline): `max_model_len` slots, or exactly prompt + output with the oracle policy."""

    paged = False
    page_tokens = 0

    def __init__(self, plan: MemoryPlan, engine: EngineConfig, policy: str, max_model_len: int):
        self.kv = ContiguousKVCache(plan.num_blocks * engine.block_size, policy=policy,
                                    max_model_len=max_model_len)
        self.capacity_tokens = self.kv.capacity_tokens

    def capacity_problem(self, r: Request) -> str | None:
        need = self.kv.reservation_size(r.prompt_len, r.output_len)
        if need > self.kv.capacity_tokens:
            return f"reserves {need} contiguous KV slots, the arena holds {self.kv.capacity_tokens}"
        return None

    def cached_tokens(self, r: Request) -> int:
        return 0

    def admit(self, r: Request, num_tokens: int) -> bool:
        """Reserve r's range; its prompt's slots count as filled from now on."""
        return self.kv.allocate(r.id, r.prompt_len, r.output_len)

    def grow(self, r: Request, held: int, upto: int) -> bool:
        extra = upto - max(held, r.prompt_len)  # the prompt was filled at admission
        if extra > 0:
            self.kv.append_slots(r.id, extra)
        return True  # the reservation always has room

    def trim(self, r: Request, num_tokens: int) -> None:  # pragma: no cover - never ahead
        raise AssertionError("a contiguous reservation never takes slots ahead")

    def held(self, r: Request) -> int:
        return self.kv.num_tokens(r.id)

    def holds(self, r: Request, tokens: int) -> bool:
        return self.kv.num_tokens(r.id) == max(tokens, r.prompt_len)  # the prompt filled at admission

    def free(self, r: Request) -> None:
        self.kv.free(r.id)

    def swap_out(self, r: Request) -> float | None:
        return None  # a reservation never runs out, so it is never preempted

    def swap_in(self, r: Request, then_append: int = 0) -> float | None:  # pragma: no cover - nothing is swapped
        return None

    def sample(self, untold: int) -> tuple[int, int, int, int, int]:
        kv = self.kv
        reserved = kv.reserved_slots
        return reserved, kv.filled_slots + untold, reserved, kv.free_slots, 0

    def used(self) -> int:
        return self.kv.reserved_slots

    def layout(self, requests) -> dict:
        return {r.id: self.kv.reservation(r.id) for r in requests}

    swaps = 0
    prefix_counts = (0, 0)

    def check(self) -> None:
        self.kv.check()
