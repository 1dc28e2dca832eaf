"""A scenario: device, model, engine settings, workload, instances. Runs the simulator and returns
results keyed as `vllm bench serve --save-result`, so simulated and measured runs compare directly."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from npusim.costmodel import CostModel, MemoryPlan, memory_plan
from npusim.engine import Instance, Simulation, percentile
from npusim.errors import NpusimError
from npusim.specs import (EngineConfig, HardwareSpec, ModelSpec, _validate, batching_mode, check_block_size,
                          load_hardware, load_mapping, load_model)
from npusim.workload import LengthDist, WorkloadSpec, make_requests


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hw: str = "ascend-910b2"
    model: str = "llama-3.1-8b"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    workload: WorkloadSpec = Field(default_factory=lambda: WorkloadSpec(
        num_requests=500, rate=8.0,
        input_len=LengthDist(kind="sharegpt"), output_len=LengthDist(kind="sharegpt")))
    instances: int = Field(default=1, gt=0)
    sharing: Literal["time-slice", "vnpu"] = "time-slice"
    contiguous_policy: Literal["max", "oracle"] = "max"
    seed: int = 0


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    if not p.exists():
        raise NpusimError(f"scenario file not found: {p}")
    return _validate(Scenario, load_mapping(p), str(p))


def instance_setup(hw: HardwareSpec, model: ModelSpec, engine: EngineConfig, instances: int,
                   sharing: str) -> tuple[list[CostModel], list[MemoryPlan]]:
    """Cost model and memory plan of each instance. Time slicing: all cores, 1/K of the memory.
    vNPU: ai_cores // K cores each, with their share of bandwidth and 1/K of the memory."""
    if sharing == "vnpu":
        cores = hw.ai_cores // instances
        if cores < 1:
            raise NpusimError(f"--instances {instances} exceeds {hw.name}'s {hw.ai_cores} AI cores for vnpu sharing")
        part = hw.partition(cores, 1.0 / instances)
        cost = CostModel(part, model, engine.weight_dtype, engine.kv_dtype)
        plan = memory_plan(part, model, engine)
    else:
        cost = CostModel(hw, model, engine.weight_dtype, engine.kv_dtype)
        plan = memory_plan(hw, model, engine, memory_fraction=1.0 / instances)
    if not plan.fits:
        each = ""
        if instances > 1:
            w = model.weight_bytes(engine.weight_dtype) / 2**30
            each = (f" ({instances} instances x {w:.2f} GiB weights = {instances * w:.2f} GiB vs "
                    f"{hw.memory_gib:g} GiB on the device; each instance gets 1/{instances} of it)")
        raise NpusimError(f"{model.name} on {hw.name}{each} {plan.verdict}")
    return [cost] * instances, [plan] * instances


def resolve_max_model_len(model: ModelSpec, engine: EngineConfig, plan: MemoryPlan) -> int:
    """The engine's max_model_len, by default the model's context capped to what one pool holds."""
    capacity = plan.num_blocks * engine.block_size
    if engine.max_model_len is not None:
        if engine.max_model_len > capacity:
            raise NpusimError(f"max_model_len {engine.max_model_len} exceeds the KV pool of "
                              f"{capacity} tokens ({plan.num_blocks} blocks of {engine.block_size})")
        return engine.max_model_len
    return min(model.max_position_embeddings, capacity)


def run_scenario(sc: Scenario, *, want_block_map: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Simulate a scenario; returns the result dictionary (see `npusim simulate --json`)."""
    t_wall = time.perf_counter()
    hw = load_hardware(sc.hw)
    model = load_model(sc.model)
    eng = sc.engine
    check_block_size(hw, eng.block_size)
    batching_mode(eng)
    if sc.sharing == "vnpu" and sc.instances > hw.ai_cores:
        raise NpusimError(f"--instances {sc.instances} exceeds {hw.name}'s {hw.ai_cores} AI cores for vnpu sharing")
    costs, plans = instance_setup(hw, model, eng, sc.instances, sc.sharing)
    max_len = resolve_max_model_len(model, eng, plans[0])
    if not eng.enable_chunked_prefill and eng.max_num_batched_tokens < 1:
        raise NpusimError("max_num_batched_tokens must be > 0")  # pragma: no cover - pydantic checks
    specs = make_requests(sc.workload, sc.seed)
    total = len(specs)
    tick = None
    if progress is not None:
        step = max(1, total // 200)
        tick = lambda done: progress(done, total) if done % step == 0 or done == total else None  # noqa: E731
    sim = Simulation(hw, costs, plans, eng, max_len, sc.sharing, sc.contiguous_policy,
                     sc.workload.max_concurrency, want_block_map, tick)
    sim.run(specs)
    result = summarize(sim, sc, hw, model, max_len)
    result["wall_seconds"] = time.perf_counter() - t_wall
    if want_block_map:
        result["_sim"] = sim
    return result


def _ms_stats(values: list[float], prefix: str) -> dict[str, float | None]:
    vals = sorted(v * 1e3 for v in values)
    if not vals:
        return {f"mean_{prefix}_ms": None, f"median_{prefix}_ms": None, f"std_{prefix}_ms": None,
                f"p99_{prefix}_ms": None}
    return {
        f"mean_{prefix}_ms": statistics.fmean(vals),
        f"median_{prefix}_ms": percentile(vals, 50),
        f"std_{prefix}_ms": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
        f"p99_{prefix}_ms": percentile(vals, 99),
    }


def _kv_summary(inst: Instance) -> dict[str, Any]:
    s = inst.timeline.summary()
    kv = inst.kv
    paged = inst.cfg.paging
    return {
        "block_size": inst.block_size if paged else None,
        "num_blocks": inst.plan.num_blocks if paged else None,
        "capacity_tokens": inst.plan.num_blocks * inst.block_size,
        "peak_used_fraction": s["peak_used_fraction"],
        "mean_used_fraction": s["mean_used_fraction"],
        "mean_waste_fraction": s["aggregate_waste_fraction"],
        "peak_waste_fraction": s["peak_waste_fraction"],
        "preemptions": inst.stats.preemptions,
        "swaps": (kv.swaps_out + kv.swaps_in) if paged else 0,
        "prefix_cache_hit_rate": kv.prefix_cache_hit_rate if paged and inst.cfg.enable_prefix_caching else None,
    }


def summarize(sim: Simulation, sc: Scenario, hw: HardwareSpec, model: ModelSpec,
              max_len: int) -> dict[str, Any]:
    done = sorted(sim.finished, key=lambda r: r.id)
    duration = max((r.t_done for r in done), default=0.0)
    n_in = sum(r.prompt_len for r in done)
    n_out = sum(r.output_len for r in done)
    ttft = [r.t_first - r.submit for r in done]
    e2el = [r.t_done - r.submit for r in done]
    tpot = [(r.t_done - r.t_first) / (r.output_len - 1) for r in done if r.output_len > 1]
    itl = sim.itl
    per = lambda x: x / duration if duration > 0 else None  # noqa: E731
    busy = sum(i.stats.busy_s * i.power_share for i in sim.instances)
    joules = hw.idle_w * duration + (hw.tdp_w - hw.idle_w) * min(busy, duration)
    insts = sim.instances
    kv_each = [_kv_summary(i) for i in insts]
    total_blocks = sum(i.plan.num_blocks for i in insts)

    def weighted(key: str) -> float:
        return sum(k[key] * i.plan.num_blocks for k, i in zip(kv_each, insts)) / total_blocks

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
    if sc.engine.enable_prefix_caching and sc.engine.paging:
        q = sum(i.kv.prefix_queries for i in insts)
        kv_cache["prefix_cache_hit_rate"] = (sum(i.kv.prefix_hits for i in insts) / q) if q else 0.0
    per_instance = []
    for i, k in zip(insts, kv_each):
        st = i.stats
        per_instance.append({
            "index": i.index, "completed": st.completed, "output_tokens": st.output_tokens,
            "output_throughput": per(st.output_tokens), "iterations": st.iterations,
            "mean_batch_tokens": st.batch_tokens_sum / st.iterations if st.iterations else 0.0,
            "max_batch": st.max_batch, "busy_fraction": st.busy_s / duration if duration else 0.0,
            "mean_in_system": st.in_system_area / duration if duration else 0.0,
            "ai_cores": i.cost.hw.ai_cores, "memory_gib": i.plan.device_bytes / 2**30,
            "kv_cache": k,
        })
    mem = insts[0].plan.as_dict()
    result: dict[str, Any] = {
        "scenario": sc.model_dump(mode="json"),
        "hw": hw.name, "model": model.name, "max_model_len": max_len,
        "duration": duration,
        "completed": len(done),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": per(len(done)),
        "output_throughput": per(n_out),
        "total_token_throughput": per(n_in + n_out),
        **_ms_stats(ttft, "ttft"),
        **_ms_stats(tpot, "tpot"),
        "mean_itl_ms": itl.mean() * 1e3 if itl.n else None,
        "median_itl_ms": itl.quantile(0.5) * 1e3 if itl.n else None,
        "p99_itl_ms": itl.quantile(0.99) * 1e3 if itl.n else None,
        **_ms_stats(e2el, "e2el"),
        "kv_cache": kv_cache,
        "energy": {
            "joules": joules,
            "tokens_per_joule": n_out / joules if joules > 0 else None,
            "mean_power_w": joules / duration if duration > 0 else None,
        },
        "memory": mem,
        "rejected": [{"id": r.id, "reason": why} for r, why in sim.rejected],
        "per_instance": per_instance,
    }
    # Percentile keys from vllm bench serve carry nan where undefined; JSON has null instead.
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            result[k] = None
    return result

