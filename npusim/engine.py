"""Discrete-event serving simulator (SimPy): requests arrive, are batched into iterations, take and
give back KV pages, and finish, on one or several model instances sharing a device.

Every request has `num_tokens` known tokens (prompt + generated) and `num_computed` of them in the
KV cache; an iteration gives each scheduled request some of the difference (a prefill chunk, or
the one token of a decode); when a request's cache catches up with its tokens it samples the next
one. Recompute preemption and chunked prefill fall out of the same rule. As vLLM's chunked-prefill
scheduler, an iteration takes every running decode first, then prefill chunks in the token budget
that is left.

Decoding requests form a *decode set* whose members all advance one token per iteration, so the
set is kept as sums (members, context tokens, KV slots read) and a member is looked at only when
something happens to it: it needs a new page, it finishes, or it is preempted. An iteration then
costs time in the number of such events, not in the batch size, and gives the same schedule as
advancing every member one by one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import simpy

from npusim.costmodel import CostModel, MemoryPlan
from npusim.kv import ContiguousKVCache, MemoryTimeline, PagedKVCache
from npusim.specs import EngineConfig, HardwareSpec, batching_mode
from npusim.workload import RequestSpec


def _by_seq(r: "Request") -> int:
    return r.seq


class Request:
    """A request inside the engine, with its progress and its timestamps."""

    __slots__ = ("id", "arrival", "prompt_len", "output_len", "prefix_group", "prefix_len",
                 "submit", "num_tokens", "num_computed", "out_done", "t_first", "t_last", "t_done",
                 "preemptions", "hashes", "on_done", "state", "seq",
                 # while in the decode set: its progress as of iteration base_it, the tokens the
                 # KV cache has been told of, the KV slots it reads, and an epoch that retires
                 # its pending events when it leaves the set
                 "base_it", "base_c", "base_out", "told", "slots", "epoch")

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
        self.state = "waiting"  # waiting | prefill | decode | swapped | done
        self.seq = 0  # admission order: the newest running request is preempted first
        self.base_it = self.base_c = self.base_out = self.told = self.slots = self.epoch = 0

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
        self.prefilling: list[Request] = []  # running requests not in the decode set, in admission order
        self.it = 0  # iterations done
        self.prev_end = -1.0  # when the last iteration ended
        self.admitted = 0
        # the decode set, as sums over its members at the next iteration
        self.dset_n = 0
        self.dset_ctx = 0  # tokens attended: each member's cached tokens + 1
        self.dset_slots = 0  # KV slots read: whole pages (paged only; contiguous reads its context)
        self.lag = 0  # tokens members hold that the KV cache has not been told of yet
        self.finish_at: dict[int, list[tuple[Request, int]]] = {}  # iteration -> members finishing
        self.page_at: dict[int, list[tuple[Request, int]]] = {}  # iteration -> members needing a page
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
            if self.static:
                self.finish_static(work)
            else:
                self.finish_continuous(work)

    # -- the decode set ----------------------------------------------------------------------------
    def _join(self, r: Request) -> None:
        """r's cache has caught up with its tokens after iteration self.it: from the next
        iteration on it decodes one token per iteration until it finishes."""
        r.state = "decode"
        r.epoch += 1
        r.base_it, r.base_c, r.base_out, r.told = self.it, r.num_computed, r.out_done, r.num_computed
        self.dset_n += 1
        self.dset_ctx += r.num_computed + 1
        if self.paged:
            # the pages it holds; the one its next token may need is added when it is taken
            r.slots = -(-r.num_computed // self.block_size) * self.block_size
            self.dset_slots += r.slots
        last = self.it + r.output_len - r.out_done  # the iteration that samples its last token
        self.finish_at.setdefault(last, []).append((r, r.epoch))
        if self.paged:
            # iteration j writes token base_c + (j - base_it - 1); a page boundary needs a page
            j = self.it + 1 + (-r.num_computed) % self.block_size
            if j <= last:
                self.page_at.setdefault(j, []).append((r, r.epoch))

    def _sync(self, r: Request) -> None:
        """Bring a member's own counters up to date (after iteration self.it) and tell the KV
        cache the tokens it holds; they fit its pages, which are taken as boundaries are crossed."""
        d = self.it - r.base_it
        r.num_computed = r.base_c + d
        r.out_done = r.base_out + d
        r.num_tokens = r.prompt_len + r.out_done
        untold = r.num_computed - r.told
        if untold:
            if not self.kv.append_slots(r.id, untold):  # pragma: no cover - a bookkeeping bug
                raise RuntimeError(f"request {r.id}: {untold} decoded tokens do not fit its pages")
            self.lag -= untold
            r.told = r.num_computed

    def _leave(self, r: Request) -> None:
        """Take a member out of the decode set (it finished or is preempted)."""
        self._sync(r)
        r.epoch += 1
        self.dset_n -= 1
        self.dset_ctx -= r.num_computed + 1
        if self.paged:
            self.dset_slots -= r.slots
        r.t_last = self.prev_end  # a member sampled a token in every iteration it was in

    def _take_pages(self, j: int) -> tuple[bool, float]:
        """Members whose next token starts a new page get it, oldest first; when none is free the
        newest running request is preempted, as vLLM does. Returns (preempted, swap seconds)."""
        due = self.page_at.pop(j, None)
        if not due:
            return False, 0.0
        kv = self.kv
        preempted = False
        swap_s = 0.0
        members = sorted((r for r, ep in due if r.epoch == ep and r.state == "decode"), key=_by_seq)
        for r in members:
            if r.state != "decode":
                continue  # preempted by an older member in this loop
            c = r.base_c + (j - 1 - r.base_it)  # cached tokens before this iteration
            need = c + 1 - r.told
            while not kv.append_slots(r.id, need):
                victim_is_r = self.running[-1] is r
                swap_s += self._preempt()
                preempted = True
                if victim_is_r:
                    break
            if r.state != "decode":
                continue
            r.told = c + 1
            self.lag -= need
            r.slots += self.block_size
            self.dset_slots += self.block_size
            nxt = j + self.block_size
            if nxt <= r.base_it + r.output_len - r.base_out:
                self.page_at.setdefault(nxt, []).append((r, r.epoch))
        return preempted, swap_s

    # -- continuous batching (vLLM with paging; Orca-style on contiguous reservations) ------------
    def _preempt(self) -> float:
        """Preempt the newest running request: swap its pages to host memory if asked and
        possible, else drop them to be recomputed. Returns the device seconds of the transfer."""
        kv = self.kv
        victim = self.running.pop()
        self.stats.preemptions += 1
        victim.preemptions += 1
        if victim.state == "decode":
            self._leave(victim)
        else:
            self.prefilling.remove(victim)
        if self.cfg.preemption_mode == "swap" and kv.can_swap_out(victim.id):
            blocks = kv.swap_out(victim.id)
            victim.state = "swapped"
            self.swapped.append(victim)
            return blocks * self.swap_bytes_per_block / self.host_link
        kv.free(victim.id)
        victim.num_computed = 0
        victim.state = "waiting"
        self.waiting.appendleft(victim)
        return 0.0

    def _admit(self, r: Request) -> None:
        self.admitted += 1
        r.seq = self.admitted
        r.state = "prefill"
        self.running.append(r)
        self.prefilling.append(r)

    def schedule_continuous(self):
        """One iteration of continuous batching: every decode (the decode set, taking pages as
        boundaries are crossed, preempting the newest request when none is left), then prefill
        chunks of running requests, then swapped requests back in, then new requests, while room
        and the token budget last."""
        cfg = self.cfg
        kv = self.kv
        paged = self.paged
        running = self.running
        preempted, swap_s = self._take_pages(self.it + 1)
        budget = cfg.max_num_batched_tokens - self.dset_n
        work: list[tuple[Request, int]] = []
        for r in list(self.prefilling):
            if budget <= 0:
                break
            if r.state != "prefill":
                continue  # preempted while an older request took pages
            n = min(r.num_tokens - r.num_computed, budget)
            if not paged:
                # A contiguous reservation always has room; its prompt was filled at admission.
                if r.num_computed >= r.prompt_len:
                    kv.append_slots(r.id, n)
            else:
                while not kv.append_slots(r.id, n):
                    victim_is_r = running[-1] is r
                    swap_s += self._preempt()
                    preempted = True
                    if victim_is_r:
                        break
                if r.state != "prefill":
                    continue
            work.append((r, n))
            budget -= n
        if not preempted:
            # Swapped requests come back before new ones are admitted.
            while self.swapped and len(running) < cfg.max_num_seqs and budget > 0:
                r = self.swapped[0]
                if not kv.can_swap_in(r.id):
                    break
                self.swapped.popleft()
                swap_s += kv.swap_in(r.id) * self.swap_bytes_per_block / self.host_link
                self._admit(r)
                n = min(r.num_tokens - r.num_computed, budget)
                if not kv.append_slots(r.id, n):
                    break  # its next token needs a page: it goes with the running ones next time
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
                            r.hashes = r.block_hashes(self.block_size)
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
                self._admit(r)
                work.append((r, n))
                budget -= n
        if not work and not self.dset_n:
            if running or self.swapped:
                # Everything running was preempted away this round: retry next round.
                return [], 0.0, swap_s
            return None
        # The decode set, plus any single token on top of a cached context (a swapped-in decode).
        decodes, ctx = self.dset_n, self.dset_ctx
        slots = self.dset_slots if paged else ctx
        chunks: list[tuple[int, int]] = []
        page = self.block_size if paged else 1
        for r, n in work:
            if n == 1 and r.num_computed:
                decodes += 1
                c = r.num_computed + 1
                ctx += c
                slots += -(-c // page) * page
            else:
                chunks.append((n, r.num_computed))
        if not decodes and not chunks:
            return [], 0.0, swap_s
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
    def _emit(self, work: list[tuple[Request, int]], now: float) -> list[Request]:
        """Advance individually scheduled requests; those whose cache caught up sample a token.
        Returns the ones that sampled."""
        st = self.stats
        itl = self.sim.itl
        prev = self.prev_end
        sampled = []
        for r, n in work:
            r.num_computed += n
            st.batch_tokens_sum += n
            if r.num_computed < r.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            r.out_done += 1
            r.num_tokens += 1
            st.output_tokens += 1
            if r.out_done == 1:
                r.t_first = now
            elif r.t_last == prev:
                itl.add(now - prev)
            else:
                itl.add(now - r.t_last)
            r.t_last = now
            sampled.append(r)
        return sampled

    def finish_continuous(self, work: list[tuple[Request, int]]) -> None:
        now = self.env.now
        st = self.stats
        self.it += 1
        st.iterations += 1
        n = self.dset_n
        if n:
            # every member sampled a token, one iteration after its last one
            self.dset_ctx += n
            self.lag += n
            st.output_tokens += n
            st.batch_tokens_sum += n
            self.sim.itl.add(now - self.prev_end, n)
        done: list[Request] = []
        for r in self._emit(work, now):  # every request scheduled on its own is in "prefill"
            self.prefilling.remove(r)
            if r.out_done >= r.output_len:
                done.append(r)
            else:
                self._join(r)
        batch = n + len(work)
        if batch > st.max_batch:
            st.max_batch = batch
        finishing = self.finish_at.pop(self.it, None)
        self.prev_end = now
        if finishing:
            for r, ep in finishing:
                if r.epoch == ep and r.state == "decode":
                    self._leave(r)
                    done.append(r)
        for r in done:
            r.state = "done"
            self.running.remove(r)
            self.kv.free(r.id)
            self.sim.complete(r, self)
        self._record(now)

    def finish_static(self, work: list[tuple[Request, int]]) -> None:
        now = self.env.now
        st = self.stats
        self.it += 1
        st.iterations += 1
        if len(work) > st.max_batch:
            st.max_batch = len(work)
        done = [r for r in self._emit(work, now) if r.out_done >= r.output_len]
        self.prev_end = now
        for r in done:
            self.sim.complete(r, self)
        if done and all(r.out_done >= r.output_len for r in self.static_batch):
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
            self._sample(now, kv.allocated_slots, kv.filled_slots + self.lag, used, kv.num_free_blocks,
                         kv.num_cached_blocks, in_system)
            if self.sim.want_block_map and used > self._peak_used:
                self._peak_used = used
                self.block_map = (now, {r.id: kv.block_table(r.id) for r in self.running})
        else:
            reserved = kv.reserved_slots
            self._sample(now, reserved, kv.filled_slots + self.lag, reserved, kv.free_slots, 0, in_system)
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
        self.finished: list[Request] = []
        self.rejected: list[tuple[Request, str]] = []
        self._rr = 0

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
                yield env.timeout(spec.arrival - env.now)
            r = Request(spec)
            if self.limit is None:
                r.submit = env.now
                self._dispatch(r)
            else:
                env.process(self._limited(r))

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
        lost = len(specs) - len(self.finished) - len(self.rejected)
        if lost:  # pragma: no cover - a scheduler bug, never a user error
            raise RuntimeError(f"{lost} requests neither finished nor were rejected")


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = q / 100.0 * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


__all__ = ["Simulation", "Instance", "Request", "LatencyHistogram", "percentile"]
