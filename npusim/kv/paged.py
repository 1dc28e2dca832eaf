"""Paged KV-cache block allocator (PagedAttention, as in vLLM).

The KV cache is split into `num_blocks` fixed-size blocks of `block_size` token slots. A request
owns a block table (a list of physical block ids); only its last block may be partly filled.
Blocks carry refcounts so that forks and prefix-cache hits can share them; a write into a shared,
partly filled last block copies it first (copy-on-write).

Every physical block is in exactly one of three states:
  used    refcount > 0, referenced by at least one block table;
  free    refcount 0, on the free stack;
  cached  refcount 0 but holding a registered prefix hash, in the LRU dict; it can be revived by a
          prefix-cache hit, or evicted (hash dropped) when a fresh block is needed.
so that used + free + cached == num_blocks at all times.

Only counts are simulated: no tensors are allocated and no data is copied.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Request:
    table: list[int]  # physical block ids; empty while swapped out
    num_tokens: int  # slots filled
    hashes: Sequence[int] | None  # prefix hashes of the prompt's full blocks, if any
    # Appends that keep num_tokens below this need no new block, no copy and no hash
    # registration (see _set_fast_limit). Lets the per-token decode path skip all lookups.
    fast_limit: int = 0


class PagedKVCache:
    """Block allocator with refcounts, copy-on-write, prefix caching and host swap."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        watermark: float = 0.01,
        enable_prefix_caching: bool = False,
        num_host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {watermark}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.watermark = watermark
        # vLLM keeps this many blocks free at admission so that running requests can still grow
        # for a while without being preempted right after a new one is let in.
        self.watermark_blocks = int(watermark * num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.num_host_blocks = num_host_blocks

        # Free blocks hold nothing worth keeping (cached prefixes are in their own LRU), so the
        # order they are reused in does not matter: a stack, taken from and given back at its end
        # in bulk.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref: list[int] = [0] * num_blocks
        # LRU of refcount-0 blocks that still hold a prefix hash; oldest first, evicted first.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}

        self._reqs: dict[Hashable, _Request] = {}  # on the device
        self._swapped: dict[Hashable, _Request] = {}  # on the host
        self._host_used = 0

        # Token slots held in used blocks, each physical block counted once. Kept incrementally so
        # that reading it costs nothing per simulator iteration.
        self._filled = 0
        # Whether a block can be referenced twice (prefix caching, or a fork happened): until then
        # a release frees its whole table without looking at refcounts.
        self._shared = enable_prefix_caching

        self.cow_copies = 0
        self.swaps_out = 0
        self.swaps_in = 0
        self.evictions = 0
        # Prefix-cache statistics are in blocks: a query is one full prompt block looked up.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- read-only views -------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free) - len(self._cached)

    @property
    def num_free_host_blocks(self) -> int:
        return self.num_host_blocks - self._host_used

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self._num_blocks

    @property
    def allocated_slots(self) -> int:
        return self.num_used_blocks * self._block_size

    @property
    def filled_slots(self) -> int:
        return self._filled

    def occupancy(self) -> tuple[int, int, int, int, int]:
        """(allocated slots, filled slots, used, free and cached blocks), in one call."""
        free, cached = len(self._free), len(self._cached)
        used = self._num_blocks - free - cached
        return used * self._block_size, self._filled, used, free, cached

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of looked-up full prompt blocks found in the cache (0.0 before any lookup)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def num_tokens(self, req_id: Hashable) -> int:
        req = self._reqs.get(req_id)
        if req is None:
            req = self._swapped.get(req_id)
        if req is None:
            raise self._missing(req_id)
        return req.num_tokens

    def block_table(self, req_id: Hashable) -> tuple[int, ...]:
        return tuple(self._get(req_id).table)

    def contains(self, req_id: Hashable) -> bool:
        """True for a request on the device or swapped out to host."""
        return req_id in self._reqs or req_id in self._swapped

    __contains__ = contains

    def is_swapped(self, req_id: Hashable) -> bool:
        return req_id in self._swapped

    # ---- admission -------------------------------------------------------------------------

    def can_allocate(self, num_tokens: int, prefix_hashes: Sequence[int] | None = None) -> bool:
        _, revived, new = self._plan(num_tokens, prefix_hashes)
        return self._available() - revived - new >= self.watermark_blocks

    def cached_prefix_tokens(self, num_tokens: int, prefix_hashes: Sequence[int] | None) -> int:
        """Tokens of the first `num_tokens` that allocate() would find in the prefix cache now."""
        return len(self._plan(num_tokens, prefix_hashes)[0]) * self._block_size

    def allocate(
        self, req_id: Hashable, num_tokens: int, prefix_hashes: Sequence[int] | None = None
    ) -> int | None:
        """Admit a request whose first `num_tokens` slots are filled now.

        Returns the number of those tokens found in the prefix cache (a multiple of block_size),
        or None if admission would dip below the watermark (then nothing changes). The caller
        decides whether a full hit still recomputes the last token, as vLLM does for its logits.
        """
        if req_id in self:
            raise ValueError(f"request {req_id!r} is already allocated")
        hits, revived, new = self._plan(num_tokens, prefix_hashes)
        if self._available() - revived - new < self.watermark_blocks:
            return None

        ref = self._ref
        # Take hits before fresh blocks: taking a fresh block may evict from the LRU, and it must
        # not evict a cached block we are about to revive.
        for b in hits:
            if ref[b] == 0:
                del self._cached[b]
                self._filled += self._block_size  # a revived block is full
            ref[b] += 1
        table = hits + self._take_blocks(new)
        self._filled += num_tokens - len(hits) * self._block_size
        caching = self.enable_prefix_caching and bool(prefix_hashes)
        req = _Request(table, num_tokens, prefix_hashes if caching else None)
        self._reqs[req_id] = req
        self._set_fast_limit(req)

        if caching:
            # vLLM counts the whole prompt as queried at admission, however much of it the
            # first chunk fills
            self.prefix_queries += len(prefix_hashes)
            self.prefix_hits += len(hits)
            self._register(req, len(hits), num_tokens // self._block_size)
        return len(hits) * self._block_size

    # ---- growth ----------------------------------------------------------------------------

    def append_slots(self, req_id: Hashable, num_tokens: int = 1) -> bool:
        """Grow the request by `num_tokens` slots; False (nothing changed) if blocks run out."""
        try:
            req = self._reqs[req_id]
        except KeyError:
            raise self._missing(req_id) from None
        old = req.num_tokens
        new = old + num_tokens
        # Decode fast path: the tokens fit in a last block this request owns alone.
        if old < new < req.fast_limit:
            req.num_tokens = new
            self._filled += num_tokens
            return True
        table = req.table
        bs = self._block_size
        if (req.fast_limit and req.hashes is None and old < new <= (len(table) + 1) * bs
                and self._free):
            # Next fastest: the last block is this request's alone (no copy-on-write) and one fresh
            # block takes the rest: a decode crossing into a new page.
            b = self._free.pop()
            self._ref[b] = 1
            table.append(b)
            self._filled += num_tokens
            req.num_tokens = new
            req.fast_limit = len(table) * bs + 1
            return True
        return self._append_slow(req, num_tokens)

    def _append_slow(self, req: _Request, num_tokens: int) -> bool:
        if num_tokens <= 0:
            if num_tokens == 0:
                return True
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        bs = self._block_size
        ref = self._ref
        table = req.table
        old = req.num_tokens
        new = old + num_tokens
        last = table[-1]
        last_fill = old - (len(table) - 1) * bs
        # Writing into a partly filled last block that others also reference would change their
        # view of it, so this request gets its own copy first.
        cow = last_fill < bs and ref[last] > 1
        need = -(-new // bs) - len(table) + cow
        if need == 1 and not cow and self._free:
            # The common case, a decode crossing into a new page: one block off the free list.
            b = self._free.pop()
            ref[b] = 1
            table.append(b)
            self._filled += num_tokens
            req.num_tokens = new
            if req.hashes is None:
                req.fast_limit = len(table) * bs + 1
            else:
                self._set_fast_limit(req)
                self._register(req, old // bs, new // bs)
            return True
        if need > self._available():
            return False
        fresh = self._take_blocks(need)
        if cow:
            ref[last] -= 1  # others still hold it, so it stays used
            table[-1] = fresh.pop()
            self._filled += last_fill
            self.cow_copies += 1
        table += fresh
        self._filled += num_tokens
        req.num_tokens = new
        self._set_fast_limit(req)
        if req.hashes is not None:
            self._register(req, old // bs, new // bs)
        return True

    def trim(self, req_id: Hashable, num_tokens: int) -> None:
        """Give back the request's last `num_tokens` slots, and the blocks left empty: slots taken
        for an iteration that will not run (its request was preempted before it). Only slots in
        blocks this request owns alone and that hold no prefix hash can be given back."""
        req = self._get(req_id)
        new = req.num_tokens - num_tokens
        if num_tokens < 0 or new < 1:
            raise ValueError(f"cannot trim {num_tokens} of {req.num_tokens} tokens of {req_id!r}")
        if num_tokens == 0:
            return
        bs = self._block_size
        table = req.table
        keep = self._blocks_for(new)
        for b in table[keep - 1 if new % bs else keep:]:
            if self._ref[b] != 1 or self._block_hash[b] is not None:
                raise ValueError(f"cannot trim {req_id!r}: block {b} is shared or holds a prefix hash")
        released = table[keep:]
        del table[keep:]
        for b in reversed(released):
            self._ref[b] = 0
            self._free.append(b)
        self._filled -= num_tokens
        req.num_tokens = new
        self._set_fast_limit(req)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent, e.g. for parallel sampling or beam search."""
        parent = self._get(parent_id)
        if child_id in self:
            raise ValueError(f"request {child_id!r} is already allocated")
        self._shared = True
        ref = self._ref
        for b in parent.table:
            ref[b] += 1
        # The last block is now shared: the next write of either must go through copy-on-write.
        parent.fast_limit = 0
        self._reqs[child_id] = _Request(list(parent.table), parent.num_tokens, parent.hashes)

    # ---- release ---------------------------------------------------------------------------

    def free(self, req_id: Hashable) -> None:
        """Release a finished, aborted or recompute-preempted request (device or host copy)."""
        req = self._swapped.pop(req_id, None)
        if req is not None:
            self._host_used -= self._blocks_for(req.num_tokens)
            return
        req = self._get(req_id)
        self._release(req)
        del self._reqs[req_id]

    def can_swap_out(self, req_id: Hashable) -> bool:
        return len(self._get(req_id).table) <= self.num_host_blocks - self._host_used

    def swap_out(self, req_id: Hashable) -> int:
        """Move the request's blocks to host memory; returns the number of blocks copied.

        Every block of the table is copied, shared ones included: the host copy is private to
        this request, so sharing is not restored on swap-in.
        """
        req = self._get(req_id)
        n = len(req.table)
        if n > self.num_host_blocks - self._host_used:
            raise ValueError(
                f"cannot swap out {req_id!r}: needs {n} host blocks, "
                f"{self.num_host_blocks - self._host_used} free"
            )
        self._release(req)
        req.table = []
        req.fast_limit = 0
        self._swapped[req_id] = self._reqs.pop(req_id)
        self._host_used += n
        self.swaps_out += 1
        return n

    def can_swap_in(self, req_id: Hashable, then_append: int = 0) -> bool:
        """Whether the request's blocks, and those `then_append` more tokens need, fit above the
        watermark (a swapped-in decode writes its next token at once: vLLM V0 counts that block)."""
        req = self._swapped.get(req_id)
        if req is None:
            raise ValueError(f"request {req_id!r} is not swapped out")
        # Swap-in is a re-admission, so it keeps the same watermark (vLLM V0 does too).
        need = self._blocks_for(req.num_tokens + then_append)
        return self._available() - need >= self.watermark_blocks

    def swap_in(self, req_id: Hashable) -> int:
        """Bring a swapped-out request back into fresh device blocks; returns blocks copied."""
        if not self.can_swap_in(req_id):
            raise ValueError(
                f"cannot swap in {req_id!r}: needs "
                f"{self._blocks_for(self._swapped[req_id].num_tokens)} device blocks above the "
                f"watermark of {self.watermark_blocks}, {self._available()} available"
            )
        req = self._swapped.pop(req_id)
        n = self._blocks_for(req.num_tokens)
        self._host_used -= n
        req.table = self._take_blocks(n)
        self._reqs[req_id] = req
        self._filled += req.num_tokens
        self._set_fast_limit(req)
        if req.hashes is not None:
            self._register(req, 0, req.num_tokens // self._block_size)
        self.swaps_in += 1
        return n

    def check(self) -> None:
        """Raise AssertionError unless the allocator's invariants hold: every block in exactly one
        of used, free and cached; refcounts equal the block tables' references; the filled-slot
        counter equals a recount; each table has the blocks its tokens need; every registered
        hash points at a block that holds it. Costs time in the pool size: for tests."""
        n = self._num_blocks
        used = [b for b in range(n) if self._ref[b] > 0]
        places = list(self._free) + list(self._cached) + used
        assert len(places) == len(set(places)) == n, "a block is in two states, or lost"
        counts = [0] * n
        filled = {}
        bs = self._block_size
        for req in self._reqs.values():
            assert len(req.table) == self._blocks_for(req.num_tokens), "table does not match its tokens"
            for i, b in enumerate(req.table):
                counts[b] += 1
                fill = min(bs, req.num_tokens - i * bs)
                filled[b] = max(filled.get(b, 0), fill)
        assert counts == self._ref, "refcounts differ from the block tables"
        assert self._filled == sum(filled.values()), "filled-slot counter differs from a recount"
        for b in self._cached:
            assert self._ref[b] == 0 and self._block_hash[b] is not None, "cached block without hash"
        for h, b in self._hash_to_block.items():
            assert self._block_hash[b] == h, "prefix hash points at the wrong block"
        host = sum(self._blocks_for(r.num_tokens) for r in self._swapped.values())
        assert host == self._host_used <= self.num_host_blocks, "host blocks miscounted"

    # ---- internals -------------------------------------------------------------------------

    def _available(self) -> int:
        # Cached blocks count as available: they are evicted on demand.
        return len(self._free) + len(self._cached)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def _get(self, req_id: Hashable) -> _Request:
        req = self._reqs.get(req_id)
        if req is None:
            raise self._missing(req_id)
        return req

    def _missing(self, req_id: Hashable) -> ValueError:
        """The error for a request that is not on the device."""
        if req_id in self._swapped:
            return ValueError(f"request {req_id!r} is swapped out")
        return ValueError(f"unknown request {req_id!r}")

    def _set_fast_limit(self, req: _Request) -> None:
        table = req.table
        if self._ref[table[-1]] != 1:
            req.fast_limit = 0  # shared last block: the next write copies it
        elif req.hashes is not None and len(table) <= len(req.hashes):
            # Filling the last block must register its hash, so stop one short of full.
            req.fast_limit = len(table) * self._block_size
        else:
            req.fast_limit = len(table) * self._block_size + 1

    def _plan(
        self, num_tokens: int, prefix_hashes: Sequence[int] | None
    ) -> tuple[list[int], int, int]:
        """(prefix-hit blocks, how many of them are revived from the LRU, fresh blocks needed)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        hits: list[int] = []
        if self.enable_prefix_caching and prefix_hashes:
            # Only blocks that this allocation fills completely can be hits.
            for h in prefix_hashes[: num_tokens // self._block_size]:
                b = self._hash_to_block.get(h)
                if b is None:
                    break
                hits.append(b)
        revived = len({b for b in hits if self._ref[b] == 0})
        return hits, revived, self._blocks_for(num_tokens) - len(hits)

    def _take_blocks(self, n: int) -> list[int]:
        """n blocks with refcount 1; the caller has checked that enough are available."""
        free = self._free
        if n <= len(free):
            blocks = free[len(free) - n:]
            del free[len(free) - n:]
        else:
            blocks = [self._take_block() for _ in range(n)]
        ref = self._ref
        for b in blocks:
            ref[b] = 1
        return blocks

    def _take_block(self) -> int:
        if self._free:
            return self._free.pop()
        # Evicting the least recently freed prefix block loses the least likely reuse.
        b, _ = self._cached.popitem(last=False)
        del self._hash_to_block[self._block_hash[b]]
        self._block_hash[b] = None
        self.evictions += 1
        return b

    def _release(self, req: _Request) -> None:
        ref = self._ref
        table = req.table
        if not self._shared:
            # No block was ever shared (no prefix cache, no fork): every refcount is 1.
            for b in table:
                ref[b] = 0
            self._filled -= req.num_tokens
            self._free.extend(reversed(table))
            return
        released = []
        # Release tail first: the LRU then evicts a prefix's tail before its head, and the head
        # (e.g. a system prompt) is the part other requests are most likely to share.
        for b in reversed(table):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                released.append(b)
        # Released blocks are full except the table's last one, if released, which holds the
        # tail of the sequence.
        bs = self._block_size
        self._filled -= len(released) * bs
        if ref[table[-1]] == 0:
            self._filled += len(table) * bs - req.num_tokens
        if self.enable_prefix_caching:
            block_hash = self._block_hash
            for b in released:
                if block_hash[b] is not None:
                    self._cached[b] = None
                else:
                    self._free.append(b)
        else:
            self._free.extend(released)

    def _register(self, req: _Request, start: int, stop: int) -> None:
        """Make the just-completed blocks table[start:stop] findable by their prefix hash."""
        hashes = req.hashes
        table = req.table
        for i in range(start, min(stop, len(hashes))):
            b = table[i]
            h = hashes[i]
            # A hash already mapped keeps its block (it may be shared); the duplicate stays
            # anonymous and returns to the free list when released.
            if h not in self._hash_to_block and self._block_hash[b] is None:
                self._hash_to_block[h] = b
                self._block_hash[b] = h
