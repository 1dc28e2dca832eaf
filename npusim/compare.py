"""The analytical decode model (analysis.py) against the discrete-event simulator (engine.py).

Both price an iteration with the same CostModel, so in steady-state decode with no queueing they
must agree; what is left is what the analytical model leaves out on purpose:

- time slicing is modelled alike on both sides: an instance does its host work outside the device
  lock, behind the other instances' device steps, so a round lasts max(K × device, device + host);
- blocks rounding and context growth: the analytical point reads ceil((context + 1) / block) blocks
  per sequence at every step, the simulator's sequences grow through the decode and read the pages
  they have at each step;
- capacity edges: the analytical max batch counts the admission watermark but not the growth of
  each sequence during its decode, so at the edge the simulator may preempt.

Under load the two part further: with few arrivals the batch stays below the cap and throughput
follows the offered load; at saturation the batch reaches the cap but each new request's prefill
takes device time the decode-only model does not count; under memory pressure recompute
preemption throws work away.
"""

from __future__ import annotations

import math
from typing import Sequence

from npusim.analysis import SHARING_MODES, AnalyticalPoint, analytical_point, instance_hardware
from npusim.costmodel import CostModel
from npusim.engine import RunRecord
from npusim.errors import NpusimError
from npusim.scenario import Scenario, simulate_scenario, summarize
from npusim.specs import EngineConfig, HardwareSpec, ModelSpec, ceil_div, load_hardware, load_model
from npusim.workload import LengthDist, WorkloadSpec

GRID_BATCHES = (1, 8, 32, 64)
GRID_CONTEXTS = (512, 2048, 8192)
# Where "agree" ends. In steady state the raw difference is blocks rounding (below), worth at most
# one page of KV reads per sequence: up to 2.3 % on the default grid (B=64 at context 512 with
# 128-token pages), more for larger batches on a page boundary. What is left once rounding is
# priced (`residual`) stays below 0.05 % wherever the simulator ran the batch.
TOLERANCE = 0.03
MIN_WINDOW_ITERATIONS = 8  # fewer decode iterations than this in the window is no steady state


# --------------------------------------------------------------------------- set-up

def _analytic(hw: HardwareSpec, model: ModelSpec, *, batch: int, context: int, instances: int,
              sharing: str, block_size: int | None, weight_dtype: str, kv_dtype: str,
              gpu_memory_utilization: float, engine: str | None = None) -> AnalyticalPoint:
    return analytical_point(hw, model, batch=batch, context=context, instances=instances,
                            sharing=sharing, block_size=block_size, weight_dtype=weight_dtype,
                            kv_dtype=kv_dtype, gpu_memory_utilization=gpu_memory_utilization,
                            engine=engine)


def decode_prompt_len(context: int, output_len: int) -> int:
    """The prompt whose decode steps see, on average, the analytical point's context.

    Decode step j (j = 1 .. output_len - 1) attends to prompt + j tokens, and the analytical point
    charges context + 1 (the token being generated has its slot too), so the mean matches when
    prompt = context + 1 - output_len / 2."""
    prompt = context + 1 - output_len // 2
    if prompt < 1:
        raise NpusimError(f"context {context} is too short for output_len {output_len}: the prompt "
                          f"would be {prompt} tokens; use output_len <= {2 * context}")
    return prompt


def _fixed(n: int) -> LengthDist:
    return LengthDist(kind="fixed", value=n)


def _simulate(hw: HardwareSpec, model: ModelSpec, engine: EngineConfig, workload: WorkloadSpec,
              instances: int, sharing: str, seed: int = 0) -> tuple[RunRecord, dict]:
    """Run the simulator as `npusim simulate` does, keeping the run record for its series."""
    sc = Scenario(hw=hw.name, model=model.name, engine=engine, workload=workload,
                  instances=instances, sharing=sharing, seed=seed)
    run = simulate_scenario(sc, hw=hw, model=model)
    if run.rejected:
        rid, why = run.rejected[0]
        raise NpusimError(f"the simulator rejected {len(run.rejected)} request(s), e.g. #{rid}: {why}")
    return run, summarize(run, sc)


# --------------------------------------------------------------------------- steady state

def _decode_window(sim: RunRecord) -> list[dict]:
    """Per instance: decode tokens and time over the window where every instance decodes.

    The window opens when the last instance's prefill iteration ends (before that, one instance's
    prefill would slow down another's decode under time slicing) and closes at the first completion
    (after that fewer instances compete for the device). Inside it, each instance's rate is the
    sequences it decoded over whole iterations, end to end; the prefill iterations and the tail
    where instances run alone never enter, so this isolates steady-state decode. The median ITL
    would not: ITL mixes all instances and the prefill-perturbed steps."""
    series = []
    for inst in sim.instances:
        if inst.series_stride != 1:  # the series was decimated: iterations are missing
            raise NpusimError("decode window too long to measure: use a shorter output_len")
        series.append(inst.batch_series)
    t_start = max(s[0][0] for s in series)
    t_stop = sim.first_done
    out = []
    for s in series:
        inside = [k for k, (t, _, _) in enumerate(s) if t_start <= t <= t_stop]
        if len(inside) < MIN_WINDOW_ITERATIONS + 1:
            raise NpusimError(f"only {max(0, len(inside) - 1)} decode iterations in the steady window; "
                              f"use a longer output_len")
        k0, k1 = inside[0], inside[-1]
        # Iteration k ran the sequences left running at the end of iteration k - 1.
        tokens = sum(s[k - 1][1] for k in range(k0 + 1, k1 + 1))
        seconds = s[k1][0] - s[k0][0]
        out.append(dict(iterations=k1 - k0, tokens=tokens, seconds=seconds))
    return out


def _mean_slots_per_seq(prompt: int, output_len: int, block_size: int) -> float:
    """KV slots a sequence reads per decode step, averaged over its decode: whole pages."""
    steps = range(1, output_len)
    return sum(ceil_div(prompt + j, block_size) * block_size for j in steps) / len(steps)


def _feasible_point(hw, model, *, output_len: int, **point_kw):
    """The analytical point a simulator run is shaped after, and the prompt that centres its
    decode on the point's context; an infeasible point is an error, since nothing can match it."""
    hw, model = load_hardware(hw), load_model(model)
    point = _analytic(hw, model, **point_kw)
    if not point.feasible:
        raise NpusimError(f"infeasible point: {point.reason}")
    return hw, model, point, decode_prompt_len(point_kw["context"], output_len)


def simulate_steady_decode(hw: HardwareSpec | str, model: ModelSpec | str, *, batch: int, context: int,
                           instances: int = 1, sharing: str = "time-slice", block_size: int | None = None,
                           weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                           gpu_memory_utilization: float = 0.9, output_len: int = 64,
                           engine: str | None = None) -> dict:
    """A simulator run shaped like the analytical point: `batch` requests per instance, all at
    t = 0, prefilled together, then decoded in lockstep around a mean context of `context`.
    Returns per-instance and total decode tokens/s and per-token latency of the steady window."""
    hw, model, point, prompt = _feasible_point(
        hw, model, batch=batch, context=context, instances=instances, sharing=sharing,
        block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
        gpu_memory_utilization=gpu_memory_utilization, output_len=output_len, engine=engine)
    engine = EngineConfig(
        profile=engine, block_size=point.block_size, max_num_seqs=max(256, batch),
        # every prompt of an instance in one prefill iteration, so the decode that follows is pure
        max_num_batched_tokens=max(8192, batch * prompt),
        gpu_memory_utilization=gpu_memory_utilization, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
        # The big token budget would shrink the pool through vLLM's activation estimate; the
        # comparison is about time, so the pool is pinned to the analytical point's.
        num_blocks=point.num_blocks)
    workload = WorkloadSpec(num_requests=batch * instances, rate=math.inf, input_len=_fixed(prompt),
                            output_len=_fixed(output_len))
    sim, result = _simulate(hw, model, engine, workload, instances, sharing)
    window = _decode_window(sim)
    per_instance = [w["tokens"] / w["seconds"] for w in window]
    # in lockstep an instance's iteration period is the time between two tokens of one sequence
    periods = [w["seconds"] / w["iterations"] for w in window]
    mean_batch = [w["tokens"] / w["iterations"] for w in window]
    # lockstep: each instance's requests all got their first token in the same iteration
    lockstep = (result["kv_cache"]["preemptions"] == 0
                and all(i.first_token_span[0] == i.first_token_span[1] for i in sim.instances)
                and all(abs(b - batch) < 1e-9 for b in mean_batch))
    return dict(
        hw=hw.name, model=model.name, batch=batch, context=context, instances=instances,
        sharing=sharing, prompt_len=prompt, output_len=output_len, block_size=point.block_size,
        num_blocks=point.num_blocks,
        tokens_per_s_per_instance=per_instance, tokens_per_s=sum(per_instance),
        tpot_ms_per_instance=[p * 1e3 for p in periods], tpot_ms=sum(periods) / len(periods) * 1e3,
        mean_batch_per_instance=mean_batch,
        window_iterations=[w["iterations"] for w in window],
        mean_kv_slots_per_seq=_mean_slots_per_seq(prompt, output_len, point.block_size),
        preemptions=result["kv_cache"]["preemptions"], lockstep=lockstep,
    )


# --------------------------------------------------------------------------- the grid

def _rounding_factor(hw: HardwareSpec, model: ModelSpec, p: AnalyticalPoint, sim: dict) -> float:
    """By how much the simulator should beat the analytical throughput from blocks rounding alone,
    priced with the same cost model: the analytical step reads ceil((context + 1) / block) whole
    pages per sequence; the simulator's sequences cross a page boundary during their decode and read
    sim's mean slots."""
    cm = CostModel(instance_hardware(hw, p.instances, p.sharing), model, p.weight_dtype, p.kv_dtype,
                   p.engine)
    b = p.batch
    device_s = cm.step_time(b, b * (p.context + 1), b * sim["mean_kv_slots_per_seq"])
    host_s, held_s = cm.host_times(b, device_s)
    if p.sharing == "time-slice" and p.instances > 1:
        return p.tpot_ms / (max(p.instances * held_s, held_s + host_s) * 1e3)
    return p.iteration_ms / ((held_s + host_s) * 1e3)


def _grid_note(p: AnalyticalPoint, sim: dict, rel: float, rounding: float) -> str:
    """Why the two numbers differ, naming only causes present at this point."""
    residual = (1 + rel) / rounding - 1
    why = []
    if abs(rounding - 1) > 0.001:
        why.append(f"blocks rounding x{rounding:.3f}: analytic reads {p.blocks_per_seq * p.block_size} "
                   f"KV slots/seq, the DES's growing context {sim['mean_kv_slots_per_seq']:.0f} on average")
    if not sim["lockstep"]:
        ran = min(sim["mean_batch_per_instance"])
        why.append(f"capacity edge: the DES decoded {ran:.1f} of {p.batch} sequences per iteration with "
                   f"{sim['preemptions']} preemptions (the analytical max batch {p.max_batch} ignores "
                   f"each sequence's growth during its decode)")
    if abs(residual) > 0.005:
        why.append(f"unexplained {residual:+.1%}")
    if not sim["lockstep"]:
        head = "differ"  # the simulator did not run the analytical batch: no agreement to claim
    elif abs(rel) <= 0.005:
        head = "agree"
    elif abs(residual) <= 0.005:
        head = "agree after known effects"
    else:
        head = "differ"
    return "; ".join([head] + why)


def _infeasible_row(base: dict, reason: str) -> dict:
    return {**base, "feasible": False, "reason": reason, "analytic_tokens_per_s": None,
            "sim_tokens_per_s": None, "rel_diff": None, "analytic_tpot_ms": None, "sim_tpot_ms": None,
            "tpot_rel_diff": None, "rounding_factor": None, "expected_ratio": None, "residual": None, "preemptions": None,
            "bound": None, "note": reason}


def compare_grid(hw: HardwareSpec | str, model: ModelSpec | str, *,
                 batches: Sequence[int] = GRID_BATCHES, contexts: Sequence[int] = GRID_CONTEXTS,
                 instances_list: Sequence[int] = (1, 2), sharing_modes: Sequence[str] = SHARING_MODES,
                 block_size: int | None = None, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                 gpu_memory_utilization: float = 0.9, output_len: int = 64,
                 engine: str | None = None) -> list[dict]:
    """Analytical vs simulated steady-state decode at every grid point. One instance owns the whole
    device in either mode, so it appears once, with sharing "-". `rel_diff` is simulated over
    analytical throughput minus 1; `expected_ratio` (= rounding_factor) the ratio that blocks
    rounding explains; `residual` what is left after it."""
    hw, model = load_hardware(hw), load_model(model)
    kw = dict(block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
              gpu_memory_utilization=gpu_memory_utilization, engine=engine)
    rows = []
    for k in instances_list:
        for sharing in (sharing_modes[:1] if k == 1 else sharing_modes):
            for context in contexts:
                for batch in batches:
                    base = dict(hw=hw.name, model=model.name, batch=batch, context=context,
                                instances=k, sharing=sharing if k > 1 else "-")
                    try:
                        p = _analytic(hw, model, batch=batch, context=context, instances=k,
                                      sharing=sharing, **kw)
                    except NpusimError as e:  # e.g. more vNPUs than cores
                        rows.append(_infeasible_row(base, str(e)))
                        continue
                    if not p.feasible:
                        rows.append(_infeasible_row(base, p.reason))
                        continue
                    sim = simulate_steady_decode(hw, model, batch=batch, context=context, instances=k,
                                                 sharing=sharing, output_len=output_len, **kw)
                    rel = sim["tokens_per_s"] / p.tokens_per_s - 1
                    rounding = _rounding_factor(hw, model, p, sim)
                    expected = rounding
                    rows.append({**base, "feasible": True, "reason": "",
                                 "analytic_tokens_per_s": p.tokens_per_s,
                                 "sim_tokens_per_s": sim["tokens_per_s"], "rel_diff": rel,
                                 "analytic_tpot_ms": p.tpot_ms, "sim_tpot_ms": sim["tpot_ms"],
                                 "tpot_rel_diff": sim["tpot_ms"] / p.tpot_ms - 1,
                                 "rounding_factor": rounding,
                                 "expected_ratio": expected, "residual": (1 + rel) / expected - 1,
                                 "preemptions": sim["preemptions"], "bound": p.bound,
                                 "note": _grid_note(p, sim, rel, rounding)})
    return rows


# --------------------------------------------------------------------------- under load

def pressure_num_blocks(batch: int, prompt: int, output_len: int, block_size: int,
                        watermark: float = 0.01) -> int:
    """A KV pool that admits `batch` prompts at once but holds only half of their growth, so that
    recompute preemption must happen once their pages fill up."""
    at_admission = batch * ceil_div(prompt, block_size)
    growth = batch * (ceil_div(prompt + output_len - 1, block_size) - ceil_div(prompt, block_size))
    n = at_admission + growth // 2
    while n - int(watermark * n) < at_admission:  # admission keeps the watermark free
        n += 1
    return n


def _load_note(row: dict, full_pool: dict | None) -> str:
    """Which of queueing, saturation or preemption sets the gap to the analytical number."""
    cap, batch = row["batch_cap"], row["mean_batch"]
    if row["preemptions"]:
        text = (f"preemption: {row['preemptions']} recomputes throw prefilled and decoded work away, "
                f"{-row['gap']:.0%} below the analytical capacity")
        if full_pool:
            loss = 1 - row["sim_tokens_per_s"] / full_pool["sim_tokens_per_s"]
            text += f", {loss:.0%} below the same load on the full pool"
        return text
    if batch < 0.9 * cap:
        offered = row["offered_tokens_per_s"]
        text = (f"queueing: batch {batch:.1f} stays below the cap {cap}, so throughput follows the "
                f"offered load ({offered:,.0f} tokens/s), not the capacity")
        if row["drain_share"] >= 0.02:
            text += f"; the last {row['drain_share']:.0%} of the run drains the final requests"
        return text
    text = (f"saturation: batch {batch:.1f} reaches the cap {cap}; the gap is mostly the prefill of "
            f"each new request (~{row['prefill_share']:.0%} of device time), which the decode-only "
            f"analytical model leaves out")
    return text


def _load_run(hw: HardwareSpec, model: ModelSpec, point: AnalyticalPoint, *, case: str, rate: float,
              num_blocks: int, num_requests: int, prompt: int, output_len: int, prefill_s: float,
              gpu_memory_utilization: float, seed: int) -> dict:
    """One open-loop run, summarised against the analytical capacity (`note` is added later)."""
    k, sharing, batch = point.instances, point.sharing, point.batch
    # max_num_seqs is the cap the analytical batch stands for; the pool is the analytical point's
    # (or the small one), whatever vLLM's activation estimate would leave at this cap
    engine = EngineConfig(profile=point.engine, block_size=point.block_size, max_num_seqs=batch,
                          num_blocks=num_blocks,
                          gpu_memory_utilization=gpu_memory_utilization, weight_dtype=point.weight_dtype,
                          kv_dtype=point.kv_dtype)
    workload = WorkloadSpec(num_requests=num_requests, rate=rate, input_len=_fixed(prompt),
                            output_len=_fixed(output_len))
    sim, res = _simulate(hw, model, engine, workload, k, sharing, seed)
    last_arrival = sim.last_arrival_done
    duration = res["duration"]
    # the realised offered load: a few hundred Poisson arrivals stray from the nominal rate
    offered = output_len * (num_requests - 1) / last_arrival if last_arrival > 0 else None
    iterations = sum(i["iterations"] for i in res["per_instance"])
    lanes = k if sharing == "vnpu" else 1  # vNPUs prefill side by side, time slices take turns
    return dict(
        hw=hw.name, model=model.name, case=case, rate=rate, batch_cap=batch, context=point.context,
        instances=k, sharing=sharing, num_blocks=num_blocks, requests=num_requests,
        offered_tokens_per_s=offered, sim_tokens_per_s=res["output_throughput"],
        analytic_tokens_per_s=point.tokens_per_s,
        gap=res["output_throughput"] / point.tokens_per_s - 1,
        # tokens sampled per iteration: the decode batch the scheduler actually ran
        mean_batch=res["total_output_tokens"] / iterations,
        busy_fraction=sum(i["busy_fraction"] for i in res["per_instance"]) / k,
        mean_ttft_ms=res["mean_ttft_ms"], preemptions=res["kv_cache"]["preemptions"],
        # the part of the run after the last arrival: vllm bench's duration counts it too
        drain_share=(duration - last_arrival) / duration,
        prefill_share=num_requests * prefill_s / (duration * lanes))


def compare_under_load(hw: HardwareSpec | str, model: ModelSpec | str, *, batch: int, context: int,
                       rates: Sequence[float], output_len: int = 256, num_requests: int | None = None,
                       instances: int = 1, sharing: str = "time-slice", block_size: int | None = None,
                       weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                       gpu_memory_utilization: float = 0.9, num_blocks_pressure: int | None = None,
                       seed: int = 0, engine: str | None = None) -> list[dict]:
    """Open-loop Poisson arrivals at each rate (requests/s, inf = all at t = 0), then the highest
    rate again on a small KV pool that forces preemptions, against the analytical capacity at
    max_num_seqs = `batch` per instance. `num_requests` defaults to eight full batches per
    instance; `num_blocks_pressure` to pressure_num_blocks()."""
    if not rates or any(r <= 0 for r in rates):
        raise NpusimError(f"rates must be a non-empty list of requests/s > 0, got {list(rates)}")
    hw, model, point, prompt = _feasible_point(
        hw, model, batch=batch, context=context, instances=instances, sharing=sharing,
        block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
        gpu_memory_utilization=gpu_memory_utilization, output_len=output_len, engine=engine)
    n = num_requests or 8 * batch * instances
    pressure = num_blocks_pressure or pressure_num_blocks(batch, prompt, output_len, point.block_size)
    cost = CostModel(instance_hardware(hw, instances, sharing), model, weight_dtype, kv_dtype, point.engine)
    prefill_s = cost.step_time(prefill_chunks=[(prompt, 0)])  # one prompt alone, for the note
    common = dict(num_requests=n, prompt=prompt, output_len=output_len, seed=seed,
                  gpu_memory_utilization=gpu_memory_utilization, prefill_s=prefill_s)
    rows = [_load_run(hw, model, point, case="poisson", rate=r, num_blocks=point.num_blocks, **common)
            for r in rates]
    rows.append(_load_run(hw, model, point, case="memory-pressure", rate=max(rates),
                          num_blocks=pressure, **common))
    full_pool = rows[list(rates).index(max(rates))]
    for row in rows:
        row["note"] = _load_note(row, full_pool if row is rows[-1] else None)
    return rows


# --------------------------------------------------------------------------- text

def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


GRID_COLUMNS = (("K", "instances", "d"), ("sharing", "sharing", "s"), ("B", "batch", "d"),
                ("ctx", "context", "d"), ("analytic tok/s", "analytic_tokens_per_s", ",.0f"),
                ("sim tok/s", "sim_tokens_per_s", ",.0f"), ("diff", "rel_diff", "+.2%"),
                ("tpot ms", "analytic_tpot_ms", ".2f"), ("sim tpot", "sim_tpot_ms", ".2f"),
                ("expect", "expected_ratio", ".3f"), ("resid", "residual", "+.2%"), ("note", "note", "s"))
LOAD_COLUMNS = (("case", "case", "s"), ("rate/s", "rate", ".2f"),
                ("offered tok/s", "offered_tokens_per_s", ",.0f"), ("sim tok/s", "sim_tokens_per_s", ",.0f"),
                ("analytic tok/s", "analytic_tokens_per_s", ",.0f"), ("gap", "gap", "+.1%"),
                ("batch", "mean_batch", ".1f"), ("cap", "batch_cap", "d"),
                ("ttft ms", "mean_ttft_ms", ",.0f"), ("preempt", "preemptions", "d"), ("note", "note", "s"))


def format_comparison(rows: list[dict]) -> str:
    """A compact text table of compare_grid or compare_under_load rows; the note comes last and is
    not padded."""
    if not rows:
        return ""
    columns = LOAD_COLUMNS if "case" in rows[0] else GRID_COLUMNS
    cells = [[h for h, _, _ in columns]]
    cells += [[_fmt(r.get(key), spec) for _, key, spec in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns) - 1)]
    lines = []
    for c in cells:
        head = "  ".join(x.rjust(w) for x, w in zip(c, widths))
        lines.append(f"{head}  {c[-1]}".rstrip())
    return "\n".join(lines)


__all__ = ["simulate_steady_decode", "compare_grid", "compare_under_load", "format_comparison",
           "decode_prompt_len", "pressure_num_blocks", "GRID_BATCHES",
           "GRID_CONTEXTS", "TOLERANCE"]
