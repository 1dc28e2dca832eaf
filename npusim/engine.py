"""Discrete-event serving simulator (SimPy): requests arrive, are batched into iterations, take and
give back KV pages, and finish, on one or several model instances sharing a device.

The scheduler follows vLLM v1's unified rule: every request has `num_tokens` known tokens (prompt +
generated) and `num_computed` of them in the KV cache; an iteration gives each scheduled request
some of the difference (a prefill chunk, or the one token of a decode); when a request's cache
catches up with its tokens it samples the next one. Recompute preemption and chunked prefill fall
out of the same rule.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from npusim.costmodel import CostModel, MemoryPlan
from npusim.kv import ContiguousKVCache, MemoryTimeline, PagedKVCache
from npusim.specs import EngineConfig, HardwareSpec, batching_mode
from npusim.workload import RequestSpec


# Longest run of identical decode iterations priced at once (bounds the arrays it needs).
STRETCH_MAX = 1024


class Request:
    """A request inside the engine, with its progress and its timestamps."""

    __slots__ = ("id", "arrival", "prompt_len", "output_len", "prefix_group", "prefix_len",
                 "submit", "num_tokens", "num_computed", "out_done", "t_first", "t_last", "t_done",
                 "preemptions", "hashes", "on_done")

    def __init__(self, spec: RequestSpec):
        self.id = spec.id
        self.arrival = spec.arrival
        self.prompt_len = spec.prompt_len
        self.output_len = spec.output_len
        self.prefix_group = spec.prefix_group
        self.prefix_len = spec.prefix_len
        self.submit = spec.arrival
        self.num_tokens = spec.prompt_len
        self.num_computed = 0
        self.out_done = 0
        self.t_first = math.nan
        self.t_last = math.nan
        self.t_done = math.nan
        self.preemptions = 0
        self.hashes: list[int] | None = None
        self.on_done: Callable[[], None] | None = None

    def block_hashes(self, block_size: int) -> list[int]:
        """Hashes of the full blocks of the prompt: blocks inside a shared prefix hash by (group,
        index), so requests of one group share them; later blocks are this request's own."""
        n_full = self.prompt_len // block_size
        shared = self.prefix_len // block_size if self.prefix_group >= 0 else 0
        return [hash(("g", self.prefix_group, i)) if i < shared else hash(("r", self.id, i))
                for i in range(n_full)]


class LatencyHistogram:
    """Inter-token latencies in log-spaced bins (0.1 % wide): exact count and mean, quantiles to
    0.1 %, and memory that does not grow with the number of tokens."""

    __slots__ = ("counts", "n", "total")
    _LOG_STEP = math.log(1.001)

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0

    def add(self, x: float, count: int = 1) -> None:
        key = int(math.log(x) / self._LOG_STEP) if x > 0 else -(10**9)
        self.counts[key] = self.counts.get(key, 0) + count
        self.n += count
        self.total += x * count

    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def quantile(self, q: float) -> float:
        if not self.n:
            return math.nan
        target = q * (self.n - 1)
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > target:
                return 0.0 if key == -(10**9) else math.exp((key + 0.5) * self._LOG_STEP)
        return math.nan  # pragma: no cover


@dataclass
class InstanceStats:
    iterations: int = 0
    busy_s: float = 0.0  # device time of this instance's iterations
    swap_s: float = 0.0
    preemptions: int = 0
    output_tokens: int = 0
    completed: int = 0
    batch_tokens_sum: int = 0
    max_batch: int = 0
    batch_series: list = field(default_factory=list)  # decimated (t, running, waiting)
    series_stride: int = 1
    # Requests in the instance (waiting, running or swapped) integrated over time, sampled at
    # iteration ends: an independent measure of the queue for Little's law.
    in_system_area: float = 0.0
    last_in_system: int = 0
    last_t: float = 0.0


class Instance:
    """One model replica on a device or a device partition, with its own KV pool and scheduler."""

    def __init__(self, sim: "Simulation", index: int, cost: CostModel, engine: EngineConfig,
                 plan: MemoryPlan, device_lock: simpy.Resource | None, power_share: float):
        self.sim = sim
        self.env = sim.env
        self.index = index
        self.cost = cost
        self.cfg = engine
        self.plan = plan
        self.lock = device_lock
        self.power_share = power_share
        self.block_size = engine.block_size
        self.paged = engine.paging
        self.static = batching_mode(engine) == "static"
        self.max_model_len = sim.max_model_len
        if engine.paging:
            host_blocks = int(engine.swap_space_gib * 2**30 // plan.block_bytes) if engine.preemption_mode == "swap" else 0
            self.kv = PagedKVCache(plan.num_blocks, engine.block_size, watermark=engine.watermark,
                                   enable_prefix_caching=engine.enable_prefix_caching,
                                   num_host_blocks=host_blocks)
        else:
            self.kv = ContiguousKVCache(plan.num_blocks * engine.block_size,
                                        policy=sim.contiguous_policy, max_model_len=self.max_model_len)
        self.waiting: deque[Request] = deque()
        self.swapped: deque[Request] = deque()
        self.running: list[Request] = []
        self.static_batch: list[Request] = []
        self.timeline = MemoryTimeline()
        self.stats = InstanceStats()
        self._wake: simpy.Event | None = None
        self._arrival: simpy.Event | None = None  # set while a stretch runs; an arrival cuts it short
        self.block_map: tuple[float, dict] | None = None  # snapshot at peak use, for reports
        self._peak_used = -1
        self.swap_bytes_per_block = plan.block_bytes
        self.host_link = cost.hw.host_link_gbs * 1e9

    # -- arrivals --------------------------------------------------------------------------------
    def capacity_problem(self, r: Request) -> str | None:
        """Why this request can never run on this instance, or None."""
        total = r.prompt_len + r.output_len
        if total > self.max_model_len:
            return f"prompt {r.prompt_len} + output {r.output_len} = {total} tokens exceeds max_model_len {self.max_model_len}"
        if not self.cfg.enable_chunked_prefill and r.prompt_len > self.cfg.max_num_batched_tokens:
            return (f"prompt {r.prompt_len} exceeds max_num_batched_tokens {self.cfg.max_num_batched_tokens} "
                    f"and chunked prefill is off")
        if self.cfg.paging:
            need = -(-(total - 1) // self.block_size)
            usable = self.plan.num_blocks - self.kv.watermark_blocks
            if need > usable:
                return (f"needs {need} KV blocks of {self.block_size} tokens at its longest, the pool has "
                        f"{usable} usable ({self.plan.num_blocks} minus the watermark)")
        else:
            need = self.kv.reservation_size(r.prompt_len, r.output_len)
            if need > self.kv.capacity_tokens:
                return f"reserves {need} contiguous KV slots, the arena holds {self.kv.capacity_tokens}"
        return None

    def submit(self, r: Request) -> None:
        self.waiting.append(r)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        if self._arrival is not None and not self._arrival.triggered:
            self._arrival.succeed()

    # -- the iteration loop ----------------------------------------------------------------------
    def loop(self):
        env = self.env
        host = self.cost.host_overhead_s
        schedule = self.schedule_static if self.static else self.schedule_continuous
        while True:
            if not (self.running or self.waiting or self.swapped or self.static_batch):
                self._wake = env.event()
                yield self._wake
                self._wake = None
            if not self.static:
                stretch = self.plan_stretch()
                if stretch is not None:
                    yield from self.run_stretch(*stretch)
                    continue
            step = schedule()
            if step is None:
                # Nothing could be scheduled although work is waiting: the head request cannot be
                # admitted into an empty pool. capacity_problem() normally rejects these at arrival.
                r = self.waiting.popleft()
                self.sim.reject(r, "could not be admitted into an empty KV pool")
                continue
            work, device_s, swap_s = step
            if self.lock is None:
                yield env.timeout(host + device_s + swap_s)
            else:
                # Time slicing: host work overlaps other instances; the device runs one iteration at a time.
                if host:
                    yield env.timeout(host)
                with self.lock.request() as grant:
                    yield grant
                    yield env.timeout(device_s + swap_s)
            self.stats.busy_s += device_s + swap_s
            self.stats.swap_s += swap_s
            self.finish_iteration(work)

    # -- stretches of identical decode iterations ------------------------------------------------
    def plan_stretch(self):
        """Whether the next iterations are all alike — the same decode-only batch, nothing that
        could be admitted, pages enough for every step, no completion before the last — so that
        they can be priced at once. Stepping them one by one gives the same schedule; this is only
        faster. Returns (steps, device seconds of each step, new pages per step) or None."""
        running = self.running
        n = len(running)
        cfg = self.cfg
        if (self.lock is not None or self.swapped or n < 2 or n > cfg.max_num_batched_tokens
                or (self.waiting and n < cfg.max_num_seqs)):
            return None
        last = running[-1]  # the newest request, the likeliest to be still in prefill
        if last.num_tokens - last.num_computed != 1:
            return None
        k = STRETCH_MAX
        t_next = self.sim.next_arrival
        if t_next is not None and t_next != math.inf:
            # An arrival will cut the stretch short; a step lasts at least its dense part, so
            # this bounds the steps that start before it.
            shortest = self.cost.dense_time(n, n) + self.cost.host_overhead_s
            k = min(k, int((t_next - self.env.now) / shortest) + 1)
            if k < 2:
                return None
        computed = []
        for r in running:
            if r.num_tokens - r.num_computed != 1:
                return None
            left = r.output_len - r.out_done
            if left < k:
                k = left
            computed.append(r.num_computed)
        if k < 2:
            return None
        c = np.array(computed, dtype=np.int64)
        steps = np.arange(1, k + 1)
        ctx = int(c.sum()) + n * steps  # each step attends to one more token per sequence
        if self.paged:
            bs = self.block_size
            # sequence i takes a page at step j when its token count c_i + j crosses a boundary
            first = (-c) % bs
            new_pages = np.bincount(first, minlength=bs)[(steps - 1) % bs]
            cum_new = np.cumsum(new_pages)
            available = self.kv.num_free_blocks + self.kv.num_cached_blocks
            if cum_new[-1] > available:
                k = int(np.searchsorted(cum_new, available, side="right"))
                if k < 2:
                    return None
                steps, ctx, cum_new = steps[:k], ctx[:k], cum_new[:k]
            slots = (int(((c + bs - 1) // bs).sum()) + cum_new) * bs
        else:
            cum_new = None
            slots = ctx
        return k, self.cost.decode_step_times(n, ctx, slots), cum_new

    def run_stretch(self, k: int, device: np.ndarray, cum_new: np.ndarray | None):
        env = self.env
        dts = device + self.cost.host_overhead_s
        ends = np.cumsum(dts)
        t0 = env.now
        timer = env.timeout(float(ends[-1]))
        self._arrival = env.event()
        fired = yield timer | self._arrival
        self._arrival = None
        m = k
        if timer not in fired:
            # An arrival: the step under way finishes, then the scheduler sees the new request.
            m = int(np.searchsorted(ends, env.now - t0, side="left")) + 1
            yield env.timeout(max(0.0, t0 + float(ends[m - 1]) - env.now))
        now = env.now
        running = self.running
        n = len(running)
        kv = self.kv
        st = self.stats
        itl = self.sim.itl
        prev = self.sim.prev_end.get(self.index, -1.0)
        if self.paged:
            before = (kv.allocated_slots, kv.filled_slots, kv.num_used_blocks, kv.num_free_blocks,
                      kv.num_cached_blocks)
        else:
            before = (kv.reserved_slots, kv.filled_slots, kv.reserved_slots, kv.free_slots, 0)
        first_end = t0 + float(ends[0])
        bulk = 0
        for r in running:
            kv.append_slots(r.id, m)  # plan_stretch checked that the pages are there
            if r.t_last == prev:
                bulk += 1
            else:
                itl.add(first_end - r.t_last)
            r.num_computed += m
            r.num_tokens += m
            r.out_done += m
            r.t_last = now
        if bulk:
            itl.add(first_end - prev, bulk)
        for j in range(1, m):
            itl.add(float(dts[j]), n)
        st.busy_s += float(device[:m].sum())
        st.output_tokens += n * m
        st.batch_tokens_sum += n * m
        if n > st.max_batch:
            st.max_batch = n
        # the memory timeline at each step but the last, which is recorded after completions
        alloc0, filled0, used0, free0, cached0 = before
        in_system = n + len(self.waiting)
        bs = self.block_size
        for j in range(m - 1):
            st.iterations += 1
            t = t0 + float(ends[j])
            if cum_new is None:
                self._sample(t, alloc0, filled0 + n * (j + 1), used0, free0, 0, in_system)
            else:
                new = int(cum_new[j])
                from_free = min(new, free0)
                self._sample(t, alloc0 + bs * new, filled0 + n * (j + 1), used0 + new,
                             free0 - from_free, cached0 - (new - from_free), in_system)
        st.iterations += 1
        if m == k:
            done = [r for r in running if r.out_done >= r.output_len]
            for r in done:
                running.remove(r)
                kv.free(r.id)
                self.sim.complete(r, self)
        self.sim.prev_end[self.index] = now
        self._record(now)

    # -- continuous batching (vLLM with paging; Orca-style on contiguous reservations) ------------
    def _preempt(self, victim: Request) -> float:
        """Free a victim's pages: swap them to host memory if asked and possible, else drop them
        to be recomputed. Returns the device seconds of the transfer."""
        kv = self.kv
        self.stats.preemptions += 1
        victim.preemptions += 1
        if self.cfg.preemption_mode == "swap" and kv.can_swap_out(victim.id):
            blocks = kv.swap_out(victim.id)
            self.swapped.append(victim)
            return blocks * self.swap_bytes_per_block / self.host_link
        kv.free(victim.id)
        victim.num_computed = 0
        self.waiting.appendleft(victim)
        return 0.0

    def schedule_continuous(self):
        """One iteration of continuous batching: running requests first (preempting the newest
        when pages run out), then swapped ones, then new ones while room and token budget last."""
        cfg = self.cfg
        kv = self.kv
        paged = self.paged
        # pages are read whole; a contiguous reservation is read up to its last token
        bs = self.block_size if paged else 1
        budget = cfg.max_num_batched_tokens
        running = self.running
        work: list[tuple[Request, int]] = []
        swap_s = 0.0
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = r.num_tokens - r.num_computed
            if n > budget:
                n = budget
            if not paged:
                # A contiguous reservation always has room; its prompt was filled at admission.
                if r.num_computed >= r.prompt_len:
                    kv.append_slots(r.id, n)
            else:
                while not kv.append_slots(r.id, n):
                    victim = running.pop()
                    swap_s += self._preempt(victim)
                    preempted = True
                    if victim is r:
                        r = None
                        break
                if r is None:
                    break
            work.append((r, n))
            budget -= n
            i += 1
        if not preempted:
            # Swapped requests come back before new ones are admitted.
            while self.swapped and len(running) < cfg.max_num_seqs and budget > 0:
                r = self.swapped[0]
                if not kv.can_swap_in(r.id):
                    break
                self.swapped.popleft()
                blocks = kv.swap_in(r.id)
                swap_s += blocks * self.swap_bytes_per_block / self.host_link
                running.append(r)
                n = min(r.num_tokens - r.num_computed, budget)
                if not kv.append_slots(r.id, n):  # pragma: no cover - can_swap_in keeps room
                    break
                work.append((r, n))
                budget -= n
            while (self.waiting and not self.swapped and len(running) < cfg.max_num_seqs
                   and budget > 0):
                r = self.waiting[0]
                todo = r.num_tokens - r.num_computed
                if not cfg.enable_chunked_prefill and todo > budget:
                    break
                n = min(todo, budget)
                if paged:
                    hashes = None
                    if cfg.enable_prefix_caching:
                        if r.hashes is None:
                            r.hashes = r.block_hashes(bs)
                        hashes = r.hashes
                    cached = kv.allocate(r.id, n, hashes)
                    if cached is None:
                        break
                else:
                    if not kv.allocate(r.id, r.prompt_len, r.output_len):
                        break
                    cached = 0
                self.waiting.popleft()
                if cached >= r.num_tokens:
                    cached = r.num_tokens - 1  # the last token is recomputed for its logits
                r.num_computed = cached
                n -= cached
                if n <= 0:  # pragma: no cover - cached < n by construction
                    n = 1
                running.append(r)
                work.append((r, n))
                budget -= n
        if not work:
            if running or self.swapped:
                # Everything running was preempted away this round: retry next round.
                return [], 0.0, swap_s
            return None
        # One token on top of a cached context is a decode: it reads all its pages.
        decodes = ctx = slots = 0
        chunks: list[tuple[int, int]] = []
        for r, n in work:
            if n == 1 and r.num_computed:
                decodes += 1
                c = r.num_computed + 1
                ctx += c
                slots += -(-c // bs) * bs
            else:
                chunks.append((n, r.num_computed))
        device_s = self.cost.step_time(decodes, ctx, slots, chunks)
        return work, device_s, swap_s

    # -- static batching without paging (the article's baseline) ----------------------------------
    def schedule_static(self):
        """Static batching on the contiguous arena: a batch is formed from the queue (as many as
        fit, up to max_num_seqs), prefilled at once padded to its longest prompt, then decoded in
        lockstep, finished members still occupying their rows, until its longest output is done."""
        kv = self.kv
        batch = self.static_batch
        if not batch:
            while self.waiting and len(batch) < self.cfg.max_num_seqs:
                r = self.waiting[0]
                if not kv.allocate(r.id, r.prompt_len, r.output_len):
                    break
                self.waiting.popleft()
                batch.append(r)
            if not batch:
                return None
            self.running = list(batch)
            longest = max(r.prompt_len for r in batch)  # allocate() filled each prompt's slots
            device_s = self.cost.step_time(0, 0, 0, [(longest, 0)] * len(batch))
            return [(r, r.prompt_len) for r in batch], device_s, 0.0
        live = [r for r in batch if r.out_done < r.output_len]
        width = max(r.num_computed for r in batch) + 1  # padded rows read the longest context
        for r in live:
            kv.append_slots(r.id, 1)
        n = len(batch)
        device_s = self.cost.step_time(n, n * width, n * width)
        return [(r, 1) for r in live], device_s, 0.0

    # -- after an iteration ----------------------------------------------------------------------
    def finish_iteration(self, work: list[tuple[Request, int]]) -> None:
        now = self.env.now
        sim = self.sim
        st = self.stats
        st.iterations += 1
        itl = sim.itl
        bulk = 0
        prev = sim.prev_end.get(self.index, -1.0)
        done: list[Request] = []
        tokens = 0
        for r, n in work:
            r.num_computed += n
            tokens += n
            if r.num_computed < r.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            r.out_done += 1
            r.num_tokens += 1
            st.output_tokens += 1
            if r.out_done == 1:
                r.t_first = now
            elif r.t_last == prev:
                bulk += 1
            else:
                itl.add(now - r.t_last)
            r.t_last = now
            if r.out_done >= r.output_len:
                done.append(r)
        if bulk:
            itl.add(now - prev, bulk)
        sim.prev_end[self.index] = now
        st.batch_tokens_sum += tokens
        if len(work) > st.max_batch:
            st.max_batch = len(work)
        if done:
            if not self.static:
                for r in done:
                    self.running.remove(r)
                    self.kv.free(r.id)
                    sim.complete(r, self)
            else:
                for r in done:
                    sim.complete(r, self)
                if all(r.out_done >= r.output_len for r in self.static_batch):
                    for r in self.static_batch:
                        self.kv.free(r.id)
                    self.static_batch = []
                    self.running = []
        self._record(now)

    def _record(self, now: float) -> None:
        """Memory, queue and batch samples at the end of an iteration."""
        kv = self.kv
        in_system = len(self.running) + len(self.waiting) + len(self.swapped)
        if self.paged:
            used = kv.num_used_blocks
            self._sample(now, kv.allocated_slots, kv.filled_slots, used, kv.num_free_blocks,
                         kv.num_cached_blocks, in_system)
            if self.sim.want_block_map and used > self._peak_used:
                self._peak_used = used
                self.block_map = (now, {r.id: kv.block_table(r.id) for r in self.running})
        else:
            reserved = kv.reserved_slots
            self._sample(now, reserved, kv.filled_slots, reserved, kv.free_slots, 0, in_system)
            if self.sim.want_block_map and reserved > self._peak_used:
                self._peak_used = reserved
                holders = self.static_batch if self.static else self.running
                self.block_map = (now, {r.id: kv.reservation(r.id) for r in holders})

    def _sample(self, now: float, allocated: int, filled: int, used: int, free: int, cached: int,
                in_system: int) -> None:
        st = self.stats
        st.in_system_area += st.last_in_system * (now - st.last_t)
        st.last_in_system = in_system
        st.last_t = now
        self.timeline.record(now, allocated, filled, used, free, cached)
        if st.iterations % st.series_stride == 0:
            st.batch_series.append((now, len(self.running), len(self.waiting)))
            if len(st.batch_series) > 2048:
                st.batch_series = st.batch_series[::2]
                st.series_stride *= 2


class Simulation:
    """Runs a request stream through K instances and collects what `vllm bench serve` reports."""

    def __init__(self, hw: HardwareSpec, costs: list[CostModel], plans: list[MemoryPlan],
                 engine: EngineConfig, max_model_len: int, sharing: str,
                 contiguous_policy: str = "max", max_concurrency: int | None = None,
                 want_block_map: bool = False, progress: Callable[[int], None] | None = None):
        self.env = simpy.Environment()
        self.hw = hw
        self.cfg = engine
        self.max_model_len = max_model_len
        self.contiguous_policy = contiguous_policy
        self.sharing = sharing
        self.want_block_map = want_block_map
        self.progress = progress
        k = len(costs)
        lock = simpy.Resource(self.env, capacity=1) if (sharing == "time-slice" and k > 1) else None
        share = 1.0 if sharing == "time-slice" else 1.0 / k
        self.instances = [Instance(self, i, costs[i], engine, plans[i], lock, share) for i in range(k)]
        self.limit = simpy.Resource(self.env, capacity=max_concurrency) if max_concurrency else None
        self.itl = LatencyHistogram()
        self.prev_end: dict[int, float] = {}
        self.finished: list[Request] = []
        self.rejected: list[tuple[Request, str]] = []
        self._rr = 0
        # When the next request arrives (a hint for planning stretches); unknown in a closed loop,
        # where arrivals wait for completions.
        self.next_arrival: float | None = None if max_concurrency else 0.0

    def reject(self, r: Request, reason: str) -> None:
        self.rejected.append((r, reason))
        if r.on_done:
            r.on_done()

    def complete(self, r: Request, inst: Instance) -> None:
        r.t_done = self.env.now
        inst.stats.completed += 1
        self.finished.append(r)
        if r.on_done:
            r.on_done()
        if self.progress:
            self.progress(len(self.finished) + len(self.rejected))

    def _dispatch(self, r: Request) -> None:
        inst = self.instances[self._rr % len(self.instances)]
        self._rr += 1
        problem = inst.capacity_problem(r)
        if problem:
            self.reject(r, problem)
        else:
            inst.submit(r)

    def _arrivals(self, specs: list[RequestSpec]):
        env = self.env
        for spec in specs:
            if spec.arrival > env.now:
                self.next_arrival = spec.arrival
                yield env.timeout(spec.arrival - env.now)
            r = Request(spec)
            if self.limit is None:
                r.submit = env.now
                self._dispatch(r)
            else:
                env.process(self._limited(r))
        if self.next_arrival is not None:
            self.next_arrival = math.inf

    def _limited(self, r: Request):
        # As `vllm bench serve --max-concurrency`: a request is sent when a slot frees up, and its
        # latencies count from then.
        grant = self.limit.request()
        yield grant
        r.submit = self.env.now
        r.on_done = lambda: self.limit.release(grant)
        self._dispatch(r)

    def run(self, specs: list[RequestSpec]) -> None:
        for inst in self.instances:
            self.env.process(inst.loop())
        self.env.process(self._arrivals(specs))
        self.env.run()
        unfinished = sum(len(i.waiting) + len(i.running) + len(i.swapped) for i in self.instances)
        if unfinished:  # pragma: no cover - a scheduler bug, never a user error
            raise RuntimeError(f"{unfinished} requests left unfinished when the event queue ran dry")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = q / 100.0 * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


__all__ = ["Simulation", "Instance", "Request", "LatencyHistogram", "percentile"]
