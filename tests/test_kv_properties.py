"""Stateful property tests: random operation sequences checked against a simple model.

The paged model tracks, per physical block, the tokens written into it, and per request the
token sequence it should see. Every write is checked to land in a block the writer owns alone
(or just took), which is what copy-on-write must guarantee; every request's blocks must then
read back exactly its own sequence.
"""

import math
from itertools import pairwise

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from npusim.kv import ContiguousKVCache, PagedKVCache

# Sized so that the whole kv suite stays well under 30 s on two cores.
PAGED_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CONTIGUOUS_SETTINGS = settings(PAGED_SETTINGS, max_examples=60, stateful_step_count=40)


class PagedMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(1, 20),
        bs=st.sampled_from([1, 2, 3, 4]),
        prefix=st.booleans(),
        host=st.integers(0, 12),
        watermark=st.sampled_from([0.0, 0.0, 0.1, 0.25]),
    )
    def setup(self, num_blocks, bs, prefix, host, watermark):
        self.c = PagedKVCache(
            num_blocks, bs, watermark=watermark, enable_prefix_caching=prefix,
            num_host_blocks=host,
        )
        self.bs = bs
        self.nb = num_blocks
        self.content = [[] for _ in range(num_blocks)]  # tokens written into each block
        self.tokens = {}  # request -> tokens it holds
        self.pending = {}  # request -> prompt tokens not yet filled (chunked prefill)
        self.hashes = {}  # request -> prefix hashes of its prompt's full blocks
        self.swapped = set()
        self.block_tokens_of_hash = {}  # prefix hash -> the block content it stands for
        self.next_id = 0
        self.fresh = 0

    # ---- helpers ---------------------------------------------------------------------------

    def device_reqs(self):
        return sorted(r for r in self.tokens if r not in self.swapped)

    def snapshot(self):
        c = self.c
        return (
            {r: c.block_table(r) for r in self.device_reqs()},
            {r: c.num_tokens(r) for r in self.tokens},
            list(c._ref), list(c._free), list(c._cached), c.filled_slots,
            c.cow_copies, c.num_free_host_blocks, dict(c._hash_to_block),
        )

    def hashes_for(self, prompt):
        hs = []
        for i in range(len(prompt) // self.bs):
            block = tuple(prompt[i * self.bs:(i + 1) * self.bs])
            h = hash(tuple(prompt[:(i + 1) * self.bs]))
            self.block_tokens_of_hash[h] = list(block)
            hs.append(h)
        return hs

    def next_tokens(self, r, n):
        out = []
        for _ in range(n):
            if self.pending[r]:
                out.append(self.pending[r].pop(0))
            else:
                self.fresh += 1
                out.append(("gen", self.fresh))
        return out

    def write(self, r, new_tokens, ref_before, owned_before):
        """Model the SUT writing new_tokens at the end of r's sequence; check where they land."""
        table = self.c.block_table(r)
        start = len(self.tokens[r])
        for k, tok in enumerate(new_tokens):
            p = start + k
            b = table[p // self.bs]
            # Copy-on-write: a write goes only to a block this request had alone, or took now.
            assert (b in owned_before and ref_before[b] == 1) or ref_before[b] == 0
            assert self.c._ref[b] == 1
            assert len(self.content[b]) == p % self.bs
            self.content[b].append(tok)
        self.tokens[r].extend(new_tokens)

    # ---- rules -----------------------------------------------------------------------------

    @rule(
        data=st.data(),
        family=st.integers(0, 2),
        shared=st.integers(0, 10),
        own=st.integers(0, 6),
    )
    def allocate(self, data, family, shared, own):
        r = self.next_id
        self.next_id += 1
        prompt = [("sys", family, i) for i in range(shared)] + [("req", r, i) for i in range(own)]
        if not prompt:
            prompt = [("req", r, 0)]
        # Mostly the whole prompt at once, sometimes a first chunk (chunked prefill).
        n = data.draw(st.just(len(prompt)) | st.integers(1, len(prompt)), label="first_chunk")
        hashes = self.hashes_for(prompt)
        before = self.snapshot()
        # Expected hits: the leading hashes (of blocks this chunk fills) that the cache knows.
        hit_blocks = []
        if self.c.enable_prefix_caching:
            for h in hashes[: n // self.bs]:
                if h not in before[8]:
                    break
                hit_blocks.append(before[8][h])
        revived = len({b for b in hit_blocks if before[2][b] == 0})
        new = math.ceil(n / self.bs) - len(hit_blocks)
        admit = len(before[3]) + len(before[4]) - revived - new >= self.c.watermark_blocks
        assert self.c.can_allocate(n, hashes) == admit
        q0, h0 = self.c.prefix_queries, self.c.prefix_hits
        hit = self.c.allocate(r, n, hashes)
        assert (hit is not None) == admit
        if hit is None:
            assert self.snapshot() == before
            return
        assert hit == len(hit_blocks) * self.bs
        assert self.c.block_table(r)[: len(hit_blocks)] == tuple(hit_blocks)
        ref_before = before[2]
        table = self.c.block_table(r)
        assert len(table) == math.ceil(n / self.bs)
        assert hit % self.bs == 0 and hit <= n
        if not self.c.enable_prefix_caching:
            assert hit == 0
        else:
            assert self.c.prefix_queries - q0 == len(hashes)
            assert self.c.prefix_hits - h0 == hit // self.bs
        nhit = hit // self.bs
        for i in range(nhit):
            # A prefix hit must hand back a block holding exactly this prompt block.
            assert self.content[table[i]] == prompt[i * self.bs:(i + 1) * self.bs]
        for b in table[nhit:]:
            assert ref_before[b] == 0
            self.content[b] = []
        self.tokens[r] = list(prompt[:nhit * self.bs])
        self.pending[r] = list(prompt[nhit * self.bs:])
        self.hashes[r] = hashes
        self.write(r, self.next_tokens(r, n - nhit * self.bs), ref_before, set())
        self.check_registered(r, 0)

    def check_registered(self, r, first_block):
        """Full prompt blocks from first_block on, just written, must be findable by hash."""
        if not self.c.enable_prefix_caching:
            return
        hashes = self.hashes[r]
        for i in range(first_block, min(len(hashes), len(self.tokens[r]) // self.bs)):
            assert hashes[i] in self.c._hash_to_block

    @precondition(lambda self: self.device_reqs())
    @rule(data=st.data(), n=st.sampled_from([0, 1, 1, 1, 2, 5]))
    def append(self, data, n):
        self.append_to(data.draw(st.sampled_from(self.device_reqs()), label="req"), n)

    def append_to(self, r, n):
        before = self.snapshot()
        ref_before = before[2]
        t1 = before[0][r]
        old = len(self.tokens[r])
        cow_expected = n > 0 and old % self.bs != 0 and ref_before[t1[-1]] > 1
        need = math.ceil((old + n) / self.bs) - len(t1) + cow_expected
        ok = self.c.append_slots(r, n)
        assert ok == (need <= len(before[3]) + len(before[4]))
        if not ok:
            assert self.snapshot() == before
            return
        t2 = self.c.block_table(r)
        assert t2[:len(t1) - 1] == t1[:-1]
        last = len(t1) - 1
        if t2[last] != t1[last]:
            assert cow_expected
            assert ref_before[t2[last]] == 0
            self.content[t2[last]] = list(self.content[t1[last]])
            assert self.c.cow_copies == before[6] + 1
        else:
            assert not cow_expected
            assert self.c.cow_copies == before[6]
        for b in t2[last + 1:]:
            assert ref_before[b] == 0
            self.content[b] = []
        self.write(r, self.next_tokens(r, n), ref_before, set(t1))
        self.check_registered(r, old // self.bs)

    @precondition(lambda self: self.device_reqs())
    @rule(data=st.data())
    def trim(self, data):
        """Give back a request's last slots (taken for an iteration that did not run)."""
        r = data.draw(st.sampled_from(self.device_reqs()), label="req")
        old = len(self.tokens[r])
        n = data.draw(st.integers(0, old), label="n")
        c, bs = self.c, self.bs
        table = c.block_table(r)
        new = old - n
        touched = table[(new // bs):] if new % bs else table[new // bs:]
        allowed = n == 0 or (new >= 1 and all(c._ref[b] == 1 and c._block_hash[b] is None for b in touched))
        before = self.snapshot()
        if not allowed:
            try:
                c.trim(r, n)
            except ValueError:
                assert self.snapshot() == before
                return
            raise AssertionError("trim into a shared or hashed block, or to nothing, was accepted")
        c.trim(r, n)
        keep = math.ceil(new / bs)
        assert c.block_table(r) == table[:keep]
        for b in table[keep:]:
            assert c._ref[b] == 0 and b in c._free
            self.content[b] = []
        if keep and new % bs:
            self.content[table[keep - 1]] = self.content[table[keep - 1]][:new % bs]
        self.pending[r] = self.tokens[r][new:] + self.pending[r]
        del self.tokens[r][new:]
        assert c.num_tokens(r) == new

    @precondition(lambda self: self.device_reqs())
    @rule(data=st.data())
    def fork(self, data):
        self.fork_from(data.draw(st.sampled_from(self.device_reqs()), label="parent"))

    def fork_from(self, parent):
        child = self.next_id
        self.next_id += 1
        used_before = self.c.num_used_blocks
        self.c.fork(parent, child)
        assert self.c.block_table(child) == self.c.block_table(parent)
        assert self.c.num_used_blocks == used_before
        self.tokens[child] = list(self.tokens[parent])
        self.pending[child] = list(self.pending[parent])
        self.hashes[child] = self.hashes[parent]
        return child

    @precondition(lambda self: self.device_reqs())
    @rule(data=st.data())
    def fork_then_append(self, data):
        # Parallel sampling: the child writes its first own token right after the fork, the
        # case where copy-on-write matters.
        parent = data.draw(st.sampled_from(self.device_reqs()), label="parent")
        self.append_to(self.fork_from(parent), 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        r = data.draw(st.sampled_from(sorted(self.tokens)), label="req")
        self.c.free(r)
        assert r not in self.c
        del self.tokens[r], self.pending[r], self.hashes[r]
        self.swapped.discard(r)

    @precondition(lambda self: self.device_reqs())
    @rule(data=st.data())
    def swap_out(self, data):
        r = data.draw(st.sampled_from(self.device_reqs()), label="req")
        n = len(self.c.block_table(r))
        expect = n <= self.c.num_free_host_blocks
        assert self.c.can_swap_out(r) == expect
        if not expect:
            return
        assert self.c.swap_out(r) == n
        self.swapped.add(r)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        r = data.draw(st.sampled_from(sorted(self.swapped)), label="req")
        n = math.ceil(len(self.tokens[r]) / self.bs)
        avail = self.c.num_free_blocks + self.c.num_cached_blocks
        expect = avail - n >= self.c.watermark_blocks
        assert self.c.can_swap_in(r) == expect
        if not expect:
            return
        ref_before = list(self.c._ref)
        assert self.c.swap_in(r) == n
        self.swapped.discard(r)
        table = self.c.block_table(r)
        for i, b in enumerate(table):
            assert ref_before[b] == 0
            self.content[b] = self.tokens[r][i * self.bs:(i + 1) * self.bs]
        self.check_registered(r, 0)

    @rule()
    def free_all(self):
        for r in sorted(self.tokens):
            self.c.free(r)
        self.tokens.clear()
        self.pending.clear()
        self.hashes.clear()
        self.swapped.clear()
        c = self.c
        assert c.num_free_blocks + c.num_cached_blocks == self.nb
        assert c.num_used_blocks == 0
        assert all(x == 0 for x in c._ref)
        assert c.filled_slots == 0 and c.allocated_slots == 0
        assert c.num_free_host_blocks == c.num_host_blocks

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def blocks_partitioned(self):
        c = self.c
        free, cached = list(c._free), list(c._cached)
        used = [b for b in range(self.nb) if c._ref[b] > 0]
        allb = free + cached + used
        assert len(allb) == len(set(allb)) == self.nb  # no block in two places, none lost
        assert c.num_used_blocks + c.num_free_blocks + c.num_cached_blocks == self.nb
        assert c.num_used_blocks == len(used)
        for b in cached:
            assert c._ref[b] == 0 and c._block_hash[b] is not None

    @invariant()
    def self_check_agrees(self):
        self.c.check()  # the allocator's own check holds wherever the model says all is well

    @invariant()
    def refcounts_match_tables(self):
        counts = [0] * self.nb
        for r in self.device_reqs():
            for b in self.c.block_table(r):
                counts[b] += 1
        assert counts == self.c._ref

    @invariant()
    def fast_path_only_for_exclusive_last_block(self):
        for r in self.device_reqs():
            req = self.c._reqs[r]
            cap = len(req.table) * self.bs
            # A stale limit on a full last block is harmless: the next append crosses anyway.
            if req.num_tokens < req.fast_limit:
                assert self.c._ref[req.table[-1]] == 1
                if req.fast_limit == cap + 1:
                    # Completing the block in the fast path must not skip a hash registration.
                    caching = self.c.enable_prefix_caching
                    assert not caching or len(self.hashes[r]) < len(req.table)
                else:
                    assert req.fast_limit == cap

    @invariant()
    def requests_read_back_their_tokens(self):
        for r in self.device_reqs():
            table = self.c.block_table(r)
            assert self.c.num_tokens(r) == len(self.tokens[r])
            assert len(table) == math.ceil(len(self.tokens[r]) / self.bs)
            seq = [t for b in table for t in self.content[b]]
            assert seq == self.tokens[r]
        for r in self.swapped:
            assert self.c.is_swapped(r) and self.c.num_tokens(r) == len(self.tokens[r])

    @invariant()
    def counters_match_recount(self):
        c = self.c
        used = [b for b in range(self.nb) if c._ref[b] > 0]
        assert c.allocated_slots == len(used) * self.bs
        assert c.filled_slots == sum(len(self.content[b]) for b in used)
        host = sum(math.ceil(len(self.tokens[r]) / self.bs) for r in self.swapped)
        assert c.num_free_host_blocks == c.num_host_blocks - host

    @invariant()
    def prefix_hashes_point_at_matching_content(self):
        c = self.c
        for h, b in c._hash_to_block.items():
            assert c._block_hash[b] == h
            assert self.content[b] == self.block_tokens_of_hash[h]
        assert sum(x is not None for x in c._block_hash) == len(c._hash_to_block)


class ContiguousMachine(RuleBasedStateMachine):
    @initialize(
        capacity=st.integers(1, 200),
        policy=st.sampled_from(["max", "oracle"]),
        data=st.data(),
    )
    def setup(self, capacity, policy, data):
        self.max_len = data.draw(st.integers(1, capacity), label="max_model_len")
        self.c = ContiguousKVCache(capacity, policy=policy, max_model_len=self.max_len)
        self.capacity = capacity
        self.filled = {}
        self.next_id = 0

    @rule(data=st.data())
    def allocate(self, data):
        prompt = data.draw(st.integers(1, self.max_len), label="prompt")
        output = data.draw(st.integers(0, self.max_len - prompt), label="output")
        size = self.c.reservation_size(prompt, output)
        holes = self.c.holes
        first = next((s for s, length in holes if length >= size), None)
        r = self.next_id
        self.next_id += 1
        assert self.c.can_allocate(prompt, output) == (first is not None)
        ok = self.c.allocate(r, prompt, output)
        assert ok == (first is not None)
        if ok:
            assert self.c.reservation(r) == (first, size)  # first fit, lowest address
            self.filled[r] = prompt
        else:
            assert self.c.holes == holes

    @precondition(lambda self: self.filled)
    @rule(data=st.data(), n=st.integers(0, 5))
    def append(self, data, n):
        r = data.draw(st.sampled_from(sorted(self.filled)), label="req")
        room = self.c.reservation(r)[1] - self.filled[r]
        if n > room:
            try:
                self.c.append_slots(r, n)
            except ValueError:
                return
            raise AssertionError("append past the reservation was accepted")
        assert self.c.append_slots(r, n)
        self.filled[r] += n

    @precondition(lambda self: self.filled)
    @rule(data=st.data())
    def free(self, data):
        r = data.draw(st.sampled_from(sorted(self.filled)), label="req")
        self.c.free(r)
        del self.filled[r]

    @invariant()
    def arena_is_partitioned(self):
        c = self.c
        ranges = [c.reservation(r) for r in self.filled]
        holes = c.holes
        spans = sorted([(s, n, "res") for s, n in ranges] + [(s, n, "hole") for s, n in holes])
        pos = 0
        for s, n, _ in spans:
            assert s == pos and n > 0  # no overlap, no gap, inside the arena
            pos = s + n
        assert pos == self.capacity
        # Holes are coalesced: no two holes touch.
        for (s1, n1), (s2, _) in pairwise(holes):
            assert s1 + n1 < s2
        assert c.reserved_slots + c.free_slots == self.capacity
        assert c.reserved_slots == sum(n for _, n in ranges)
        assert c.free_slots == sum(n for _, n in holes)
        assert c.filled_slots == sum(self.filled.values())
        assert c.largest_hole == max((n for _, n in holes), default=0)


TestPaged = PagedMachine.TestCase
TestPaged.settings = PAGED_SETTINGS
TestContiguous = ContiguousMachine.TestCase
TestContiguous.settings = CONTIGUOUS_SETTINGS
