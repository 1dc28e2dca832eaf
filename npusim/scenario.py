"""A scenario: device, model, engine settings, workload, instances. Runs the simulator and returns
results keyed as `vllm bench serve --save-result`, so simulated and measured runs compare directly."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from npusim.costmodel import InstanceSetup, MemoryPlan, instance_setup
from npusim.engine import LOAD_BINS, InstanceRecord, LatencySummary, RunRecord, Simulation, percentile
from npusim.errors import NpusimError
from npusim.specs import (EngineConfig, HardwareSpec, ModelSpec, _validate, batching_mode, load_hardware,
                          load_mapping, load_model)
from npusim.workload import WorkloadSpec, make_requests


class GoodputSLO(BaseModel):
    """Service-level objectives a request must meet to count towards goodput (as `vllm bench serve
    --goodput ttft:MS tpot:MS e2el:MS`); only the ones given apply."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    e2el_ms: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "GoodputSLO":
        if self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None:
            raise ValueError("goodput needs at least one of ttft_ms, tpot_ms, e2el_ms")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hw: str = "ascend-910b2"
    model: str | ModelSpec = Field(default="llama-3.1-8b", description="a zoo name, a config.json path, or a spec")

    @model_validator(mode="before")
    @classmethod
    def _model_by_name(cls, data: Any) -> Any:
        # In a file the model is a zoo name or a config.json path; a mapping there is a mistake
        # (the Python API may pass a ModelSpec object).
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            raise ValueError("model must be a zoo name or the path of a config.json, not a mapping")
        return data
    engine: EngineConfig = Field(default_factory=EngineConfig)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    instances: int = Field(default=1, gt=0)
    sharing: Literal["time-slice", "vnpu"] = "time-slice"
    contiguous_policy: Literal["max", "oracle"] = "max"
    goodput: GoodputSLO | None = None
    seed: int = Field(default=0, ge=0)
    # data-parallel replicas: dp copies of the instance, each on devices of its own, behind a router
    dp: int = Field(default=1, gt=0, le=1024)
    router: Literal["round-robin", "least-outstanding", "prefix-aware"] = "round-robin"

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        pp = self.engine.pipeline_parallel_size
        ep, tp = self.engine.expert_parallel_size, self.engine.tensor_parallel_size
        if ep > tp and pp > 1:
            raise ValueError(f"--pp {pp} with data-parallel experts (--ep {ep} --tp {tp}): ranks in lock step "
                             "through pipeline stages are not modelled")
        if ep > tp and self.instances > 1:
            raise ValueError(f"--ep {ep} with --instances {self.instances}: expert-parallel ranks each own their "
                             "devices")
        if ep > tp and ep % tp == 0 and self.dp != ep // tp:
            devices = "device" if tp == 1 else f"{tp} devices"
            raise ValueError(f"--ep {ep} with --tp {tp} spreads the experts over {ep // tp} data-parallel ranks of "
                             f"{devices} each: it needs --dp {ep // tp} (got {self.dp})")
        if pp > 1 and self.instances > 1:
            raise ValueError(f"--pp {pp} with --instances {self.instances}: a pipeline spans devices of its own; "
                             "run one instance")
        if self.dp > 1 and self.instances > 1:
            raise ValueError("dp replicas each own their devices; instances > 1 shares one device between "
                             "instances: give one or the other")
        if self.dp == 1 and "router" in self.model_fields_set and self.instances == 1:
            raise ValueError("router sends requests between replicas or instances: it needs dp >= 2 "
                             "(or instances >= 2)")
        if self.sharing == "vnpu" and self.instances == 1:
            raise ValueError("sharing vnpu splits the device between instances: it needs instances >= 2")
        if self.contiguous_policy == "oracle" and self.engine.paging:
            raise ValueError("contiguous_policy oracle is a contiguous reservation: it needs --no-paging "
                             "(engine.paging: false)")
        return self


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    if not p.exists():
        raise NpusimError(f"scenario file not found: {p}")
    data = load_mapping(p)
    # Files a scenario names are relative to the scenario's own folder, not the working directory.
    here = p.resolve().parent

    def local(value):
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        return str(here / value)

    def is_file_name(value):
        return isinstance(value, str) and ("/" in value or value.endswith((".yaml", ".yml", ".json")))

    for key in ("hw", "model"):
        if is_file_name(data.get(key)):
            data[key] = local(data[key])
    if isinstance(data.get("workload"), dict) and data["workload"].get("trace") is not None:
        data["workload"] = {**data["workload"], "trace": local(data["workload"]["trace"])}
    if isinstance(data.get("engine"), dict) and is_file_name(data["engine"].get("profile")):
        data["engine"] = {**data["engine"], "profile": local(data["engine"]["profile"])}
    return _validate(Scenario, data, str(p))


def setup_instances(hw: HardwareSpec, model: ModelSpec, engine: EngineConfig, instances: int,
                    sharing: str) -> list[InstanceSetup]:
    """Each instance's hardware (device or vNPU partition), cost model and memory plan; a plan
    that does not fit is an error that says why."""
    setup = instance_setup(hw, model, engine, instances, sharing)
    if not setup.plan.fits:
        each = ""
        if instances > 1:
            w = model.weight_bytes(engine.weight_dtype) / 2**30
            each = (f" ({instances} instances x {w:.2f} GiB weights = {instances * w:.2f} GiB vs "
                    f"{hw.memory_gib:g} GiB on the device; each instance gets 1/{instances} of it)")
        raise NpusimError(f"{model.name} on {hw.name}{each} {setup.plan.verdict}")
    return [setup] * instances


def pipeline_setups(hw: HardwareSpec, model: ModelSpec, engine: EngineConfig) -> list[InstanceSetup]:
    """A pipeline of pp stages as pp virtual engines (vLLM V0's design, which V1's batch queue of
    pp in-flight batches follows): each schedules its own requests with 1/pp of the KV blocks, and
    their batches pass the stages in turn, so up to pp iterations run at once, one per stage.
    New requests go to the virtual engine with the fewest unfinished (as V0's add_request)."""
    setup = setup_instances(hw, model, engine, 1, "time-slice")[0]
    pp = setup.engine.pipeline_parallel_size
    blocks = setup.plan.num_blocks // pp
    if blocks < 1:
        raise NpusimError(f"--pp {pp}: {setup.plan.num_blocks} KV blocks do not split among {pp} virtual engines")
    plan = replace(setup.plan, num_blocks=blocks)
    usable = blocks - int(setup.engine.watermark * blocks)
    return [replace(setup, plan=plan, usable_blocks=usable)] * pp


def resolve_max_model_len(model: ModelSpec, engine: EngineConfig, plan: MemoryPlan) -> int:
    """The engine's max_model_len, by default the model's context capped to what one pool holds.
    Without chunked prefill a request preempted for recompute must be prefilled again in one
    iteration, so max_model_len must fit the token budget, as vLLM requires; by default it does."""
    capacity = plan.num_blocks * engine.block_size
    no_chunks = not engine.enable_chunked_prefill and batching_mode(engine) == "continuous"
    if engine.max_model_len is not None:
        if engine.max_model_len > model.max_position_embeddings:
            raise NpusimError(f"max_model_len {engine.max_model_len} exceeds {model.name}'s context of "
                              f"{model.max_position_embeddings} tokens (max_position_embeddings), as vLLM refuses")
        if engine.max_model_len > capacity:
            raise NpusimError(f"max_model_len {engine.max_model_len} exceeds the KV pool of "
                              f"{capacity} tokens ({plan.num_blocks} blocks of {engine.block_size})")
        if no_chunks and engine.max_model_len > engine.max_num_batched_tokens:
            raise NpusimError(f"max_model_len {engine.max_model_len} exceeds max_num_batched_tokens "
                              f"{engine.max_num_batched_tokens}: without chunked prefill every request "
                              f"must fit one iteration (as vLLM requires)")
        return engine.max_model_len
    default = min(model.max_position_embeddings, capacity)
    if no_chunks:
        default = min(default, engine.max_num_batched_tokens)
    return default


def simulate_scenario(sc: Scenario, *, want_block_map: bool = False,
                      progress: Callable[[int, int], None] | None = None,
                      check_invariants: bool = False, hw: HardwareSpec | None = None,
                      model: ModelSpec | None = None) -> RunRecord:
    """Simulate a scenario; returns its run record. `hw` and `model` stand in for the scenario's
    names when the caller has the specs already (e.g. loaded from a file)."""
    hw = hw or load_hardware(sc.hw)
    model = model or load_model(sc.model)
    batching_mode(sc.engine)
    pp = sc.engine.pipeline_parallel_size
    sharing, router = ("devices" if sc.dp > 1 else sc.sharing), sc.router
    if pp > 1:  # dp replicas of a pipeline: each its own stages, the router choosing among replicas
        setups = pipeline_setups(hw, model, sc.engine) * sc.dp
        sharing = "pipeline"
    elif sc.dp > 1:  # replicas: each a whole instance on its own device(s)
        setups = setup_instances(hw, model, sc.engine, 1, sc.sharing) * sc.dp
    else:
        setups = setup_instances(hw, model, sc.engine, sc.instances, sc.sharing)
    eng = setups[0].engine  # the profile's defaults filled in
    max_len = resolve_max_model_len(model, eng, setups[0].plan)
    specs = make_requests(sc.workload, sc.seed)
    total = len(specs)
    tick = None
    if progress is not None:
        step = max(1, total // 200)
        tick = lambda done: progress(done, total) if done % step == 0 or done == total else None  # noqa: E731
    slo = None
    if sc.goodput is not None:
        g = sc.goodput
        slo = tuple(None if v is None else v / 1e3 for v in (g.ttft_ms, g.tpot_ms, g.e2el_ms))
    sim = Simulation(setups, eng, max_len, sharing, sc.contiguous_policy,
                     sc.workload.max_concurrency, want_block_map, tick, check_invariants, slo, router)
    record = sim.run(specs)
    record.hw, record.model, record.max_model_len = hw, model, max_len
    return record


def run_scenario(sc: Scenario, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Simulate a scenario; returns the result dictionary (see `npusim simulate --json`)."""
    t_wall = time.perf_counter()
    result = summarize(simulate_scenario(sc, progress=progress), sc)
    result["wall_seconds"] = time.perf_counter() - t_wall
    return result


def _ms_stats(values: LatencySummary, prefix: str) -> dict[str, float | None]:
    if not values.n:
        return {f"mean_{prefix}_ms": None, f"median_{prefix}_ms": None, f"std_{prefix}_ms": None,
                f"p99_{prefix}_ms": None}
    if values.exact:
        vals = sorted(v * 1e3 for v in values.values)
        return {
            f"mean_{prefix}_ms": statistics.fmean(vals),
            f"median_{prefix}_ms": percentile(vals, 50),
            f"std_{prefix}_ms": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            f"p99_{prefix}_ms": percentile(vals, 99),
        }
    n, mean = values.n, values.total / values.n
    var = max(0.0, values.total_sq / n - mean * mean)
    return {  # past the exact limit: quantiles from 0.1 %-wide bins
        f"mean_{prefix}_ms": mean * 1e3,
        f"median_{prefix}_ms": values.hist.quantile(0.5) * 1e3,
        f"std_{prefix}_ms": math.sqrt(var) * 1e3,
        f"p99_{prefix}_ms": values.hist.quantile(0.99) * 1e3,
    }


def _kv_summary(inst: InstanceRecord, prefix_caching: bool) -> dict[str, Any]:
    s = inst.timeline.summary()
    paged = inst.paged
    num_blocks = inst.setup.plan.num_blocks
    q, hits = inst.prefix_queries, inst.prefix_hits
    return {
        "block_size": inst.block_size if paged else None,
        "num_blocks": num_blocks if paged else None,
        "capacity_tokens": num_blocks * inst.block_size,
        "peak_used_fraction": s["peak_used_fraction"],
        "mean_used_fraction": s["mean_used_fraction"],
        "mean_waste_fraction": s["aggregate_waste_fraction"],
        "peak_waste_fraction": s["peak_waste_fraction"],
        "preemptions": inst.stats.preemptions,
        "swaps": inst.swaps,
        "prefix_cache_hit_rate": (hits / q if q else 0.0) if paged and prefix_caching else None,
    }


def load_check(record: RunRecord) -> dict[str, Any]:
    """Whether the system kept up with its arrivals, after its warm-up (the first third of the
    arrival window, or two mean service times, a request's latency less its wait, if longer):
    over the rest of the window,
    the completions against the arrivals (a stable system completes about as many as arrive) and
    the requests in the system, running and waiting, in its first and second half (stationary in
    a stable system, by Little's law). Overloaded: under 90 % of the arrivals completed while the
    count in the system did not fall; then the run's latencies grow with its length. A run too
    short for its latencies (warm-up past 3/4 of the window) is judged by the queue at its last
    arrival. Not judged for a closed loop (--max-concurrency) or everything at once."""
    span, bins = record.arrival_span, LOAD_BINS
    out = {"arrival_span_s": record.last_arrival_done, "judged_from_s": None, "offered_rate": None,
           "served_fraction": None, "in_system_first_half": None, "in_system_second_half": None,
           "overloaded": False}
    if not span > 0 or not record.e2el.n:
        return out
    # a request's service once it started (its end-to-end latency less its wait for a first token)
    service = max(0.0, (record.e2el.total - record.ttft.total) / record.e2el.n)
    warm = max(span / 3, 2 * service)
    if warm > 0.75 * span:
        # too short a run to see a steady state: judged by the queue left at the last arrival
        # (a quarter of all requests still waiting to start is a load that was not kept up with)
        waiting = 0
        for inst in record.instances:
            at_end = [w for t, _, w in inst.batch_series if t <= span]
            waiting += at_end[-1] if at_end else 0
        arrived = sum(record.arrival_bins)
        out.update(offered_rate=arrived / span, overloaded=waiting >= 0.25 * arrived)
        return out
    b0 = min(bins - 1, int(warm / span * bins))
    w0 = b0 * span / bins
    arrived = sum(record.arrival_bins[b0:])
    if not arrived:
        return out
    served = sum(record.completion_bins[b0:]) / arrived
    mid = (w0 + span) / 2
    first, second = [], []
    for inst in record.instances:
        for t, running, waiting in inst.batch_series:
            if w0 <= t < mid:
                first.append(running + waiting)
            elif mid <= t <= span:
                second.append(running + waiting)
    n1 = sum(first) / len(first) if first else 0.0
    n2 = sum(second) / len(second) if second else 0.0
    out.update(judged_from_s=w0, offered_rate=arrived / (span - w0), served_fraction=served,
               in_system_first_half=n1, in_system_second_half=n2, overloaded=served < 0.9 and n2 >= n1)
    return out


def _comm_share(inst: InstanceRecord, record: RunRecord) -> float:
    """The collectives' share of a decode iteration at the run's mean batch and mean context:
    0 on one device."""
    cost = inst.setup.cost
    st = inst.stats
    if (cost.tp == 1 and cost.pp == 1 and cost.ep == 1) or not st.iterations:
        return 0.0
    batch = max(1, round(st.batch_tokens_sum / st.iterations))
    context = max(1, round((record.total_input_tokens + record.total_output_tokens / 2) / max(1, record.completed)))
    ops = cost.ops(num_decodes=batch, decode_context_tokens=batch * context, decode_kv_slots=batch * context)
    return sum(o.time_s for o in ops if o.bound == "comm") / sum(o.time_s for o in ops)


def summarize(record: RunRecord, sc: Scenario) -> dict[str, Any]:
    """The `npusim simulate --json` dictionary of a run."""
    hw, model, max_len = record.hw, record.model, record.max_model_len
    duration = record.duration
    n_in, n_out = record.total_input_tokens, record.total_output_tokens
    itl = record.itl
    per = lambda x: x / duration if duration > 0 else None  # noqa: E731
    insts = record.instances
    tp = insts[0].setup.engine.tensor_parallel_size  # every device of a tensor-parallel instance draws power
    pp = insts[0].setup.engine.pipeline_parallel_size
    if pp > 1:  # tp x pp devices a replica idle all along; each stage's devices draw the rest while it runs
        joules = 0.0
        for r in range(sc.dp):
            busy = sum(i.busy_s for i in insts[r * pp:(r + 1) * pp])  # (stage times, over its virtual engines)
            joules += tp * (pp * hw.idle_w * duration + (hw.tdp_w - hw.idle_w) * min(busy, pp * duration))
    elif sc.dp > 1:  # every replica's devices: idle power all along, the rest while they compute
        joules = tp * sum(hw.idle_w * duration + (hw.tdp_w - hw.idle_w) * min(i.busy_s, duration) for i in insts)
    else:
        busy = sum(i.busy_s * i.power_share for i in insts)
        joules = tp * (hw.idle_w * duration + (hw.tdp_w - hw.idle_w) * min(busy, duration))
    prefix_caching = insts[0].setup.engine.enable_prefix_caching  # (resolved: the engine's default if unset)
    kv_each = [_kv_summary(i, prefix_caching) for i in insts]
    total_blocks = sum(i.setup.plan.num_blocks for i in insts)

    def weighted(key: str) -> float:
        return sum(k[key] * i.setup.plan.num_blocks for k, i in zip(kv_each, insts)) / total_blocks

    kv_cache = dict(kv_each[0])
    kv_cache.update({
        "num_blocks": total_blocks if sc.engine.paging else None,
        "capacity_tokens": sum(k["capacity_tokens"] for k in kv_each),
        "peak_used_fraction": max(k["peak_used_fraction"] for k in kv_each),
        "mean_used_fraction": weighted("mean_used_fraction"),
        "mean_waste_fraction": weighted("mean_waste_fraction"),
        "peak_waste_fraction": max(k["peak_waste_fraction"] for k in kv_each),
        "preemptions": sum(k["preemptions"] for k in kv_each),
        "swaps": sum(k["swaps"] for k in kv_each),
    })
    if prefix_caching and sc.engine.paging:
        q = sum(i.prefix_queries for i in insts)
        kv_cache["prefix_cache_hit_rate"] = (sum(i.prefix_hits for i in insts) / q) if q else 0.0
    per_instance = []
    for i, k in zip(insts, kv_each):
        st = i.stats
        per_instance.append({
            "index": i.index, "completed": i.completed, "output_tokens": st.output_tokens,
            "output_throughput": per(st.output_tokens), "iterations": st.iterations,
            "mean_batch_tokens": st.batch_tokens_sum / st.iterations if st.iterations else 0.0,
            "max_batch": st.max_batch, "busy_fraction": i.busy_s / duration if duration else 0.0,
            "host_bound_fraction": i.host_bound_iterations / st.iterations if st.iterations else 0.0,
            "mean_in_system": i.in_system_area / duration if duration else 0.0,
            "ai_cores": i.setup.hw.ai_cores, "memory_gib": i.setup.plan.device_bytes / 2**30,
            "kv_cache": k,
        })
    mem = insts[0].setup.plan.as_dict()
    scenario = sc.model_dump(mode="json")
    setup = insts[0].setup
    scenario["engine"] = setup.engine.model_dump(mode="json")  # the profile's defaults filled in
    scenario["engine"]["profile"] = setup.profile.name
    result: dict[str, Any] = {
        "scenario": scenario,
        "hw": hw.name, "model": model.name, "max_model_len": max_len,
        "engine_profile": setup.profile.name, "execution": setup.profile.execution,
        "batching": batching_mode(sc.engine),
        "duration": duration,
        "completed": record.completed,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": per(record.completed),
        "output_throughput": per(n_out),
        "total_token_throughput": per(n_in + n_out),
        **_ms_stats(record.ttft, "ttft"),
        **_ms_stats(record.tpot, "tpot"),
        "request_goodput": per(record.good) if sc.goodput is not None else None,
        "max_concurrent_requests": record.max_in_flight,
        "mean_itl_ms": itl.mean() * 1e3 if itl.n else None,
        "std_itl_ms": itl.std() * 1e3 if itl.n else None,
        "median_itl_ms": itl.quantile(0.5) * 1e3 if itl.n else None,
        "p99_itl_ms": itl.quantile(0.99) * 1e3 if itl.n else None,
        **_ms_stats(record.e2el, "e2el"),
        "kv_cache": kv_cache,
        # iterations whose host share (scheduling, input preparation, launches the kernels waited
        # for) exceeded the kernels' own time, and the rest
        "host_bound_iteration_fraction": (sum(i.host_bound_iterations for i in insts)
                                          / max(1, sum(i.stats.iterations for i in insts))),
        # how the engine launched its iterations: one captured graph, piecewise graphs, or eagerly
        # (vLLM's graph modes: steps with prefill or above the capture size leave the graph)
        "iterations_by_launch": {mode: sum(i.launches.get(mode, 0) for i in insts)
                                 for mode in ("graph", "piecewise", "eager")},
        "energy": {
            "joules": joules,
            "tokens_per_joule": n_out / joules if joules > 0 else None,
            "mean_power_w": joules / duration if duration > 0 else None,
        },
        "memory": mem,  # (per device: under tensor parallelism every device holds the same share)
        "parallel": {"tensor_parallel_size": tp, "expert_parallel_size": insts[0].setup.engine.expert_parallel_size,
                     "data_parallel_size": sc.dp, "router": sc.router, "pipeline_parallel_size": pp,
                     "devices": tp * sc.dp * pp,  # (instances > 1 share one device)
                     # data-parallel ranks whose experts span them run every step together
                     "lock_step": sc.dp > 1 and insts[0].setup.cost.dp_ranks > 1,
                     "memory_per_device_gib": insts[0].setup.plan.device_bytes / 2**30,
                     "comm_share_of_decode_step": _comm_share(insts[0], record)},
        "load": load_check(record),
        "rejected": [{"id": rid, "reason": why} for rid, why in record.rejected],
        "per_instance": per_instance,
    }
    # Percentile keys from vllm bench serve carry nan where undefined; JSON has null instead.
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            result[k] = None
    return result
