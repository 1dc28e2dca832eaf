"""An engine profile from a kernel trace of one forward step of the user's own engine.

`npusim calibrate engine --trace FILE ...` reads the device kernels of one decode step (a
torch.profiler chrome trace, CUDA or torch_npu, or an Ascend kernel_details.csv), walks them
layer by layer and assigns each kernel to one of npusim's ops by where it falls in the layer:

    norm | QKV GEMM | q/k norms, RoPE, KV write | attention | O GEMM | residual, norm |
    gate/up GEMM | activation | down GEMM | residual

(the layer's four GEMM calls are its landmarks; a GEMM's split-K reduction belongs to it). It
counts each op's kernels per layer (the median over the layers), takes each op's least kernel time
from the durations of its small kernels (in a decode step their work is far below their fixed
cost), and, for an eager engine, the host's dispatch time per kernel from the step's wall time
measured without the profiler (fit_dispatch). Everything else (execution mode, host terms, page
sizes) comes from a base profile.
"""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path
from typing import Any

from npusim.errors import NpusimError
from npusim.profiler_import import KernelRecord, classify_kernel, load_kernels
from npusim.specs import ENGINE_NUMBER_FIELDS, LAYER_OPS, STEP_OPS, EngineProfile, ModelSpec, ceil_div

MAX_SAMPLING_KERNELS = 64  # more after the LM head is not sampling: another step, or a backward pass
_SMALL = ("norm", "rope", "elementwise", "activation", "kv_write", "copy", "other", "sampling")


def _calls(records: list[KernelRecord]) -> list[tuple[str, list[KernelRecord]]]:
    """Kernels grouped by the op call that launched them (one GEMM and its reduction), in order,
    each with its category."""
    out: list[tuple[str, list[KernelRecord]]] = []
    for r in records:
        cat = classify_kernel(r.name, r.op_type)
        # a split-K GEMM's reduction belongs to its GEMM (graph replays carry no op ids to say so)
        if cat == "gemm" and out and out[-1][0] == "gemm" and "reduce" in r.name.lower():
            out[-1][1].append(r)
            continue
        if out and r.op_id is not None and out[-1][1][-1].op_id == r.op_id:
            out[-1][1].append(r)
            if cat == "gemm":
                out[-1] = ("gemm", out[-1][1])
            continue
        out.append((cat, [r]))
    return out


def _layers(calls: list[tuple[str, list[KernelRecord]]], num_layers: int) -> tuple[list, list, list]:
    """(prologue calls, one list of calls per layer, epilogue calls). A layer runs from the call
    after the previous layer's down GEMM (its last GEMM) through its own down GEMM's residual."""
    gemm_at = [i for i, (cat, _) in enumerate(calls) if cat == "gemm"]
    per_layer = 4
    head = len(gemm_at) - num_layers * per_layer  # the LM head's GEMM call(s)
    if not 1 <= head <= 3:
        raise NpusimError(
            f"the trace has {len(gemm_at)} GEMM calls; a step of {num_layers} layers with fused QKV and "
            f"gate/up projections has {per_layer} per layer and the LM head's "
            f"({num_layers * per_layer + 1} to {num_layers * per_layer + 3}): is it one whole forward "
            f"step, of this model, with fused projections?")
    layer_gemms = [gemm_at[i * per_layer:(i + 1) * per_layer] for i in range(num_layers)]
    lm_head = gemm_at[num_layers * per_layer]
    # a layer starts just after the previous layer's residual: split between a down GEMM and the
    # next norm, where the first norm (or, for layer 0, the first call after the embedding) sits
    starts = []
    for li, g in enumerate(layer_gemms):
        lo = layer_gemms[li - 1][3] + 1 if li else 0
        first_norm = next((i for i in range(lo, g[0]) if calls[i][0] == "norm"), g[0])
        starts.append(first_norm)
    prologue = calls[:starts[0]]
    layers = [calls[starts[i]:(starts[i + 1] if i + 1 < num_layers else None)] for i in range(num_layers)]
    # the last layer ends with its residual: the final norm and the head are the epilogue
    last = layers[-1]
    cut = next((i for i in range(len(last)) if calls.index(last[i]) > layer_gemms[-1][3]
                and last[i][0] == "norm"), None)
    epilogue_start = starts[-1] + cut if cut is not None else lm_head
    layers[-1] = calls[starts[-1]:epilogue_start]
    return prologue, layers, calls[epilogue_start:]


def _assign_layer(layer: list[tuple[str, list[KernelRecord]]], qk_norm: bool,
                  attention: str = "attention_decode") -> dict[str, list[KernelRecord]]:
    """npusim op -> the layer's kernels it launched; the attention kernels (and a gather for them)
    go to `attention`, the decode or the prefill attention op."""
    ops: dict[str, list[KernelRecord]] = {o: [] for o in LAYER_OPS}
    gemms = [i for i, (cat, _) in enumerate(layer) if cat == "gemm"]
    qkv, o, gate_up, down = gemms[:4]
    attn = [i for i, (cat, _) in enumerate(layer) if cat == "attention" and qkv < i < o]
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    for name, i in zip(names, (qkv, o, gate_up, down)):
        ops[name] += layer[i][1]
    first_attn = attn[0] if attn else o
    norms_seen = 0
    for i, (cat, kernels) in enumerate(layer):
        if i in (qkv, o, gate_up, down):
            continue
        if i < qkv:
            ops["rmsnorm_attn"] += kernels
        elif i < first_attn:
            if cat == "norm" and qk_norm and norms_seen < 2:
                ops["qk_norm"] += kernels
                norms_seen += 1
            elif cat == "kv_write":
                ops["kv_cache_write"] += kernels
            elif cat == "copy" and any(k.duration_us > 0 for k in kernels) and _gathers_kv(layer, i, first_attn):
                ops[attention] += kernels
            else:
                ops["rope"] += kernels
        elif i < o:
            ops[attention] += kernels
        elif i < gate_up:
            ops["rmsnorm_mlp" if cat == "norm" else "residual_attn"] += kernels
        elif i < down:
            ops["silu_mul"] += kernels
        else:
            ops["residual_mlp"] += kernels
    return ops


def _gathers_kv(layer, i: int, first_attn: int) -> bool:
    """A copy between the KV write and the attention kernel gathers the cache for attention."""
    return all(cat in ("copy",) for cat, _ in layer[i:first_attn])


def traced_tokens(assigned: list[dict[str, list[KernelRecord]]], hidden: int) -> int | None:
    """The tokens each layer's QKV GEMM multiplied (the rows of its input of width `hidden`), where
    the trace records shapes (Ascend kernel_details, or torch.profiler with record_shapes) and all
    layers agree; None where it does not say."""
    seen = set()
    for ops in assigned:
        for k in ops["qkv_proj"][:1]:
            for shape in k.input_shapes:
                if len(shape) >= 2 and shape[-1] == hidden:
                    rows = 1
                    for d in shape[:-1]:
                        rows *= d
                    seen.add(rows)
                    break
    return seen.pop() if len(seen) == 1 else None


def _host_span_us(path: Path) -> float | None:
    """Wall time from the first to the end of the last host op of a chrome trace (None for CSVs)."""
    if path.suffix not in (".json", ".gz"):
        return None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data.get("traceEvents", data) if isinstance(data, dict) else data
    ops = [e for e in events if isinstance(e, dict) and e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    if not ops:
        return None
    return max(float(e["ts"]) + float(e["dur"]) for e in ops) - min(float(e["ts"]) for e in ops)


def calibrate_engine(trace: str | Path, model: ModelSpec, base: EngineProfile, *, name: str,
                     batch: int, context: int, phase: str = "decode") -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine profile mapping ready to write as YAML, a report of what was found). `phase`
    "decode": `batch` sequences each attending `context` tokens; "prefill": `batch` prompts of
    `context` tokens each. A prefill trace gives the kernels of every op but decode attention
    (its prefill attention's instead) and no least kernel times: its kernels do real work."""
    if phase not in ("decode", "prefill"):
        raise NpusimError(f"--phase must be decode or prefill, got {phase!r}")
    records, files = load_kernels(trace)
    path = files[0]
    calls = _calls(records)
    prologue, layers, epilogue = _layers(calls, model.num_layers)
    attention = f"attention_{phase}"
    assigned = [_assign_layer(layer, model.qk_norm, attention) for layer in layers]
    what = f"decode batch {batch} context {context}" if phase == "decode" else \
        f"prefill of {batch} prompt(s) of {context} tokens"
    where = f"{path.name}, {what}, {model.name} ({model.num_layers} layers)"
    tokens = traced_tokens(assigned, model.hidden_size)
    expect = batch if phase == "decode" else batch * context
    if tokens is not None and tokens != expect:
        raise NpusimError(
            f"--batch {batch} disagrees with {path.name}: its QKV GEMMs multiply {tokens} tokens "
            + ("(a decode step of batch B multiplies B; was this step a prefill (--phase prefill), or another batch?)"
               if phase == "decode" else
               f"(a prefill of B prompts of L tokens multiplies B x L = {expect}; was it a decode step, or another length?)"))
    # The device's idle time between consecutive kernels: in a device-bound trace (a graph replay)
    # a fraction of a microsecond that every kernel pays; npusim's least kernel times include it,
    # as the microbenchmarks' back-to-back times do. A host-bound (eager) trace's gaps are the
    # host's dispatch, not the device's: they are left out.
    span = max(r.start_us + r.duration_us for r in records) - min(r.start_us for r in records)
    gap = (span - sum(r.duration_us for r in records)) / len(records)
    device_bound = gap < 5.0
    # overlapping kernels (a second stream, Hopper's programmatic dependent launch) leave no gap
    # to add, and a least time is never below the kernel's own duration
    add_gap = max(gap, 0.0) if device_bound else 0.0
    kernels: dict[str, dict] = {}
    floors: dict[str, dict] = {}
    other_attention = "attention_prefill" if phase == "decode" else "attention_decode"
    for op in LAYER_OPS:
        counts = [len(a[op]) for a in assigned]
        n = int(statistics.median(counts))
        if op == other_attention or (op == "qkv_bias" and not model.qkv_bias) or (op == "qk_norm" and not model.qk_norm):
            kernels[op] = dict(base_value=base.kernels[op])
            continue
        kernels[op] = {"value": n, "kind": "calibrated",
                       "source": f"{where}: median kernels per layer of the trace"}
        if phase == "prefill":  # (over a prompt's tokens its kernels' times are their work, not a least time)
            continue
        small = [k.duration_us for a in assigned for k in a[op]
                 if classify_kernel(k.name, k.op_type) in _SMALL]
        if small and op not in ("attention_decode",):
            gap_text = f" + the mean gap between kernels, {add_gap:.2f} us" if add_gap else ""
            floors[op] = {"value": round(statistics.median(small) + add_gap, 3), "kind": "calibrated",
                          "source": f"{where}: median duration of the op's {len(small)} small kernels{gap_text}"}
    step = {"embedding": [k for _, ks in prologue for k in ks], "final_norm": [], "lm_head": [], "sampling": []}
    seen_head = False
    for cat, ks in epilogue:
        if cat == "gemm" and not seen_head:
            step["lm_head"] += ks
            seen_head = True
        elif not seen_head:
            step["final_norm"] += ks
        else:
            step["sampling"] += ks
    if len(step["sampling"]) > MAX_SAMPLING_KERNELS:
        raise NpusimError(f"{path}: not one forward step: {len(step['sampling'])} kernels follow the LM head "
                          f"(a backward pass, or a second step?); trace one decode step")
    for op in STEP_OPS:
        kernels[op] = {"value": len(step[op]), "kind": "calibrated", "source": f"{where}: kernels of the step outside the layers"}
    mapping = {k: v for k, v in base.model_dump().items()
               if k not in ("provenance", "kernels", "kernel_floor_us", "scheduler_defaults")}
    mapping["scheduler_defaults"] = {
        k: {"value": v, "kind": base.provenance[f"scheduler_defaults.{k}"].kind,
            "source": base.provenance[f"scheduler_defaults.{k}"].source}
        for k, v in base.scheduler_defaults.items()}
    prov = base.provenance
    for f in ENGINE_NUMBER_FIELDS:
        if getattr(base, f) is None:  # (optional, not set)
            del mapping[f]
            continue
        mapping[f] = {"value": getattr(base, f), "kind": prov[f].kind, "source": prov[f].source}
    total = sum(len(ks) for _, ks in calls)
    # The host span of a profiled step is reported, not used: the profiler's own bookkeeping
    # slows the host several-fold, so it says little about dispatch outside the profiler.
    host = _host_span_us(path)
    mapping["name"] = name
    # (a base that was itself calibrated says so once: its old trace's words give way to this one's)
    described = base.description.split("; kernels calibrated from ")[0]
    mapping["description"] = f"{described}; kernels calibrated from {path.name}"
    mapping["kernels"] = {op: (v if "value" in v else {"value": v["base_value"], "kind": prov[f"kernels.{op}"].kind,
                                                         "source": prov[f"kernels.{op}"].source})
                          for op, v in kernels.items()}
    if phase == "prefill":  # the base's least kernel times stay
        floors = {op: {"value": v, "kind": base.provenance[f"kernel_floor_us.{op}"].kind,
                       "source": base.provenance[f"kernel_floor_us.{op}"].source}
                  for op, v in base.kernel_floor_us.items()}
    mapping["kernel_floor_us"] = floors
    report = {"file": str(path), "phase": phase, "kernels": total, "layers": model.num_layers,
              "mean_gap_us": gap, "device_bound": device_bound,
              "kernels_per_layer": sum(kernels[o]["value"] for o in LAYER_OPS
                                       if o != other_attention and (o != "qk_norm" or model.qk_norm)
                                       and (o != "qkv_bias" or model.qkv_bias)),
              "host_span_us": host,
              # (the trace's shapes confirm --batch where it records them; --context only labels
              # the profile's sources and the prediction: kernel counts and floors do not use it)
              "batch_checked": tokens is not None}
    return mapping, report


def traced_step_s(cm: Any, batch: int, context: int, phase: str = "decode") -> tuple[float, float]:
    """(device seconds, iteration seconds) of the traced step as `cm` prices it: `batch` decodes
    each attending `context` tokens plus the new one (pages of 16), or `batch` prompts of `context`."""
    if phase == "decode":
        device = cm.step_time(batch, batch * (context + 1), batch * ceil_div(context + 1, 16) * 16)
        host, held = cm.host_times(batch, device)
    else:
        device = cm.step_time(prefill_chunks=[(context, 0)] * batch, num_sampled=batch)
        host, held = cm.host_times(batch, device, has_decode=False, has_prefill=True, tokens=batch * context)
    return device, host + held


def fit_dispatch(cm: Any, batch: int, context: int, step_ms: list[float], where: str) -> tuple[float, dict]:
    """An eager engine's host dispatch per kernel from the measured wall time of the traced step.

    Eagerly, an iteration takes host + max(device + one launch, kernels x dispatch) (CostModel.
    host_times); a host-bound step's time over its kernels, less the host's other work, is the
    dispatch. A step whose device time is not well below its measured time says nothing about
    dispatch and is refused, with the numbers. `cm`: the cost model of the calibrated profile on
    the traced device; `step_ms`: the step timed without the profiler (which slows the host), one
    or more repeats; their median is used. Returns (dispatch us, details for the report)."""
    if not step_ms:
        raise NpusimError("--step-ms: give the traced step's measured time in ms")
    bad = [t for t in step_ms if not t > 0 or t != t or t == float("inf")]
    if bad:
        raise NpusimError(f"--step-ms must be positive and finite milliseconds, got {bad[0]}")
    if cm.engine.execution != "eager":
        raise NpusimError(f"--step-ms fits the dispatch of an eagerly launched engine; the base profile "
                          f"launches graphs (execution: {cm.engine.execution})")
    measured = statistics.median(step_ms)
    device_ms = traced_step_s(cm, batch, context)[0] * 1e3
    host_ms = (cm.host_overhead_s + cm.host_per_sequence_s * batch) * 1e3
    kernels = cm.kernels_per_iteration(True, False)
    us = (measured - host_ms) * 1e3 / kernels
    short = min(step_ms)
    if short < device_ms:
        raise NpusimError(f"--step-ms {short:g} ms is shorter than npusim's device time of that step on "
                          f"{cm.hw.name} ({device_ms:.3f} ms): not a time of the traced step")
    # host-bound needs kernels x dispatch > device + dispatch; ask for a clear margin (the
    # device time is a prediction)
    if (kernels - 1) * us < 1.5 * device_ms * 1e3:
        least = host_ms + 1.5 * device_ms * kernels / (kernels - 1)
        raise NpusimError(f"--step-ms {measured:g} ms: the step is not clearly host-bound on {cm.hw.name} "
                          f"(npusim's device time {device_ms:.3f} ms for {kernels} kernels; {least:.3f} ms or more "
                          f"would be): its time says little about dispatch; trace and time a smaller step "
                          f"(batch 1-8, short context)")
    spread = "" if len(step_ms) == 1 else f", {short:.4g}-{max(step_ms):.4g} ms"
    detail = {"step_ms": measured, "repeats": len(step_ms), "device_ms": device_ms, "host_ms": host_ms,
              "kernels": kernels, "dispatch_per_kernel_us": us,
              "source": (f"{where}: the step timed without the profiler, {measured:.6g} ms (median of "
                         f"{len(step_ms)}{spread}) on {cm.hw.name}, host-bound (npusim's device time "
                         f"{device_ms:.3f} ms): ({measured:.6g} - {host_ms:.3f} ms of other host work) / "
                         f"{kernels} kernels")}
    return us, detail


def write_engine_profile(mapping: dict, path: str | Path) -> Path:
    import yaml

    p = Path(path)
    text = ("# Written by npusim calibrate engine. Every number: value, kind, source.\n"
            + yaml.safe_dump(mapping, sort_keys=False, width=110))
    try:
        p.write_text(text)
    except OSError as e:
        raise NpusimError(f"cannot write {p}: {e.strerror}") from None
    return p
