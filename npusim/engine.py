"""Discrete-event serving simulator (SimPy): requests arrive, wait, are batched into iterations and
finish, on one or several model instances sharing a device.

The story, as SimPy processes: an arrival process sends each request to an instance (round robin,
or when a slot frees up under a concurrency limit); each instance loops forever: it asks its
scheduler for the next batch, prices the batch in one call, spends the host time and then the
device time (which time-sliced instances take turns for), and hands the batch back as completed.
What a run measured is kept in a `RunRecord`, which reports and summaries read.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable

import simpy

from npusim.costmodel import InstanceSetup
from npusim.kv import MemoryTimeline
from npusim.sched import ContiguousPool, ContinuousScheduler, PagedPool, Request, StaticScheduler
from npusim.specs import EngineConfig, HardwareSpec, ModelSpec, batching_mode
from npusim.workload import RequestSpec


LOAD_BINS = 200  # bins of the arrival window for the load check


class LatencyHistogram:
    """Latencies in log-spaced bins (0.1 % wide): exact count and mean, quantiles to 0.1 %, and
    memory that does not grow with the number of samples."""

    __slots__ = ("counts", "n", "total", "total_sq")
    _LOG_STEP = math.log(1.001)
    _INV_LOG_STEP = 1.0 / math.log(1.001)
    _ZERO = -(10**9)

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, x: float, count: int = 1) -> None:
        # floor, not int(): int() rounds toward zero, which put every value below 1 s (most
        # latencies) one bin too high
        key = math.floor(math.log(x) * self._INV_LOG_STEP) if x > 0 else self._ZERO
        counts = self.counts
        counts[key] = counts.get(key, 0) + count
        self.n += count
        self.total += x * count
        self.total_sq += x * x * count

    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def std(self) -> float:
        """Population standard deviation (numpy's default, as vllm bench serve reports)."""
        if not self.n:
            return math.nan
        m = self.total / self.n
        return math.sqrt(max(0.0, self.total_sq / self.n - m * m))

    def _value(self, key: int) -> float:
        return 0.0 if key == self._ZERO else math.exp((key + 0.5) * self._LOG_STEP)

    def quantile(self, q: float) -> float:
        if not self.n:
            return math.nan
        target = q * (self.n - 1)
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > target:
                return self._value(key)
        return math.nan  # pragma: no cover

    def bins(self) -> tuple[list[float], list[int]]:
        """(bin centres, counts), in increasing order."""
        keys = sorted(self.counts)
        return [self._value(k) for k in keys], [self.counts[k] for k in keys]


class LatencySummary:
    """Per-request latencies: every value while there are at most `exact_limit` (so percentiles are
    exact, as `vllm bench serve` computes them), then a LatencyHistogram, so that a million-request
    run keeps a fixed-size summary. Mean and standard deviation are exact either way."""

    __slots__ = ("values", "hist", "exact_limit", "n", "total", "total_sq")

    def __init__(self, exact_limit: int = 200_000):
        self.values: array | None = array("d")  # 8 bytes a value
        self.hist: LatencyHistogram | None = None
        self.exact_limit = exact_limit
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.total_sq += x * x
        if self.values is not None:
            self.values.append(x)
            if len(self.values) > self.exact_limit:
                self.hist = LatencyHistogram()
                for v in self.values:
                    self.hist.add(v)
                self.values = None
        else:
            self.hist.add(x)

    @property
    def exact(self) -> bool:
        return self.values is not None


@dataclass
class InstanceRecord:
    """What one instance did, for summaries, reports and comparisons."""

    index: int
    setup: InstanceSetup
    paged: bool
    block_size: int
    capacity_tokens: int
    power_share: float  # its share of the device's power while it runs
    timeline: MemoryTimeline = field(default_factory=MemoryTimeline)
    busy_s: float = 0.0  # device time of its iterations, swaps included
    host_bound_iterations: int = 0  # iterations whose host share exceeded their kernels' time
    launches: dict = field(default_factory=dict)  # iterations by how they were launched (graph, piecewise, eager)
    swap_s: float = 0.0
    completed: int = 0
    first_token_span: tuple[float, float] = (math.inf, -math.inf)  # earliest, latest first token
    # Requests in the instance (waiting, running or swapped) integrated over time, sampled at
    # iteration ends: an independent measure of the queue for Little's law.
    in_system_area: float = 0.0
    last_in_system: int = 0
    last_t: float = 0.0
    batch_series: list = field(default_factory=list)  # decimated (t, running, waiting)
    series_stride: int = 1
    block_map: tuple[float, dict] | None = None  # who holds which page at peak use
    stats: object = None  # the scheduler's SchedulerStats
    swaps: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0


@dataclass
class RunRecord:
    """A finished simulation: request metrics as fixed-size summaries, and each instance's record."""

    instances: list[InstanceRecord]
    hw: HardwareSpec | None = None  # the device the instances share
    model: ModelSpec | None = None
    max_model_len: int = 0
    ttft: LatencySummary = field(default_factory=LatencySummary)
    tpot: LatencySummary = field(default_factory=LatencySummary)
    e2el: LatencySummary = field(default_factory=LatencySummary)
    itl: LatencyHistogram = field(default_factory=LatencyHistogram)
    completed: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    duration: float = 0.0  # when the last request finished
    first_done: float = math.inf  # when the first request finished
    last_arrival_done: float = 0.0  # the latest arrival among finished requests
    rejected: list[tuple[int, str]] = field(default_factory=list)
    good: int = 0  # requests that met every SLO given (goodput)
    max_in_flight: int = 0  # most requests sent and not yet finished at once
    # arrivals and completions over the arrival window in LOAD_BINS equal bins: a system that
    # keeps up completes, after its warm-up, about as many as arrive (scenario.load_check)
    arrival_span: float = 0.0
    arrival_bins: list = field(default_factory=list)
    completion_bins: list = field(default_factory=list)


class Instance:
    """One model replica on a device or a partition, with its own KV pool and scheduler."""

    def __init__(self, sim: "Simulation", index: int, setup: InstanceSetup, engine: EngineConfig,
                 max_model_len: int, contiguous_policy: str, device_lock: simpy.Resource | None,
                 power_share: float, stages: list[simpy.Resource] | None = None):
        self.sim = sim
        self.env = sim.env
        self.index = index
        self.cost = setup.cost
        self.lock = device_lock
        self.stages = stages  # a pipeline's stages, one resource each, shared by its virtual engines
        self.outstanding = 0
        if engine.paging:
            pool = PagedPool(setup.plan, engine)
        else:
            pool = ContiguousPool(setup.plan, engine, contiguous_policy, max_model_len)
        self.pool = pool
        scheduler = StaticScheduler if batching_mode(engine) == "static" else ContinuousScheduler
        self.sched = scheduler(engine, pool, max_model_len, sim.record.itl)
        self.record = InstanceRecord(index, setup, engine.paging, engine.block_size,
                                     pool.capacity_tokens, power_share, stats=self.sched.stats)
        self._wake: simpy.Event | None = None
        self._peak_used = -1
        self.want_block_map = sim.want_block_map

    def submit(self, r: Request) -> None:
        self.outstanding += 1  # (sent here and not finished: what a least-outstanding router reads)
        self.sched.submit(r)
        wake = self.sim.lockstep_wake if self.sim.lockstep else self._wake
        if wake is not None and not wake.triggered:
            wake.succeed()

    def loop(self):
        env, sched, price = self.env, self.sched, self.cost.price
        while True:
            if not sched.has_work():
                self._wake = env.event()
                yield self._wake
                self._wake = None
            batch = self.next_batch()
            if batch is None:
                continue
            if self.stages is not None:
                # Pipeline: the batch passes the stages in turn; while it is in one, another
                # virtual engine's batch may run in another (a stage idle meanwhile is the bubble).
                host_s, stage_s, swap_s, host_bound = self.cost.price_stages(batch)
                yield env.timeout(host_s + swap_s)
                for stage, t in zip(self.stages, stage_s):
                    with stage.request() as grant:
                        yield grant
                        yield env.timeout(t)
                device_s = sum(stage_s)
            elif self.lock is None:
                host_s, device_s, swap_s, host_bound = price(batch)
                yield env.timeout(host_s + device_s + swap_s)
            else:
                # Time slicing: host work overlaps other instances; the device runs one iteration
                # at a time.
                host_s, device_s, swap_s, host_bound = price(batch)
                if host_s:
                    yield env.timeout(host_s)
                with self.lock.request() as grant:
                    yield grant
                    yield env.timeout(device_s + swap_s)
            self.finish_iteration(batch, device_s, swap_s, host_bound)

    def launch_of(self, batch) -> str:
        """How this instance's engine launched `batch` (graph, piecewise or eager)."""
        cost = self.cost
        return "graph" if cost.graphed(batch) else cost.launch_mode(batch.num_tokens, bool(batch.prefill_chunks))

    def next_batch(self):
        """The scheduler's next batch, or None when a request waits that an empty pool cannot
        admit (then rejected; capacity_problem() normally rejects such requests at arrival)."""
        sched = self.sched
        batch = sched.schedule()
        if batch is None:
            self.outstanding -= 1
            self.sim.reject(sched.drop_head(), "could not be admitted into an empty KV pool")
            return None
        if self.sim.check_invariants:
            sched.check(batch)
        return batch

    def finish_iteration(self, batch, device_s: float, swap_s: float, host_bound: bool,
                         launch: str | None = None) -> None:
        rec, sched = self.record, self.sched
        rec.host_bound_iterations += host_bound
        launch = launch or self.launch_of(batch)
        rec.launches[launch] = rec.launches.get(launch, 0) + 1
        rec.busy_s += device_s + swap_s
        rec.swap_s += swap_s
        now = self.env.now
        for r in sched.complete(batch, now):
            self.sim.complete(r, self)
        if self.sim.check_invariants:
            sched.check()
        self._sample(now)

    def _sample(self, now: float) -> None:
        """Memory, queue and batch samples at the end of an iteration."""
        rec, sched = self.record, self.sched
        in_system = sched.in_system()
        rec.in_system_area += rec.last_in_system * (now - rec.last_t)
        rec.last_in_system = in_system
        rec.last_t = now
        pool = self.pool
        allocated, filled, used, free, cached = pool.sample(sched.untold())
        rec.timeline.record(now, allocated, filled, used, free, cached)
        if self.want_block_map:
            used = pool.used()
            if used > self._peak_used:
                self._peak_used = used
                rec.block_map = (now, pool.layout(sched.holders()))
        if sched.stats.iterations % rec.series_stride == 0:
            rec.batch_series.append((now, sched.num_running(), len(sched.waiting)))
            if len(rec.batch_series) > 2048:
                rec.batch_series = rec.batch_series[::2]
                rec.series_stride *= 2

    def finish_record(self) -> InstanceRecord:
        rec = self.record
        rec.swaps = self.pool.swaps
        rec.prefix_queries, rec.prefix_hits = self.pool.prefix_counts
        return rec


class Simulation:
    """Runs a request stream through K instances and records what `vllm bench serve` reports."""

    def __init__(self, setups: list[InstanceSetup], engine: EngineConfig, max_model_len: int,
                 sharing: str, contiguous_policy: str = "max", max_concurrency: int | None = None,
                 want_block_map: bool = False, progress: Callable[[int], None] | None = None,
                 check_invariants: bool = False,
                 slo: tuple[float | None, float | None, float | None] | None = None,
                 router: str = "round-robin"):
        self.env = simpy.Environment()
        self.want_block_map = want_block_map
        self.progress = progress
        self.check_invariants = check_invariants  # the schedulers' self-checks around every iteration
        self.slo = slo  # (ttft, tpot, e2el) seconds a request must meet to count as goodput
        self._in_flight = 0
        k = len(setups)
        # "devices": each instance on a device of its own (data-parallel replicas); "pipeline":
        # the instances are one pipeline's virtual engines, passing its stages in turn
        lock = simpy.Resource(self.env, capacity=1) if (sharing == "time-slice" and k > 1) else None
        share = 1.0 if sharing in ("time-slice", "devices", "pipeline") else 1.0 / k
        # a pipeline's virtual engines come pp at a time, one group per data-parallel replica,
        # each group passing stages of its own
        self.group = setups[0].cost.pp if sharing == "pipeline" else 1
        stages = [None] * k
        if sharing == "pipeline":
            for g in range(0, k, self.group):
                own = [simpy.Resource(self.env, capacity=1) for _ in range(self.group)]
                stages[g:g + self.group] = [own] * self.group
        self.router = router
        self.record = RunRecord(instances=[])
        self.instances = [Instance(self, i, s, engine, max_model_len, contiguous_policy, lock, share, stages[i])
                          for i, s in enumerate(setups)]
        self.replicas = [self.instances[i:i + self.group] for i in range(0, k, self.group)]
        # data-parallel ranks whose experts span them (vLLM's DP attention with EP) step together
        self.lockstep = sharing == "devices" and k > 1 and setups[0].cost.dp_ranks > 1
        self.lockstep_wake: simpy.Event | None = None
        self.limit = simpy.Resource(self.env, capacity=max_concurrency) if max_concurrency else None
        self._done = 0
        self._rr = 0

    def reject(self, r: Request, reason: str) -> None:
        self.record.rejected.append((r.id, reason))
        self._done += 1
        self._in_flight -= 1
        if r.on_done:
            r.on_done()

    def complete(self, r: Request, inst: Instance) -> None:
        inst.outstanding -= 1
        now = self.env.now
        r.t_done = now
        rec = self.record
        ir = inst.record
        ir.completed += 1
        lo, hi = ir.first_token_span
        if r.t_first < lo or r.t_first > hi:
            ir.first_token_span = (min(lo, r.t_first), max(hi, r.t_first))
        rec.completed += 1
        rec.total_input_tokens += r.prompt_len
        rec.total_output_tokens += r.output_len
        rec.duration = max(rec.duration, now)
        if now <= rec.arrival_span:
            rec.completion_bins[min(LOAD_BINS - 1, int(now / rec.arrival_span * LOAD_BINS))] += 1
        rec.first_done = min(rec.first_done, now)
        rec.last_arrival_done = max(rec.last_arrival_done, r.arrival)
        ttft, e2el = r.t_first - r.submit, now - r.submit
        rec.ttft.add(ttft)
        rec.e2el.add(e2el)
        # vllm bench serve: TPOT = (e2el - ttft) / (output - 1), and 0 for one-token outputs
        tpot = (now - r.t_first) / (r.output_len - 1) if r.output_len > 1 else 0.0
        if r.output_len > 1:
            rec.tpot.add(tpot)
        slo = self.slo
        if slo is not None and ((slo[0] is None or ttft <= slo[0]) and (slo[1] is None or tpot <= slo[1])
                                and (slo[2] is None or e2el <= slo[2])):
            rec.good += 1
        self._done += 1
        self._in_flight -= 1
        if r.on_done:
            r.on_done()
        if self.progress:
            self.progress(self._done)

    def _dispatch(self, r: Request) -> None:
        self._in_flight += 1
        if self._in_flight > self.record.max_in_flight:
            self.record.max_in_flight = self._in_flight
        if self.group > 1:
            # a pipeline replica (its load: the requests in flight over its virtual engines), then
            # the replica's virtual engine with the fewest unfinished requests (vLLM V0)
            rep = self._route(self.replicas, lambda rep: sum(i.outstanding for i in rep), r)
            inst = min(rep, key=lambda i: i.outstanding)
        else:
            inst = self._route(self.instances, lambda i: i.outstanding, r)
        problem = inst.sched.capacity_problem(r)
        if problem:
            self.reject(r, problem)
        else:
            inst.submit(r)

    def _route(self, units: list, load: Callable, r: Request):
        """The replica (or instance) the router sends `r` to, `load` giving its requests in flight."""
        if len(units) == 1:
            return units[0]
        if self.router in ("least-outstanding", "prefix-aware"):  # the fewest requests in flight
            unit = min(units, key=load)
            if self.router == "prefix-aware" and r.prefix_group >= 0:
                # a shared prefix's requests go to one replica, where it is cached, while that
                # replica is not far busier than the least busy (then balance wins)
                home = units[r.prefix_group % len(units)]
                if load(home) <= 2 * load(unit) + 4:
                    unit = home
            return unit
        unit = units[self._rr % len(units)]
        self._rr += 1
        return unit

    def _lockstep_loop(self):
        """Data-parallel ranks whose MoE layers send tokens to each other's experts (vLLM's DP
        attention with EP): every rank takes part in every step, a rank with no requests with a
        dummy batch (it still joins each layer's all-to-all), so a step ends when the slowest
        rank's does and every rank is busy for all of it. Each rank's batch is priced as its own
        but for its experts, which work on every rank's tokens of the step; the step lasts the
        longest of them."""
        env, ranks = self.env, self.instances
        while True:
            if not any(i.sched.has_work() for i in ranks):
                self.lockstep_wake = env.event()
                yield self.lockstep_wake
                self.lockstep_wake = None
            batches = [i.next_batch() if i.sched.has_work() else None for i in ranks]
            real = [b for b in batches if b is not None]
            everyone = sum(b.num_tokens for b in real)  # (a dummy batch brings none)
            # the ranks launch the step alike, as vLLM syncs them: graphs only if every rank's
            # padded batch was captured (the largest rank's tokens, any rank's prefill)
            mode = ranks[0].cost.launch_mode(max((b.num_tokens for b in real), default=0),
                                             any(b.prefill_chunks for b in real))
            priced = [i.cost.price(b, everyone, mode) if b is not None else None for i, b in zip(ranks, batches)]
            steps = [p[0] + p[1] + p[2] for p in priced if p is not None]
            if not steps:
                continue
            step = max(steps)
            # a rank with a dummy batch holds its device from the first rank's launch on
            launched = min(p[0] for p in priced if p is not None)
            yield env.timeout(step)
            for i, b, p in zip(ranks, batches, priced):
                if b is None:  # a dummy batch: busy for the step, nothing to finish
                    i.record.busy_s += step - launched
                    i._sample(env.now)
                    continue
                host_s, device_s, swap_s, host_bound = p
                # waiting for the slowest rank keeps this one's device in the step
                i.finish_iteration(b, step - host_s - swap_s, swap_s, host_bound, mode)

    def _arrivals(self, specs: Iterable[RequestSpec]):
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

    def run(self, specs: Iterable[RequestSpec]) -> RunRecord:
        arrivals = getattr(specs, "arrivals", None)
        if arrivals is not None and len(arrivals) and self.limit is None and arrivals[-1] > 0:
            import bisect

            rec, span = self.record, arrivals[-1]  # (the stream's arrivals are in order)
            edges = [bisect.bisect_left(arrivals, span * i / LOAD_BINS) for i in range(LOAD_BINS)] + [len(arrivals)]
            rec.arrival_span = span
            rec.arrival_bins = [b - a for a, b in zip(edges, edges[1:])]
            rec.completion_bins = [0] * LOAD_BINS
        if self.lockstep:
            self.env.process(self._lockstep_loop())
        else:
            for inst in self.instances:
                self.env.process(inst.loop())
        counted = _Counted(specs)
        self.env.process(self._arrivals(counted))
        self.env.run()
        lost = counted.n - self._done
        if lost:  # pragma: no cover - a scheduler bug, never a user error
            raise AssertionError(f"{lost} requests neither finished nor were rejected")
        self.record.instances = [inst.finish_record() for inst in self.instances]
        return self.record


class _Counted:
    """An iterable of request specs that counts what it gave out."""

    def __init__(self, specs: Iterable[RequestSpec]):
        self.specs = specs
        self.n = 0

    def __iter__(self):
        for s in self.specs:
            self.n += 1
            yield s


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = q / 100.0 * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


__all__ = ["Simulation", "Instance", "Request", "RunRecord", "InstanceRecord", "LatencyHistogram",
           "LatencySummary", "percentile"]
