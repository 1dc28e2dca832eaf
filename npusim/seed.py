"""The seed article's study, reproduced and judged.

The article claims, for "Llama 3.2 13B" on one Ascend 910 (32 GB), input 5120, output 128, three
configurations: one instance without paging, one with paging, two with paging. There is no Llama 3.2
13B; Llama-2-13B is the nearest dense 13B decoder and stands in for it. Every figure of its table
and three of its text claims are checked against bounds that follow from the device's datasheet
(bandwidth, memory) and the model's size, and against npusim's simulation of the same setup.
"""

from __future__ import annotations

import math
from typing import Any

from npusim.costmodel import CostModel, memory_plan
from npusim.errors import NpusimError
from npusim.scenario import Scenario, run_scenario
from npusim.specs import EngineConfig, ceil_div, load_engine_profile, load_hardware, load_model
from npusim.workload import LengthDist, WorkloadSpec

HW = "ascend-910"
STAND_IN = "llama-2-13b"
INPUT_LEN = 5120
OUTPUT_LEN = 128
MAX_MODEL_LEN = INPUT_LEN + OUTPUT_LEN
# The Ascend 910 has no bf16 cube, so the model runs in fp16.
DTYPE = "fp16"

ARTICLE = {
    "single, no paging": {"instances": 1, "paging": False, "throughput_tok_s": 85.0,
                          "latency_ms_per_token": 11.8, "memory_gb": 24.5, "tokens_per_joule": 0.8},
    "single, paging": {"instances": 1, "paging": True, "throughput_tok_s": 142.0,
                       "latency_ms_per_token": 7.0, "memory_gb": 12.0, "tokens_per_joule": 1.5},
    "two instances, paging": {"instances": 2, "paging": True, "throughput_tok_s": 260.0,
                              "latency_ms_per_token": 7.5, "memory_gb": 18.0, "tokens_per_joule": 2.2},
}
METRICS = {
    "throughput_tok_s": ("throughput", "token/s"),
    "latency_ms_per_token": ("latency", "ms/token"),
    "memory_gb": ("memory", "GB"),
    "tokens_per_joule": ("energy efficiency", "token/J"),
}

NOTES = [
    "There is no 'Llama 3.2 13B' (the family is 1B, 3B, 11B-Vision, 90B-Vision); npusim uses "
    "Llama-2-13B (40 layers, hidden 5120, no GQA, 13.0 B parameters) as the stand-in.",
    "Llama-2-13B was trained for 4,096 tokens; input 5120 + output 128 = 5,248 needs a RoPE-scaled "
    "variant. npusim runs it at max_model_len 5248 with its context RoPE-scaled to that length "
    "(vLLM would refuse 5,248 tokens for the 4,096-token model without rope_scaling).",
    "vLLM 0.2.4 had no Ascend backend (vllm-ascend appeared in 2025), so the article cannot have "
    "measured vLLM's PagedAttention on a 910 as it says.",
    "The Ascend 910 has no bf16 cube: weights and KV cache are fp16.",
]


def _engine(paging: bool, utilization: float, weight_dtype: str = DTYPE, max_len: int = MAX_MODEL_LEN,
            profile: str | None = None) -> EngineConfig:
    # Chunked prefill at 2048 tokens keeps the activation peak small: every GB counts on this device.
    return EngineConfig(profile=profile, paging=paging, block_size=128, gpu_memory_utilization=utilization,
                        max_num_batched_tokens=2048, max_model_len=max_len,
                        weight_dtype=weight_dtype, kv_dtype=DTYPE, max_num_seqs=64)


def stand_in():
    """Llama-2-13B with the RoPE-scaled context the article's 5,248-token requests need (see NOTES)."""
    m = load_model(STAND_IN)
    need = INPUT_LEN + OUTPUT_LEN
    return m.model_copy(update={"max_position_embeddings": max(m.max_position_embeddings, need),
                                "source": m.source + f", context RoPE-scaled to {need} tokens"})


def simulate_row(name: str, model, instances: int, paging: bool, *, input_len: int = INPUT_LEN,
                 output_len: int = OUTPUT_LEN, utilization: float, weight_dtype: str = DTYPE,
                 requests: int = 16, seed: int = 0, engine: str | None = None) -> dict[str, Any]:
    """One configuration through the simulator: `requests` requests per instance arriving at once.
    An infeasible configuration comes back with its reason and null metrics."""
    sc = Scenario(hw=HW, model=model, instances=instances, sharing="time-slice", seed=seed,
                  engine=_engine(paging, utilization, weight_dtype, input_len + output_len, engine),
                  workload=WorkloadSpec(num_requests=requests * instances, rate=math.inf,
                                        input_len=LengthDist(kind="fixed", value=input_len),
                                        output_len=LengthDist(kind="fixed", value=output_len)))
    row: dict[str, Any] = {"name": name, "model": getattr(model, "name", model), "instances": instances, "paging": paging,
                           "input_len": input_len, "output_len": output_len,
                           "weight_dtype": weight_dtype, "gpu_memory_utilization": utilization}
    try:
        r = run_scenario(sc)
    except NpusimError as e:
        row.update(feasible=False, reason=str(e), throughput_tok_s=None, latency_ms_per_token=None,
                   memory_gb=None, tokens_per_joule=None, max_batch=None, ttft_ms=None)
        return row
    mem = r["memory"]
    kv_peak_gb = r["kv_cache"]["peak_used_fraction"] * mem["kv_capacity_tokens"] * mem["kv_bytes_per_token"] / 1e9
    fixed_gb = (mem["weights_gib"] + mem["activation_peak_gib"] + mem["runtime_reserve_gib"]) * 2**30 / 1e9
    if r["completed"] == 0:
        reason = r["rejected"][0]["reason"] if r["rejected"] else "no request completed"
        row.update(feasible=False, reason=f"not even one request fits: {reason}", throughput_tok_s=None,
                   latency_ms_per_token=None, memory_gb=None, tokens_per_joule=None, max_batch=None,
                   ttft_ms=None)
        return row
    row.update(
        feasible=True, reason=None,
        throughput_tok_s=r["output_throughput"],
        latency_ms_per_token=r["mean_tpot_ms"],
        memory_gb=instances * fixed_gb + kv_peak_gb,
        tokens_per_joule=r["energy"]["tokens_per_joule"],
        max_batch=max(p["max_batch"] for p in r["per_instance"]),
        ttft_ms=r["mean_ttft_ms"],
        kv_blocks_per_instance=mem["num_blocks"],
        rejected=len(r["rejected"]),
    )
    return row


def bounds(instances: int, paging: bool, utilization: float) -> dict[str, Any]:
    """What physics allows for a configuration, before any efficiency loss: every decode step
    reads all weights (and the batch's KV) at the datasheet bandwidth; memory holds at least the
    weights of every instance; the device draws at least its idle power."""
    hw, m = load_hardware(HW), stand_in()
    bw = hw.memory_bandwidth_gbs * 1e9
    weights = m.weight_bytes(DTYPE)
    kv_token = m.kv_bytes_per_token(DTYPE)
    plan = memory_plan(hw, m, _engine(paging, utilization), memory_fraction=1.0 / instances)
    if paging:
        max_batch = plan.num_blocks // ceil_div(MAX_MODEL_LEN, 128) if plan.fits else 0
    else:
        max_batch = plan.kv_capacity_tokens // MAX_MODEL_LEN if plan.fits else 0
    t_floor = weights / bw  # one decode step of one instance, batch 1
    out: dict[str, Any] = {"weights_gb": weights / 1e9, "t_floor_ms": t_floor * 1e3,
                           "memory_floor_gb": instances * weights / 1e9, "max_batch": max_batch,
                           "fits": plan.fits and max_batch > 0, "plan": plan}
    if out["fits"]:
        step = (weights + max_batch * kv_token * INPUT_LEN) / bw
        # K time-sliced instances take turns: each one's token waits for the others' steps.
        out["throughput_tok_s"] = max_batch / step
        out["latency_ms_per_token"] = instances * t_floor * 1e3
        out["tokens_per_joule"] = out["throughput_tok_s"] / hw.idle_w
    else:
        out["throughput_tok_s"] = out["latency_ms_per_token"] = out["tokens_per_joule"] = None
    return out


def _claim(claim: str, seed_value, npusim_value, bound, plausible: bool, verdict: str, why: str) -> dict:
    return {"claim": claim, "seed_value": seed_value, "npusim_value": npusim_value, "bound": bound,
            "plausible": plausible, "verdict": verdict, "why": why}


def table_claims(rows: dict[str, dict], utilization: float) -> list[dict]:
    hw = load_hardware(HW)
    out = []
    for name, seed in ARTICLE.items():
        b = bounds(seed["instances"], seed["paging"], utilization)
        row = rows[name]
        for key, (what, unit) in METRICS.items():
            claimed = seed[key]
            ours = row.get(key)
            label = f"{name}: {what} {claimed:g} {unit}"
            if key == "memory_gb":
                bound = b["memory_floor_gb"]
                ok = claimed >= bound
                why = (f"{seed['instances']} x {b['weights_gb']:.1f} GB of fp16 weights alone need "
                       f"{bound:.1f} GB" + ("" if ok else f", more than the {claimed:g} GB claimed")
                       + (f"; the device has {hw.memory_gib:g} GiB" if bound > hw.memory_gib * 1.073741824 else ""))
            elif not b["fits"]:
                bound = None
                ok = False
                why = (f"the configuration does not fit in {hw.memory_gib:g} GiB: "
                       f"{b['plan'].verdict}; no {what} can be measured")
            elif key == "latency_ms_per_token":
                bound = b["latency_ms_per_token"]
                ok = claimed >= bound
                why = (f"every decode step reads all {b['weights_gb']:.1f} GB of weights at <= "
                       f"{hw.memory_bandwidth_gbs:g} GB/s: >= {b['t_floor_ms']:.1f} ms per step"
                       + (f", x{seed['instances']} when instances take turns" if seed["instances"] > 1 else ""))
            elif key == "throughput_tok_s":
                bound = b["throughput_tok_s"]
                ok = claimed <= bound
                why = (f"at most {b['max_batch']} sequence(s) of {MAX_MODEL_LEN} tokens fit beside the weights; "
                       f"even at the datasheet bandwidth that batch yields <= {bound:.1f} token/s")
            else:
                bound = b["tokens_per_joule"]
                ok = claimed <= bound
                why = (f"<= {b['throughput_tok_s']:.1f} token/s at no less than the {hw.idle_w:g} W idle "
                       f"power (assumed; see the profile) gives <= {bound:.2f} token/J")
            out.append(_claim(label, claimed, ours, bound, ok, "possible" if ok else "impossible", why))
    return out


def text_claims(rows: dict[str, dict], utilization: float, engine: str | None = None) -> list[dict]:
    hw, m = load_hardware(HW), stand_in()
    out = []
    # 1. Paging cuts peak memory by more than 50 % for L > 4096.
    a, b = rows["single, no paging"], rows["single, paging"]
    weights_gb = m.weight_bytes(DTYPE) / 1e9
    device_gb = hw.memory_bytes / 1e9
    max_cut = 1 - weights_gb / device_gb  # even if all non-weight memory were saved
    ours = (1 - b["memory_gb"] / a["memory_gb"]) if a.get("feasible") and b.get("feasible") else None
    out.append(_claim(
        "paging cuts peak memory by more than 50 % for L > 4096", 0.5, ours, max_cut, 0.5 <= max_cut,
        "impossible" if max_cut < 0.5 else "possible",
        f"weights ({weights_gb:.1f} GB) are {weights_gb / device_gb:.0%} of the {device_gb:.1f} GB device and "
        f"paging does not touch them: the cut is at most {max_cut:.0%}"
        + (f"; simulated: {ours:.1%}" if ours is not None else "")))
    # 2. Throughput is bandwidth-bound for L > 8192.
    cm = CostModel(hw, m, DTYPE, DTYPE, engine)
    ridge = hw.matmul_tflops_fp16 * 1e12 / (hw.memory_bandwidth_gbs * 1e9)
    intensities = {}
    for L in (1024, 4096, 8192, 16384):
        ops = cm.ops(1, L, ceil_div(L, 128) * 128)
        intensities[L] = sum(o.flops for o in ops) / sum(o.bytes for o in ops)
    worst = max(intensities.values())
    out.append(_claim(
        "throughput is bandwidth-limited for L > 8192", None, f"memory-bound at every L (intensity <= {worst:.1f} flop/B)",
        ridge, True, "true but not specific to L > 8192",
        f"decode intensity {', '.join(f'L={k}: {v:.2f}' for k, v in intensities.items())} flop/B is far "
        f"below the ridge point {ridge:.0f} flop/B: decode is bandwidth-bound at every context length"))
    # 3. Page size around 256 suits long inputs.
    times = {}
    for P in (16, 64, 128, 256, 512):
        ctx = INPUT_LEN + OUTPUT_LEN // 2
        times[P] = cm.step_time(1, ctx, ceil_div(ctx, P) * P)
    best = min(times, key=times.get)
    spread = max(times.values()) / min(times.values()) - 1
    tail = {P: (P - 1) / 2 / (INPUT_LEN + OUTPUT_LEN) for P in (128, 256)}
    out.append(_claim(
        "page size around P = 256 suits long inputs", 256, best, None, False, "unsupported",
        f"across P = 16..512 the decode step changes by {spread:.2%} (best P = {best}); a larger page only "
        f"adds unfilled tail (on average {tail[128]:.1%} of a {MAX_MODEL_LEN}-token sequence at P = 128, "
        f"{tail[256]:.1%} at 256), and the Ascend kernels' default is 128"))
    # 4. throughput proportional to B * N_core / T_latency.
    t1 = cm.step_time(1, INPUT_LEN, INPUT_LEN)
    half = CostModel(hw.partition(hw.ai_cores // 2, 1.0).model_copy(
        update={"memory_bandwidth_gbs": hw.memory_bandwidth_gbs}), m, DTYPE, DTYPE, engine).step_time(
        1, INPUT_LEN, INPUT_LEN)
    out.append(_claim(
        "throughput is proportional to B * N_core / T_latency", None, f"halving N_core changes T by {half / t1 - 1:+.1%}",
        None, False, "holds only when compute-bound",
        f"decode here is bandwidth-bound: with the bandwidth fixed, {hw.ai_cores // 2} instead of {hw.ai_cores} "
        f"cores changes the step from {t1 * 1e3:.1f} to {half * 1e3:.1f} ms, not 2x; "
        f"see `npusim analyze` for where the law holds"))
    return out


ALTERNATIVES = [
    # name, model, instances, paging, weight dtype, input, output
    ("Llama-3.2-3B, two instances, paging", "llama-3.2-3b", 2, True, DTYPE, INPUT_LEN, OUTPUT_LEN),
    ("Llama-3.2-3B, one instance, paging", "llama-3.2-3b", 1, True, DTYPE, INPUT_LEN, OUTPUT_LEN),
    ("Llama-3.1-8B int8 weights, two instances, paging", "llama-3.1-8b", 2, True, "int8", INPUT_LEN, OUTPUT_LEN),
    ("Llama-2-13B int8 weights, two instances, paging", "llama-2-13b", 2, True, "int8", INPUT_LEN, OUTPUT_LEN),
    ("Llama-2-7B int8 weights, two instances, paging, input 1024", "llama-2-7b", 2, True, "int8", 1024, OUTPUT_LEN),
    ("Llama-2-13B, one instance, paging, input 1024", "llama-2-13b", 1, True, DTYPE, 1024, OUTPUT_LEN),
    ("Llama-2-13B, one instance, no paging, input 1024", "llama-2-13b", 1, False, DTYPE, 1024, OUTPUT_LEN),
]


def run_seed(utilization: float = 0.98, requests: int = 16, seed: int = 0,
             alternatives: bool = True, engine: str | None = None) -> dict[str, Any]:
    """The article's three configurations, its claims judged, and feasible alternatives, with
    `engine` (default: the device's)."""
    rows = {}
    for name, spec in ARTICLE.items():
        rows[name] = simulate_row(name, stand_in(), spec["instances"], spec["paging"],
                                  utilization=utilization, requests=requests, seed=seed, engine=engine)
    at_default = memory_plan(load_hardware(HW), stand_in(), _engine(True, 0.9, profile=engine))
    settings_note = (f"gpu_memory_utilization {utilization} (at vLLM's default 0.9: "
                     f"{at_default.num_blocks} blocks = {at_default.kv_capacity_tokens} tokens, "
                     f"{'enough' if at_default.kv_capacity_tokens >= MAX_MODEL_LEN else 'not enough'} "
                     f"for one {MAX_MODEL_LEN}-token request)")
    alts = []
    if alternatives:
        for name, model, k, paging, wd, L, O in ALTERNATIVES:
            if model == STAND_IN:
                model = stand_in()  # (its context, RoPE-scaled as the article's requests need)
            alts.append(simulate_row(name, model, k, paging, input_len=L, output_len=O,
                                     utilization=utilization, weight_dtype=wd, requests=requests, seed=seed,
                                     engine=engine))
    scenarios = [rows[n] for n in ARTICLE]
    for s in scenarios:
        s["article"] = {k: ARTICLE[s["name"]][k] for k in METRICS}
    return {
        "setup": {"hw": HW, "model": STAND_IN, "engine": load_engine_profile(engine or load_hardware(HW).default_engine).name, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                  "dtype": DTYPE, "block_size": 128, "requests_per_instance": requests,
                  "settings": settings_note},
        "notes": NOTES,
        "scenarios": scenarios,
        "claims": table_claims(rows, utilization) + text_claims(rows, utilization, engine),
        "alternatives": alts,
    }


def format_seed(result: dict) -> str:
    """The article's table and npusim's side by side, then a verdict per claim."""
    def fmt(v, p=1):
        return "-" if v is None else (f"{v:,.{p}f}" if isinstance(v, (int, float)) else str(v))

    s = result["setup"]
    lines = [f"The seed article's study on {s['hw']} with {s['model']} (stand-in), input {s['input_len']}, "
             f"output {s['output_len']}, {s['dtype']}, block {s['block_size']}; {s['settings']}.", ""]
    lines += [f"  * {n}" for n in result["notes"]]
    lines.append("")
    head = f"{'configuration':<24}{'':>3}{'token/s':>10}{'ms/token':>10}{'GB':>8}{'token/J':>9}  note"
    lines += [head, "-" * len(head)]
    for row in result["scenarios"]:
        a = row["article"]
        lines.append(f"{row['name']:<24}{'art':>3}{fmt(a['throughput_tok_s']):>10}{fmt(a['latency_ms_per_token']):>10}"
                     f"{fmt(a['memory_gb']):>8}{fmt(a['tokens_per_joule'], 2):>9}")
        note = "" if row["feasible"] else "infeasible: " + row["reason"]
        if row["feasible"]:
            note = f"batch {row['max_batch']}, TTFT {fmt(row['ttft_ms'], 0)} ms"
        lines.append(f"{'':<24}{'sim':>3}{fmt(row['throughput_tok_s']):>10}{fmt(row['latency_ms_per_token']):>10}"
                     f"{fmt(row['memory_gb']):>8}{fmt(row['tokens_per_joule'], 2):>9}  {note}")
    lines += ["", "Claims:"]
    for c in result["claims"]:
        mark = "ok " if c["plausible"] else "NO "
        lines.append(f"  [{mark}] {c['claim']}  ({c['verdict']})")
        lines.append(f"        {c['why']}")
    if result["alternatives"]:
        lines += ["", "What the article could have measured on this device:"]
        for row in result["alternatives"]:
            if row["feasible"]:
                lines.append(f"  {row['name']:<60} {fmt(row['throughput_tok_s']):>8} token/s  "
                             f"{fmt(row['latency_ms_per_token']):>6} ms/token  {fmt(row['memory_gb']):>5} GB  "
                             f"{fmt(row['tokens_per_joule'], 2):>5} token/J  batch {row['max_batch']}")
            else:
                lines.append(f"  {row['name']:<60} infeasible: {row['reason']}")
    return "\n".join(lines)
