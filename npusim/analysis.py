"""The analytical model behind the claim "throughput ∝ B · N_core / T_latency", derived, not fitted.

Every number comes from the roofline cost model (CostModel) and the vLLM-style memory plan
(memory_plan); nothing here is tuned to match a measurement. A point is steady-state decode: each
of K instances holds `batch` sequences of `context` tokens and generates one token per sequence per
iteration.

How the law is read. If T_latency were each point's own per-token latency, throughput would be
B / T per instance by definition and the N_core factor would count cores twice (cores act only
through T). So the proportional prediction here holds T at a reference point (one sequence, one
instance, the full set of cores) and scales it by B and N_core:

    proportional = reference_tokens_per_s × (B_total / 1) × (N_core / N_core_ref)

and ratio = actual / proportional shows where the law holds (≈ 1) and by how much it breaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from npusim.costmodel import CostModel, Op, instance_hardware, instance_setup
from npusim.errors import NpusimError
from npusim.specs import (KV_DTYPES, WEIGHT_DTYPES, EngineConfig, HardwareSpec, ModelSpec, ceil_div,
                          _validate, dtype_bytes, gib, load_hardware, load_model, resolve_engine)

SHARING_MODES = ("time-slice", "vnpu")
CORE_SCALINGS = ("device", "fixed-bandwidth", "partition")
KV_OPS = ("attention_decode", "kv_cache_write")


@dataclass(frozen=True)
class Reference:
    """Where the proportional law is normalised: one sequence, one instance, `cores` cores."""

    batch: int
    cores: int
    tokens_per_s: float | None  # None when even one sequence does not fit


@dataclass(frozen=True)
class AnalyticalPoint:
    """Steady-state decode of `instances` instances of `batch` sequences each."""

    hw: str
    model: str
    batch: int  # sequences per instance
    context: int
    instances: int
    sharing: str
    cores_per_instance: int
    bandwidth_gbs_per_instance: float  # nominal; the cost model applies memory_efficiency on top
    block_size: int
    weight_dtype: str
    kv_dtype: str
    include_host: bool
    engine: str  # the engine profile's name
    # memory, always reported: it explains an infeasible point
    weights_gib: float
    num_blocks: int  # KV blocks per instance
    blocks_per_seq: int
    max_batch: int  # sequences per instance the KV pool holds at this context
    feasible: bool
    reason: str  # "" when feasible
    ridge_point: float  # peak matmul flop/s over nominal bandwidth, flop/byte
    # metrics: None when the point is infeasible
    device_step_ms: float | None
    device_turn_ms: float | None  # how long the device is held: its kernels, or their launches if longer
    host_ms: float | None
    iteration_ms: float | None  # T: one iteration of one instance
    tpot_ms: float | None  # time between two tokens of one sequence
    tokens_per_s_per_instance: float | None
    tokens_per_s: float | None  # all instances together
    compute_ms: float | None  # op time spent compute-bound
    memory_ms: float | None  # op time spent bandwidth-bound
    kv_memory_ms: float | None  # the part of memory_ms reading/writing the KV cache
    overhead_ms: float | None  # kernel launch latencies plus host overhead
    comm_ms: float | None  # collectives over the tensor-parallel devices (0 on one device)
    bound: str | None  # compute | memory | latency: the largest of the three times above
    arithmetic_intensity: float | None  # flops / bytes of one iteration
    reference_batch: int
    reference_cores: int
    reference_tokens_per_s: float | None
    proportional_tokens_per_s: float | None
    ratio_to_proportional: float | None
    regime: str
    notes: tuple[str, ...] = ()
    tp: int = 1  # devices one instance spans (its numbers are per device: weights, blocks, memory)
    ep: int = 1
    pp: int = 1  # pipeline stages, each on tp devices; `batch` is split into pp micro-batches in flight
    stage_ms: tuple[float, ...] = ()  # pp > 1: each stage's device time for one micro-batch
    micro_batch: int | None = None
    bubble: float | None = None  # pp > 1: the share of the time a stage waits

    def as_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


# --------------------------------------------------------------------------- hardware variants

def scaled_hardware(hw: HardwareSpec, cores: int, scaling: str) -> HardwareSpec:
    """`hw` with `cores` AI cores. "partition": a vNPU slice, whose bandwidth and memory follow its
    cores. "fixed-bandwidth": compute cut to `cores` but the device's full bandwidth and memory kept,
    the counterfactual that isolates the N_core term of the law. "device": `hw` itself."""
    if scaling == "device":
        return hw
    if scaling == "partition":
        return hw.partition(cores, cores / hw.ai_cores)
    if scaling == "fixed-bandwidth":
        part = hw.partition(cores, 1.0)
        # the whole device's streaming kept: its fewer cores each pull as much more as it takes
        pull = max(part.per_core_bandwidth_gbs, hw.streaming_gbs / cores)
        return part.model_copy(update={
            "name": f"{hw.name}[{cores}c, {hw.memory_bandwidth_gbs:g} GB/s]",
            "memory_bandwidth_gbs": hw.memory_bandwidth_gbs, "per_core_bandwidth_gbs": pull,
        })
    raise NpusimError(f"core scaling must be one of {', '.join(CORE_SCALINGS)}, got {scaling!r}")


def instance_engine(*, batch: int, block_size: int, weight_dtype: str, kv_dtype: str,
                    utilization: float, profile: str | None = None, tp: int = 1, ep: int = 1,
                    pp: int = 1, cudagraph_mode: str | None = None,
                    max_cudagraph_capture_size: int | None = None) -> EngineConfig:
    """The engine an analytical point assumes: vLLM's defaults, with room for `batch` sequences."""
    return _validate(EngineConfig, dict(profile=profile, block_size=block_size, max_num_seqs=max(256, batch),
                                        max_num_batched_tokens=max(8192, batch),
                                        gpu_memory_utilization=utilization, weight_dtype=weight_dtype,
                                        kv_dtype=kv_dtype, tensor_parallel_size=tp, expert_parallel_size=ep,
                                        pipeline_parallel_size=pp, cudagraph_mode=cudagraph_mode,
                                        max_cudagraph_capture_size=max_cudagraph_capture_size),
                     "engine")


def decode_batch(*, batch: int, context: int, block_size: int) -> dict:
    """CostModel arguments of the steady decode step: every sequence holds context + 1 tokens
    and reads every slot of its pages."""
    return dict(num_decodes=batch, decode_context_tokens=batch * (context + 1),
                decode_kv_slots=batch * ceil_div(context + 1, block_size) * block_size)


# --------------------------------------------------------------------------- checks

def _check_inputs(hw: HardwareSpec, batch: int, context: int, instances: int, sharing: str,
                  weight_dtype: str, kv_dtype: str, gpu_memory_utilization: float) -> None:
    if sharing not in SHARING_MODES:
        raise NpusimError(f"sharing must be one of {', '.join(SHARING_MODES)}, got {sharing!r}")
    if instances < 1:
        raise NpusimError(f"instances must be >= 1, got {instances}")
    if sharing == "vnpu" and instances > hw.ai_cores:
        raise NpusimError(f"instances must be <= {hw.ai_cores} (the AI cores of {hw.name}) for vnpu "
                          f"sharing, got {instances}")
    if batch < 1:
        raise NpusimError(f"batch must be >= 1, got {batch}")
    if context < 1:
        raise NpusimError(f"context must be >= 1, got {context}")
    dtype_bytes(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
    dtype_bytes(kv_dtype, KV_DTYPES, "kv_dtype")
    if not 0 < gpu_memory_utilization <= 1:
        raise NpusimError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")


# --------------------------------------------------------------------------- pieces of a point

def _capacity(hw: HardwareSpec, model: ModelSpec, setup, *, batch: int, context: int, instances: int,
              block_size: int, utilization: float) -> dict:
    """Each instance holds its own weights, activations and runtime reserve in a 1/K share."""
    plan = setup.plan
    # the token being generated needs its slot too
    per_seq = ceil_div(context + 1, block_size)
    # Admission keeps the engine's watermark free (vLLM V0: 1 % of the blocks; V1: none).
    usable = setup.usable_blocks
    max_batch = usable // per_seq
    k = instances
    each = " per instance" if k > 1 else ""
    reason = ""
    if not plan.fits:
        w = gib(plan.weight_bytes)
        if k * plan.weight_bytes > hw.memory_bytes:
            who = f"{k} instances x " if k > 1 else ""
            total = f" = {k * w:.1f} GiB" if k > 1 else ""
            reason = f"{who}{w:.1f} GiB weights{total} > {hw.memory_gib:g} GiB device"
        else:
            need = plan.weight_bytes + plan.activation_bytes + plan.reserve_bytes
            share = f" of each instance's 1/{k} share" if k > 1 else ""
            reason = (f"weights {w:.1f} + activations {gib(plan.activation_bytes):.1f} + runtime reserve "
                      f"{gib(plan.reserve_bytes):.1f} = {gib(need):.1f} GiB > usable "
                      f"{gib(plan.usable_bytes):.1f} GiB{share} ({gib(plan.device_bytes):g} GiB x "
                      f"{utilization:g})")
    elif batch > max_batch:
        kept = plan.num_blocks - usable
        held = (f"; {kept} of {plan.num_blocks} kept free at admission ({setup.engine.watermark:.0%} "
                f"watermark)" if kept else "")
        reason = (f"batch {batch} at context {context} needs {batch * per_seq} blocks of {block_size} "
                  f"tokens, only {usable} fit{each} (max batch {max_batch}{held})")
    return dict(weights_gib=gib(plan.weight_bytes), num_blocks=plan.num_blocks if plan.fits else 0,
                blocks_per_seq=per_seq, max_batch=max_batch, feasible=not reason, reason=reason)


def _time_split(cm: CostModel, ops: list[Op]) -> tuple[float, float, float, float, float]:
    """Seconds of compute-bound work, bandwidth-bound work, of which KV-cache traffic, and kernel
    launch latency. An op's body is max(compute, memory); it is memory time when it equals
    bytes / bandwidth."""
    compute = memory = kv = latency = comm = 0.0
    for o in ops:
        if o.bound == "comm":  # a collective over the tensor-parallel devices: its own term
            comm += o.time_s
            continue
        lat = o.kernels * cm.latency
        body = o.time_s - lat
        latency += lat
        # by the op's own bound (its FLOPs against its bytes at the device's rates): a measured
        # kernel slower than the bandwidth roofline is still a memory-bound one
        if o.bound == "compute":
            compute += body
        else:
            memory += body
            if o.name in KV_OPS:
                kv += body
    return compute, memory, kv, latency, comm


def _regime(p: dict) -> str:
    """A few words on which term of the law a point follows."""
    k = p["instances"]
    if not p["feasible"]:
        if p["num_blocks"] == 0:
            return "capacity: the model does not fit"
        return f"capacity: max batch {p['max_batch']}"
    if p["bound"] == "comm":
        return "communication-bound: the collectives over the tensor-parallel devices dominate"
    if p["bound"] == "compute":
        text = "compute-bound: cores scale, B does not"
    elif p["bound"] == "memory":
        if p["kv_memory_ms"] > p["memory_ms"] / 2:
            text = "memory-bound on KV: only bandwidth scales"
        else:
            text = "memory-bound on weights: B scales, cores do not"
    else:
        text = "overhead-bound: host and kernel launches dominate"
    if k > 1 and p["sharing"] == "time-slice":
        text += f"; weights read {k}x per round"
    elif k > 1:
        text += f"; {k} vNPUs at {p['bandwidth_gbs_per_instance']:.0f} GB/s each"
    return text


def _evaluate(hw: HardwareSpec, model: ModelSpec, *, batch: int, context: int, instances: int,
              sharing: str, block_size: int, weight_dtype: str, kv_dtype: str,
              gpu_memory_utilization: float, include_host: bool, engine: str | None = None,
              tp: int = 1, ep: int = 1, pp: int = 1, **graph) -> dict:
    """Everything of a point except its comparison with the proportional law. `graph`: the vLLM
    server's cudagraph_mode and max_cudagraph_capture_size (instance_engine), where given."""
    if pp > 1 and instances > 1:
        raise NpusimError(f"--pp {pp} runs one instance over {pp} stages: --instances must be 1, got {instances}")
    if batch % pp:
        raise NpusimError(f"--batch {batch} does not split into {pp} equal micro-batches (one per stage in "
                          f"flight): use a multiple of --pp {pp}")
    setup = instance_setup(hw, model, instance_engine(
        batch=batch, block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
        utilization=gpu_memory_utilization, profile=engine, tp=tp, ep=ep, pp=pp, **graph), instances, sharing)
    inst, cm = setup.hw, setup.cost
    cap = _capacity(hw, model, setup, batch=batch, context=context, instances=instances,
                    block_size=block_size, utilization=gpu_memory_utilization)
    notes = []
    if context + 1 > model.max_position_embeddings:
        notes.append(f"context {context} is beyond {model.name}'s max_position_embeddings "
                     f"{model.max_position_embeddings}")
    idle = hw.ai_cores - inst.ai_cores * instances
    if sharing == "vnpu" and instances > 1 and idle:
        notes.append(f"{idle} of {hw.ai_cores} cores idle: {hw.ai_cores} is not a multiple of {instances}")
    p = dict(hw=hw.name, model=model.name, batch=batch, context=context, instances=instances,
             sharing=sharing, cores_per_instance=inst.ai_cores,
             bandwidth_gbs_per_instance=inst.memory_bandwidth_gbs, block_size=block_size,
             weight_dtype=weight_dtype, kv_dtype=kv_dtype, include_host=include_host,
             engine=setup.profile.name, **cap,
             ridge_point=inst.matmul_tflops(weight_dtype) * 1e12 / (inst.memory_bandwidth_gbs * 1e9),
             notes=tuple(notes))
    metrics = ("device_step_ms", "device_turn_ms", "host_ms", "iteration_ms", "tpot_ms", "tokens_per_s_per_instance",
               "tokens_per_s", "compute_ms", "memory_ms", "kv_memory_ms", "overhead_ms", "comm_ms", "bound",
               "arithmetic_intensity")
    if not cap["feasible"]:
        p.update(dict.fromkeys(metrics))
        return p
    if pp > 1:
        return _evaluate_pipeline(p, cm, batch, context, block_size, include_host, metrics)
    args = decode_batch(batch=batch, context=context, block_size=block_size)
    device_s = cm.step_time(**args)
    ops = cm.ops(**args)
    if include_host:
        # the engine's host work before the device has work, and how long the device is held
        # (its kernels, or their eager launches when those take longer)
        host_s, held_s = cm.host_times(batch, device_s)
    else:
        host_s, held_s = 0.0, device_s
    t = host_s + held_s
    # Time-sliced instances take turns on the whole device: one iteration of each per round. An
    # instance's host work runs on the CPU while another instance holds the device, as in the
    # simulator, so a round lasts K device turns unless one instance's host time is longer.
    per_token = max(instances * held_s, t) if sharing == "time-slice" else t
    host_s = t - device_s  # every millisecond of the iteration the device does not compute
    per_instance = batch / per_token
    compute, memory, kv, latency, comm = _time_split(cm, ops)
    overhead = latency + host_s
    times = {"compute": compute, "memory": memory, "latency": overhead, "comm": comm}
    p.update(device_step_ms=device_s * 1e3, device_turn_ms=held_s * 1e3, host_ms=host_s * 1e3,
             iteration_ms=t * 1e3,
             tpot_ms=per_token * 1e3, tokens_per_s_per_instance=per_instance,
             tokens_per_s=per_instance * instances, compute_ms=compute * 1e3, memory_ms=memory * 1e3,
             kv_memory_ms=kv * 1e3, overhead_ms=overhead * 1e3, comm_ms=comm * 1e3, bound=max(times, key=times.get),
             arithmetic_intensity=sum(o.flops for o in ops) / sum(o.bytes for o in ops))
    return p


def _evaluate_pipeline(p: dict, cm: CostModel, batch: int, context: int, block_size: int, include_host: bool,
                       metrics: tuple) -> dict:
    """Steady decode through pp stages (vLLM's virtual engines): `batch` split into pp micro-batches,
    each passing every stage in turn, one stage serving one micro-batch at a time. A micro-batch's
    next token starts when its last one is out and the first stage is free: a token every
    max(one pass, pp x the slowest stage)."""
    from npusim.costmodel import Batch

    pp = cm.pp
    micro = batch // pp
    args = decode_batch(batch=micro, context=context, block_size=block_size)
    host_s, stage_s, _, _ = cm.price_stages(Batch(**args))
    if not include_host:
        host_s = 0.0
    held_s = sum(stage_s)
    one = host_s + held_s
    per_token = max(one, pp * max(stage_s))
    ops = cm.ops(**args)
    compute, memory, kv, latency, comm = _time_split(cm, ops)
    idle = per_token - held_s  # what a micro-batch's period holds beyond its own device work
    times = {"compute": compute, "memory": memory, "latency": latency + idle, "comm": comm}
    p.update(device_step_ms=held_s * 1e3, device_turn_ms=held_s * 1e3, host_ms=host_s * 1e3,
             iteration_ms=one * 1e3, tpot_ms=per_token * 1e3, tokens_per_s_per_instance=batch / per_token,
             tokens_per_s=batch / per_token, compute_ms=compute * 1e3, memory_ms=memory * 1e3,
             kv_memory_ms=kv * 1e3, overhead_ms=(latency + idle) * 1e3, comm_ms=comm * 1e3,
             bound=max(times, key=times.get),
             arithmetic_intensity=sum(o.flops for o in ops) / sum(o.bytes for o in ops),
             stage_ms=tuple(t * 1e3 for t in stage_s), micro_batch=micro,
             bubble=1.0 - held_s / per_token)
    return p


# --------------------------------------------------------------------------- public API

def _settings(hw: HardwareSpec, block_size: int | None, engine: str | None) -> int:
    """The page size: the one given, if the engine's attention kernels take it, or the engine's."""
    _, cfg = resolve_engine(hw, _validate(EngineConfig, dict(profile=engine, block_size=block_size), "engine"))
    return cfg.block_size


def reference_point(hw: HardwareSpec | str, model: ModelSpec | str, *, context: int,
                    block_size: int | None = None, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                    gpu_memory_utilization: float = 0.9, include_host: bool = True,
                    engine: str | None = None, tp: int = 1, ep: int = 1, pp: int = 1, **graph) -> Reference:
    """One sequence of `context` tokens, one instance on all of `hw`'s cores (of `tp` devices);
    through pp stages, one sequence per stage (the least batch that fills the pipeline)."""
    hw, model = load_hardware(hw), load_model(model)
    p = _evaluate(hw, model, batch=pp, context=context, instances=1, sharing="time-slice",
                  block_size=_settings(hw, block_size, engine), weight_dtype=weight_dtype,
                  kv_dtype=kv_dtype, gpu_memory_utilization=gpu_memory_utilization,
                  include_host=include_host, engine=engine, tp=tp, ep=ep, pp=pp, **graph)
    return Reference(batch=pp, cores=hw.ai_cores, tokens_per_s=p["tokens_per_s"])


def analytical_point(hw: HardwareSpec | str, model: ModelSpec | str, *, batch: int, context: int,
                     instances: int = 1, sharing: str = "time-slice", block_size: int | None = None,
                     weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                     gpu_memory_utilization: float = 0.9, include_host: bool = True,
                     reference: Reference | None = None, engine: str | None = None,
                     tp: int = 1, ep: int = 1, pp: int = 1, **graph) -> AnalyticalPoint:
    """Decode throughput, latency, bound and memory feasibility of K instances of `batch` sequences
    of `context` tokens, compared with the law "throughput ∝ B · N_core / T" normalised at
    `reference` (default: one sequence on this same hardware)."""
    hw, model = load_hardware(hw), load_model(model)
    _check_inputs(hw, batch, context, instances, sharing, weight_dtype, kv_dtype, gpu_memory_utilization)
    bs = _settings(hw, block_size, engine)
    p = _evaluate(hw, model, batch=batch, context=context, instances=instances, sharing=sharing,
                  block_size=bs, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                  gpu_memory_utilization=gpu_memory_utilization, include_host=include_host,
                  engine=engine, tp=tp, ep=ep, pp=pp, **graph)
    if reference is None:
        reference = reference_point(hw, model, context=context, block_size=bs, weight_dtype=weight_dtype,
                                    kv_dtype=kv_dtype, gpu_memory_utilization=gpu_memory_utilization,
                                    include_host=include_host, engine=engine, tp=tp, ep=ep, pp=pp, **graph)
    prop = ratio = None
    if p["feasible"] and reference.tokens_per_s:
        # time-sliced instances share the same cores; vNPUs add theirs up
        cores = p["cores_per_instance"] * (instances if sharing == "vnpu" else 1)
        prop = (reference.tokens_per_s * (batch * instances / reference.batch)
                * (cores / reference.cores))
        ratio = p["tokens_per_s"] / prop
    p.update(reference_batch=reference.batch, reference_cores=reference.cores,
             reference_tokens_per_s=reference.tokens_per_s, proportional_tokens_per_s=prop,
             ratio_to_proportional=ratio)
    p["regime"] = _regime(p)
    return AnalyticalPoint(**p, tp=tp, ep=ep, pp=pp)


def proportionality_table(hw: HardwareSpec | str, model: ModelSpec | str, *, batches: Sequence[int],
                          contexts: Sequence[int], cores_list: Sequence[int], instances: int = 2,
                          sharing_modes: Sequence[str] = SHARING_MODES, block_size: int | None = None,
                          weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                          gpu_memory_utilization: float = 0.9, include_host: bool = True,
                          engine: str | None = None, **graph) -> list[dict]:
    """A grid of points, each with its `regime` and `core_scaling`, that shows where throughput
    ∝ B · N_core / T holds and where it breaks. Per context:

    - "device": every batch on the whole device (the B term);
    - "fixed-bandwidth": every batch on fewer cores at the device's bandwidth (the N_core term alone);
    - "partition": every batch on vNPU-style slices, whose bandwidth follows their cores, normalised
      at the largest slice;
    - `instances` instances of each batch per sharing mode, next to one instance of instances × B
      (weights read once per instance).
    """
    hw, model = load_hardware(hw), load_model(model)
    for c in cores_list:
        if not 0 < c <= hw.ai_cores:
            raise NpusimError(f"cores must be in 1..{hw.ai_cores} for {hw.name}, got {c}")
    batches = sorted(set(batches))
    cores_list = sorted(set(cores_list))
    contexts = list(dict.fromkeys(contexts))  # the caller's order: the explanation uses the first
    kw = dict(block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
              gpu_memory_utilization=gpu_memory_utilization, include_host=include_host, engine=engine,
              **graph)
    rows: list[dict] = []

    def add(h: HardwareSpec, scaling: str, ref: Reference, batch: int, context: int, k: int = 1,
            sharing: str = "time-slice") -> None:
        p = analytical_point(h, model, batch=batch, context=context, instances=k, sharing=sharing,
                             reference=ref, **kw)
        rows.append({**p.as_dict(), "core_scaling": scaling})

    for context in contexts:
        device_ref = reference_point(hw, model, context=context, **kw)
        for b in batches:
            add(hw, "device", device_ref, b, context)
        for c in cores_list:
            if c < hw.ai_cores:
                for b in batches:
                    add(scaled_hardware(hw, c, "fixed-bandwidth"), "fixed-bandwidth", device_ref, b, context)
        largest = scaled_hardware(hw, cores_list[-1], "partition")
        part_ref = reference_point(largest, model, context=context, **kw)
        for c in cores_list:
            for b in batches:
                add(scaled_hardware(hw, c, "partition"), "partition", part_ref, b, context)
        if instances > 1:
            for b in batches:
                for sharing in sharing_modes:
                    add(hw, "device", device_ref, b, context, instances, sharing)
                if instances * b not in batches:
                    add(hw, "device", device_ref, instances * b, context)
    return rows


# --------------------------------------------------------------------------- explanation

def _pick(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _largest_pair(rows: list[dict], scaling: str, context: int, batches: list[int],
                  full: dict[int, dict]) -> tuple[dict, dict] | None:
    """At the largest batch where both fit: the fewest-core row of `scaling` and, for
    fixed-bandwidth, the whole-device row, or for partitions, the largest slice."""
    for b in sorted(batches, reverse=True):
        found = sorted((r for r in _pick(rows, core_scaling=scaling, batch=b, context=context,
                                         instances=1) if r["feasible"]),
                       key=lambda r: r["cores_per_instance"])
        top = full.get(b) if scaling == "fixed-bandwidth" else (found[-1] if len(found) > 1 else None)
        if found and top is not None and top["feasible"]:
            return found[0], top
    return None


def _why_batch(row: dict) -> str:
    regime, b = row["regime"], row["batch"]
    if regime.startswith("memory-bound on weights"):
        return "the step stays memory-bound on weights, which are read once per step whatever B is"
    if regime.startswith("memory-bound on KV"):
        return f"at B={b} the KV-cache reads, which grow with B, outweigh the weights, which do not"
    if regime.startswith("compute-bound"):
        return f"the step is compute-bound at B={b}, where each sequence adds its own flops"
    return "fixed host and kernel-launch time is shared by more sequences"


_WHY_CORES = {"compute": "the step is compute-bound, the one regime where the N_core term holds",
              "memory": "bandwidth, not cores, limits decode",
              "latency": "fixed host and kernel-launch time, not cores, limits decode"}


def explain_proportionality(rows: list[dict]) -> list[str]:
    """3-6 plain sentences, with numbers taken from `proportionality_table` rows (its first context)."""
    if not rows:
        return []
    out: list[str] = []
    context, hw_name, model_name = rows[0]["context"], rows[0]["hw"], rows[0]["model"]
    # the grid's own batches: single-instance twins added for the instance comparison are left out
    grid = sorted({r["batch"] for r in _pick(rows, core_scaling="partition", context=context)})
    single = {r["batch"]: r for r in _pick(rows, core_scaling="device", instances=1, context=context)}
    fits = [single[b] for b in grid if b in single and single[b]["feasible"]]

    if len(fits) >= 2:
        lo, hi = fits[0], fits[-1]
        gain = hi["tokens_per_s"] / lo["tokens_per_s"]
        out.append(f"{model_name} on {hw_name}, context {context}: going from B={lo['batch']} to "
                   f"B={hi['batch']} multiplies throughput by {gain:.1f}x (ideal "
                   f"{hi['batch'] / lo['batch']:g}x) because {_why_batch(hi)}.")

    pair = _largest_pair(rows, "fixed-bandwidth", context, grid, single)
    if pair:
        few, full = pair
        gain = full["tokens_per_s"] / few["tokens_per_s"]
        ideal = full["cores_per_instance"] / few["cores_per_instance"]
        out.append(f"At B={full['batch']}, going from {few['cores_per_instance']} to "
                   f"{full['cores_per_instance']} cores at a fixed {full['bandwidth_gbs_per_instance']:g} "
                   f"GB/s multiplies throughput by {gain:.2f}x (ideal {ideal:g}x): "
                   f"{_WHY_CORES[full['bound']]}.")

    pair = _largest_pair(rows, "partition", context, grid, single)
    if pair:
        few, many = pair
        gain = many["tokens_per_s"] / few["tokens_per_s"]
        why = ("the step is compute-bound, so the cores themselves set the pace"
               if many["bound"] == "compute" else
               "the N_core term holds there only because each core brings its own share of bandwidth")
        out.append(f"As vNPU-style partitions, whose bandwidth follows their cores "
                   f"({few['bandwidth_gbs_per_instance']:.0f} to {many['bandwidth_gbs_per_instance']:.0f} "
                   f"GB/s), B={many['batch']} scales {gain:.2f}x from {few['cores_per_instance']} to "
                   f"{many['cores_per_instance']} cores: {why}.")

    out.extend(_explain_instances(rows, context))

    capped = [single[b] for b in grid if b in single and not single[b]["feasible"]]
    if capped:
        r = capped[0]
        if r["num_blocks"] and r["max_batch"] == 0:
            out.append(f"Memory rules out even one sequence of {context} tokens: {r['reason']}.")
        elif r["num_blocks"]:
            seqs = "sequence" if r["max_batch"] == 1 else "sequences"
            out.append(f"Memory caps B: at context {context} one instance holds at most {r['max_batch']} "
                       f"{seqs} ({r['num_blocks']} blocks of {r['block_size']} tokens), so "
                       f"{r['reason']}.")
        else:
            out.append(f"Memory rules out even one instance: {r['reason']}.")

    ref = rows[0]["reference_tokens_per_s"]
    if ref:
        out.append(f"Read with T as each point's own latency the law counts cores twice (throughput is "
                   f"B/T by definition and cores act only through T), so the proportional column holds T "
                   f"at one sequence's {1e3 / ref:.1f} ms per token and scales it by B and N_core.")
    return out[:6]


def _explain_instances(rows: list[dict], context: int) -> list[str]:
    multi = [r for r in _pick(rows, core_scaling="device", context=context) if r["instances"] > 1]
    multi.sort(key=lambda r: r["sharing"] != "time-slice")  # time slicing first: the common case
    if not multi:
        return []
    if not any(r["feasible"] for r in multi):
        r = multi[0]
        return [f"{r['instances']} instances do not fit at all: {r['reason']}."]
    # the largest batch whose single-instance twin (K x B sequences) also fits
    for r in sorted((r for r in multi if r["feasible"]), key=lambda r: -r["batch"]):
        k = r["instances"]
        twin = _pick(rows, core_scaling="device", context=context, instances=1, batch=k * r["batch"])
        if not (twin and twin[0]["feasible"]):
            continue
        one = twin[0]
        loss = 1 - r["tokens_per_s"] / one["tokens_per_s"]
        if r["sharing"] == "time-slice":
            mode = "time-sliced"
            why = f"each instance reads its own weights every iteration, so a round reads them {k} times"
        else:
            mode = (f"vNPU ({r['cores_per_instance']} cores, {r['bandwidth_gbs_per_instance']:.0f} GB/s "
                    f"each)")
            why = "each slice reads its own weights with only its cores' share of bandwidth"
        return [f"{k} {mode} instances with B={r['batch']} each deliver {r['tokens_per_s']:,.0f} "
                f"tokens/s in total, {loss:.0%} less than one instance with B={k * r['batch']} "
                f"({one['tokens_per_s']:,.0f} tokens/s): {why}."]
    return []


__all__ = ["AnalyticalPoint", "Reference", "analytical_point", "reference_point", "proportionality_table",
           "explain_proportionality", "instance_hardware", "scaled_hardware", "SHARING_MODES"]


def unloaded_ttft(hw: HardwareSpec | str, model: ModelSpec | str, *, prompt: int, instances: int = 1,
                  sharing: str = "time-slice", block_size: int | None = None, weight_dtype: str = "bf16",
                  kv_dtype: str = "bf16", gpu_memory_utilization: float = 0.9,
                  engine: str | None = None, tp: int = 1, ep: int = 1) -> dict:
    """Time to first token of one `prompt`-token request alone on an idle instance: its prefill in
    chunks of the engine's max_num_batched_tokens (one chunk without chunked prefill), each chunk
    one iteration (host, then the device) that computes its last row's logits (vLLM V1 samples a
    partial prefill too and discards the token), the last one giving the first token. Under load,
    queueing and other requests' tokens in the same iterations add to it (the simulator has them)."""
    hw, model = load_hardware(hw), load_model(model)
    cfg = _validate(EngineConfig, dict(profile=engine, block_size=block_size, weight_dtype=weight_dtype,
                                       kv_dtype=kv_dtype, gpu_memory_utilization=gpu_memory_utilization,
                                       tensor_parallel_size=tp, expert_parallel_size=ep), "engine")
    setup = instance_setup(hw, model, cfg, instances, sharing)
    if not setup.plan.fits:
        raise NpusimError(f"{model.name} on {hw.name} {setup.plan.verdict}")
    eng = setup.engine
    chunk = eng.max_num_batched_tokens if eng.enable_chunked_prefill else prompt
    total, done, iterations = 0.0, 0, 0
    while done < prompt:
        n = min(chunk, prompt - done)
        device = setup.cost.step_time(prefill_chunks=[(n, done)], num_sampled=1)
        host, held = setup.cost.host_times(1, device, has_decode=False, has_prefill=True, tokens=n)
        total += host + held
        done += n
        iterations += 1
    return {"ttft_ms": total * 1e3, "iterations": iterations, "chunk_tokens": chunk}
