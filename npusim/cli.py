"""The `npusim` command line. Every user error ends as one line on stderr and exit status 2."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import List, Optional

import typer

from npusim.costmodel import CostModel
from npusim.errors import NpusimError

from npusim.specs import (CUDAGRAPH_MODES, KV_DTYPES, MODEL_ZOO, WEIGHT_DTYPES, EngineConfig, ceil_div, gib, known_engines, known_hardware,
                          load_engine_profile, load_hardware, load_model)

# Plain click help (rich_markup_mode=None): it wraps long option names at any width instead of
# cutting them, and shows a flag as a flag, not as `<bool>`.
HELP = dict(no_args_is_help=True, rich_markup_mode=None)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, **HELP,
                  help="npusim: paged KV-cache memory and throughput of LLM serving on NPUs and GPUs.")
hw_app = typer.Typer(**HELP, help="Hardware profiles.")
model_app = typer.Typer(**HELP, help="Models.")
app.add_typer(hw_app, name="hw")
calibrate_app = typer.Typer(**HELP, help="Calibrate a hardware profile: measure this machine, or import Ascend profiler output.")
app.add_typer(calibrate_app, name="calibrate")
app.add_typer(model_app, name="model")
engine_app = typer.Typer(**HELP, help="Engine profiles: how an implementation turns a layer into kernels, and its host.")
app.add_typer(engine_app, name="engine")

# wide enough that model and profile names are never cut when output is piped
class _LazyConsole:
    """rich is imported by the commands that draw tables, not by every command (`simulate --json`
    starts faster without it)."""

    _console = None

    def __getattr__(self, name):
        if _LazyConsole._console is None:
            from rich.console import Console
            _LazyConsole._console = Console(width=max(140, Console().width))
        return getattr(_LazyConsole._console, name)


console = _LazyConsole()


def Table(*args, **kwargs):  # noqa: N802 - stands in for rich.table.Table
    from rich.table import Table as RichTable
    return RichTable(*args, **kwargs)

HW_OPT = typer.Option(..., "--hw", help="hardware profile name (see `npusim hw list`) or path to a .yaml")
MODEL_OPT = typer.Option(..., "--model", help="model name (see `npusim model list`) or path to a config.json")
ENGINE_HELP = "engine profile name (see `npusim engine list`) or path to a .yaml (default: the device's)"


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


CUDAGRAPH_HELP = ("vLLM engines: which steps replay captured graphs, as vLLM's cudagraph_mode: "
                  "full_and_piecewise | full_decode_only | full | piecewise | none (default: the engine's)")
CAPTURE_HELP = ("vLLM engines: the largest step captured, in tokens (default as vLLM: min(max_num_seqs x 2, 512); "
                "vllm-ascend: x 1; step: max_num_seqs at least its batch)")


def _choice(flag: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is not None and value not in allowed:  # (the wording of simulate's choices)
        raise NpusimError(f"{flag} must be {' or '.join(allowed)}, got {value!r}")
    return value


def _engine(**kw) -> EngineConfig:
    from npusim.specs import _validate
    return _validate(EngineConfig, {k: v for k, v in kw.items() if v is not None}, "engine")


# --------------------------------------------------------------------------- step

@app.command()
def step(
    hw: str = HW_OPT,
    model: str = MODEL_OPT,
    phase: str = typer.Option("decode", "--phase", help="decode | prefill"),
    batch: int = typer.Option(1, "--batch", min=1, help="sequences in the iteration"),
    context: Optional[int] = typer.Option(None, "--context", min=1, help="decode: tokens of context per sequence (default 1024)"),
    prompt: Optional[int] = typer.Option(None, "--prompt", min=1, help="prefill: prompt tokens per sequence (default 1024)"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="KV page size in tokens (default: the engine's recommended)"),
    weight_dtype: str = typer.Option("bf16", "--weight-dtype", help="bf16 | fp16 | fp8 | int8 | int4 | w8a8 (int8, int4: weight-only; w8a8: int8 weights and activations on the int8 matrix units, Ascend's W8A8; fp8: on FP8 tensor cores where the device has them, else weight-only)"),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="bf16 | fp16 | fp8 | int8"),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP),
    tp: int = typer.Option(1, "--tp", min=1, help="tensor parallel: devices one instance spans (within a node, or whole nodes)"),
    ep: int = typer.Option(1, "--ep", min=1, help="expert parallel (MoE): whole experts over the --tp devices (1 or the --tp size), or over N/tp data-parallel ranks of --tp devices each (one rank priced, the others loaded alike)"),
    expert_imbalance: Optional[float] = typer.Option(None, "--expert-imbalance", min=1.0, help="MoE with --ep: the busiest expert-parallel device's routed tokens over the mean, as measured (default: uniform routing)"),
    pp: int = typer.Option(1, "--pp", min=1, help="pipeline parallel: stages, each on --tp devices of its own"),
    cudagraph_mode: Optional[str] = typer.Option(None, "--cudagraph-mode", help=CUDAGRAPH_HELP),
    max_cudagraph_capture_size: Optional[int] = typer.Option(None, "--max-cudagraph-capture-size", min=1, help=CAPTURE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """One forward iteration: per-op FLOPs, bytes, kernels, time and bound; device, host and iteration time."""
    if phase not in ("decode", "prefill"):
        raise NpusimError(f"--phase must be decode or prefill, got {phase!r}")
    if phase == "decode" and prompt is not None:
        raise NpusimError("--prompt would be ignored: it sizes a prefill (--phase prefill); a decode takes --context")
    if phase == "prefill" and context is not None:
        raise NpusimError("--context would be ignored: it sizes a decode; a prefill (--phase prefill) takes --prompt")
    context, prompt = context or 1024, prompt or 1024
    h = load_hardware(hw)
    m = load_model(model)
    longest = context + 1 if phase == "decode" else prompt
    if longest > m.max_position_embeddings:
        flag = "--context" if phase == "decode" else "--prompt"
        raise NpusimError(f"{flag} {longest - (phase == 'decode')} exceeds {m.name}'s context of "
                          f"{m.max_position_embeddings} tokens (max_position_embeddings)")
    from npusim.costmodel import instance_setup

    from npusim.specs import resolve_engine

    cfg = _engine(profile=engine, block_size=block_size,
                  weight_dtype=_choice("--weight-dtype", weight_dtype, WEIGHT_DTYPES),
                  kv_dtype=_choice("--kv-dtype", kv_dtype, KV_DTYPES), tensor_parallel_size=tp, expert_parallel_size=ep,
                  pipeline_parallel_size=pp, expert_imbalance=expert_imbalance,
                  cudagraph_mode=_choice("--cudagraph-mode", cudagraph_mode, CUDAGRAPH_MODES),
                  max_cudagraph_capture_size=max_cudagraph_capture_size)
    resolved = resolve_engine(h, cfg)[1]
    if resolved.max_num_seqs < batch:  # a server running this batch takes at least this many sequences
        cfg = cfg.model_copy(update={"max_num_seqs": batch,
                                     "max_num_batched_tokens": max(batch, resolved.max_num_batched_tokens)})
    setup = instance_setup(h, m, cfg)
    profile, eng, cm, plan = setup.profile, setup.engine, setup.cost, setup.plan
    bs = eng.block_size
    if phase == "decode":
        slots_per_seq = ceil_div(context, bs) * bs
        args = dict(num_decodes=batch, decode_context_tokens=batch * context,
                    decode_kv_slots=batch * slots_per_seq)
        kv_tokens = batch * context
    else:
        args = dict(prefill_chunks=[(prompt, 0)] * batch)
        kv_tokens = batch * prompt
    ops = cm.ops(**args)
    step_s = sum(o.time_s for o in ops)
    kernels = sum(o.kernels for o in ops)
    host_s, held_s = cm.host_times(batch, step_s, phase == "decode", phase == "prefill",
                                   batch if phase == "decode" else batch * prompt)
    pipeline = None
    if pp > 1:  # the batch passes the stages in turn; pp such batches in flight keep every stage busy
        from npusim.costmodel import Batch
        host_s, stage_s, _, _ = cm.price_stages(Batch(**args))
        held_s = sum(stage_s)
        one = host_s + held_s
        per_tokens = batch if phase == "decode" else batch * prompt
        pipeline = {"stages": pp, "stage_layers": [a + b for a, b in cm.stages], "stage_ms": [t * 1e3 for t in stage_s],
                    "tokens_per_s_one_batch": per_tokens / one,
                    # pp batches, each passing every stage in `one`, but one stage runs one at a time
                    "tokens_per_s_pipelined": min(pp * per_tokens / one, per_tokens / max(stage_s)),
                    "bubble_one_batch": 1.0 - held_s / (pp * one),
                    # stage i on devices i*tp..: the hand-overs that leave a node use the link between nodes
                    "nodes": ceil_div(tp * pp, h.node_devices), "sends_between_nodes": sum(cm.cross_node)}
    iteration_s = host_s + held_s
    comm_s = sum(o.time_s for o in ops if o.bound == "comm")
    need_blocks = batch * ceil_div(context if phase == "decode" else prompt, bs)
    mem = plan.as_dict()
    mem["blocks_needed"] = need_blocks
    mem["batch_fits"] = plan.fits and need_blocks <= plan.num_blocks
    if not plan.fits:
        raise NpusimError(f"{m.name} on {h.name} {plan.verdict}")
    if need_blocks > plan.num_blocks:
        raise NpusimError(f"this {phase} batch needs {need_blocks} KV blocks of {bs} tokens ({kv_tokens} tokens) "
                          f"but {plan.num_blocks} fit: lower --batch or --{'context' if phase == 'decode' else 'prompt'}")
    tokens = batch if phase == "decode" else batch * prompt
    launch = cm.launch_mode(tokens, phase == "prefill")  # (a graph engine may run this step eagerly)
    # host time refreshing a replayed graph's attention tasks (it overlaps the replay)
    update_s = cm.graph_update_s if launch == "graph" else 0.0
    if as_json:
        _print_json({
            "hw": h.name, "model": m.name, "phase": phase, "batch": batch,
            "context": context if phase == "decode" else None,
            "prompt": prompt if phase == "prefill" else None, "block_size": bs,
            "weight_dtype": weight_dtype, "kv_dtype": kv_dtype, "engine": profile.name,
            "execution": profile.execution, "launch": launch,
            "step_ms": step_s * 1e3, "device_ms": step_s * 1e3,
            "host_ms": (iteration_s - step_s) * 1e3, "iteration_ms": iteration_s * 1e3,
            "kernels": kernels, "tokens_per_s": tokens / iteration_s, "graph_update_ms": update_s * 1e3,
            "ops": [{"name": o.name, "flops": o.flops, "bytes": o.bytes, "time_ms": o.time_s * 1e3,
                     "bound": o.bound, "kernels": o.kernels} for o in ops],
            # per device: every device of a tensor-parallel instance holds and runs the same share
            "memory": mem, "tp": tp, "ep": ep, "pp": pp, "devices": tp * pp, "comm_ms": comm_s * 1e3,
            "comm_share": comm_s / step_s, "pipeline": pipeline,
        })
        return
    what = f"decode, batch {batch}, context {context}" if phase == "decode" else f"prefill, batch {batch}, prompt {prompt}"
    t = Table(title=f"{m.name} on {h.name} with {profile.name} ({profile.execution}{'' if launch == profile.execution else f'; this step {launch}'}): {what}, block {bs}, "
                    f"weights {weight_dtype}, KV {kv_dtype}")
    for col in ("op", "kernels", "GFLOP", "MB", "time ms", "share", "bound"):
        t.add_column(col, justify="left" if col in ("op", "bound") else "right")
    for o in ops:
        t.add_row(o.name, str(o.kernels), f"{o.flops / 1e9:,.2f}", f"{o.bytes / 1e6:,.1f}",
                  f"{o.time_s * 1e3:.3f}", f"{o.time_s / step_s:.1%}", o.bound)
    console.print(t)
    console.print(f"device: [bold]{step_s * 1e3:.3f} ms[/] in {kernels} kernels   host: "
                  f"{(iteration_s - step_s) * 1e3:.3f} ms   iteration: {iteration_s * 1e3:.3f} ms   "
                  f"throughput: {tokens / iteration_s:,.1f} tokens/s")
    if update_s:
        bound = "host-bound: the device waits for it" if update_s > step_s else "hidden behind the replay"
        console.print(f"graph refresh: {update_s * 1e3:.3f} ms on the host ({m.num_layers} attention layers x "
                      f"{profile.graph_update_per_layer_us:g} us), overlapping the replay: {bound}")
    if ep > 1:
        ranks = f"{ep // tp} data-parallel ranks of {tp} device(s), each with a batch like this one, in lock step; " \
            if ep > tp else ""
        nodes = (f" of {ep // h.node_devices} nodes ({h.internode_link_gbs:g} GB/s a device between them)"
                 if ep > h.node_devices else "")
        console.print(f"experts over {ep} devices{nodes}: {ranks}{m.num_experts // ep} whole experts a device")
    if tp > 1 or ep > tp:
        what = "all-reduces" if ep <= tp else ("all-reduces and all-to-alls" if tp > 1 else "all-to-alls")
        if tp > h.node_devices:
            where = f"of {tp // h.node_devices} {h.name} nodes ({h.internode_link_gbs:g} GB/s a device between them; "
        elif ep > h.node_devices:  # (each rank's group within a node, the all-to-alls between nodes)
            where = (f"within a {h.name} node, all-to-alls over {ep // h.node_devices} nodes "
                     f"({h.internode_link_gbs:g} GB/s a device between them; ")
        else:
            where = f"of a {h.name} node ("
        console.print(f"{'tensor parallel over ' + str(tp) + ' devices' if tp > 1 else 'one rank'} {where}"
                      f"{h.link_topology}, {h.link_gbs:g} GB/s one way within): {what} {comm_s * 1e3:.3f} ms "
                      f"({comm_s / step_s:.1%} of the device time); memory per device:")
    if pipeline is not None:
        stages = ", ".join(f"{n} layers {t:.3f} ms" for n, t in zip(pipeline["stage_layers"], pipeline["stage_ms"]))
        over = (f" over {pipeline['nodes']} nodes ({pipeline['sends_between_nodes']} hand-over(s) between nodes, "
                f"{h.internode_link_gbs:g} GB/s, {h.internode_latency_us:g} us)") if pipeline["nodes"] > 1 else ""
        console.print(f"pipeline of {pp} stages{over} ({stages}): one batch passes them in {iteration_s * 1e3:.3f} ms "
                      f"({pipeline['tokens_per_s_one_batch']:,.1f} tokens/s, each stage idle "
                      f"{pipeline['bubble_one_batch']:.0%} of the time); {pp} such batches in flight: "
                      f"{pipeline['tokens_per_s_pipelined']:,.1f} tokens/s")
    console.print(f"memory: {plan.verdict}")


# --------------------------------------------------------------------------- simulate

@app.command()
def simulate(
    scenario: Optional[str] = typer.Argument(None, help="scenario YAML; flags override it"),
    hw: Optional[str] = typer.Option(None, "--hw", help="hardware profile name or path"),
    model: Optional[str] = typer.Option(None, "--model", help="model name or config.json path"),
    requests: Optional[int] = typer.Option(None, "--requests", min=1, help="number of requests (with --trace: the first N rows)"),
    input_len: Optional[int] = typer.Option(None, "--input-len", min=1, help="fixed prompt length"),
    output_len: Optional[int] = typer.Option(None, "--output-len", min=1, help="fixed output length"),
    rate: Optional[str] = typer.Option(None, "--rate", help="requests/s (Poisson), or inf: all at t=0"),
    burstiness: Optional[float] = typer.Option(None, "--burstiness", min=0.001, help="CV of inter-arrival gaps (gamma); 1 = Poisson"),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", min=1, help="at most C requests in flight (closed loop)"),
    trace: Optional[str] = typer.Option(None, "--trace", help="CSV with arrived_at,num_prefill_tokens,num_decode_tokens (or start_time,input_len,output_len)"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="KV page size in tokens"),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", min=1),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", min=1),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization"),
    num_blocks: Optional[int] = typer.Option(None, "--num-blocks", min=1, help="measured KV block count; overrides the formula"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1, help="what the contiguous baseline reserves per request"),
    instances: Optional[int] = typer.Option(None, "--instances", min=1, help="model instances on the device"),
    sharing: Optional[str] = typer.Option(None, "--sharing", help="time-slice | vnpu"),
    no_paging: bool = typer.Option(False, "--no-paging", help="contiguous KV reservation (static batching unless --batching continuous)"),
    contiguous_policy: Optional[str] = typer.Option(None, "--contiguous-policy", help="max | oracle (with --no-paging)"),
    batching: Optional[str] = typer.Option(None, "--batching", help="auto | continuous | static (auto: static without paging)"),
    no_chunked_prefill: bool = typer.Option(False, "--no-chunked-prefill"),
    preemption: Optional[str] = typer.Option(None, "--preemption", help="recompute | swap"),
    cudagraph_mode: Optional[str] = typer.Option(None, "--cudagraph-mode", help=CUDAGRAPH_HELP),
    max_cudagraph_capture_size: Optional[int] = typer.Option(None, "--max-cudagraph-capture-size", min=1, help=CAPTURE_HELP),
    prefix_caching: Optional[bool] = typer.Option(None, "--prefix-caching/--no-prefix-caching", help="default: the engine's (vLLM V1: on)"),
    shared_prefix_len: Optional[int] = typer.Option(None, "--shared-prefix-len", min=0, help="tokens of a system prompt all requests share"),
    weight_dtype: Optional[str] = typer.Option(None, "--weight-dtype"),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype"),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP),
    tp: Optional[int] = typer.Option(None, "--tp", min=1, help="tensor parallel: devices the instance spans (within a node, or whole nodes)"),
    ep: Optional[int] = typer.Option(None, "--ep", min=1, help="expert parallel (MoE): whole experts over the --tp devices, or over the --dp ranks of --tp devices each (--ep = tp x dp)"),
    pp: Optional[int] = typer.Option(None, "--pp", min=1, help="pipeline parallel: stages, each on --tp devices of its own"),
    expert_imbalance: Optional[float] = typer.Option(None, "--expert-imbalance", min=1.0, help="MoE with --ep: the busiest expert-parallel device's routed tokens over the mean, as measured (default: uniform routing)"),
    dp: Optional[int] = typer.Option(None, "--dp", min=1, help="data parallel: replicas of the instance, each on its own device(s)"),
    router: Optional[str] = typer.Option(None, "--router", help="round-robin | least-outstanding | prefix-aware (a shared prefix's requests to one replica): how requests reach replicas"),
    goodput: Optional[List[str]] = typer.Option(None, "--goodput", help="SLOs for request_goodput, as vllm bench serve: ttft:MS tpot:MS e2el:MS (repeat the flag, or one quoted list)"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0),
    as_json: bool = typer.Option(False, "--json", help="print JSON (keys as vllm bench serve --save-result)"),
    report: Optional[str] = typer.Option(None, "--report", help="write a self-contained HTML report"),
) -> None:
    """Simulate serving: requests arrive, are batched, take KV pages and finish. No arguments: the default scenario."""
    from npusim.settings import GOODPUT_KEYS, SIMULATE_FIELDS, build_scenario

    given = locals()
    flags = {key: given[key] for key in SIMULATE_FIELDS}  # every parameter but the file and outputs
    if report is not None and not report.strip():
        raise NpusimError("--report is empty: give the HTML file to write")
    import time

    from npusim.scenario import simulate_scenario, summarize

    if scenario and scenario.split(":", 1)[0] in GOODPUT_KEYS:
        raise NpusimError(f"--goodput takes one SLO per flag: --goodput ttft:MS --goodput tpot:MS "
                          f"(or one quoted list), got {scenario!r} as the scenario file")
    sc = build_scenario(scenario, flags)
    show_progress = sys.stderr.isatty() and not as_json
    progress_cb = None
    bar = None
    if show_progress:
        from rich.progress import Progress
        from rich.console import Console
        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task("simulating", total=None)
        progress_cb = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
    t_wall = time.perf_counter()
    try:
        run = simulate_scenario(sc, want_block_map=bool(report), progress=progress_cb)
    finally:
        if bar is not None:
            bar.stop()
    if not run.completed:
        reason = run.rejected[0][1] if run.rejected else "nothing was scheduled"
        raise NpusimError(f"no request completed: all {len(run.rejected)} were rejected; "
                          f"the first: {reason}")
    result = summarize(run, sc)
    result["wall_seconds"] = time.perf_counter() - t_wall
    if report:
        from npusim.report import write_report
        write_report(report, result, run)
    if as_json:
        _print_json(result)
    else:
        from npusim.text import format_summary
        print(format_summary(result))
        if report:
            print(f"report: {report}")


# --------------------------------------------------------------------------- sweep and capacity

def _grid_command(name: str, doc: str, body, head: list, tail: list, exclude: set[str]) -> None:
    """Register a command taking every grid setting (sweep.GRID_SETTINGS) as a comma-list option,
    between `head` and `tail` parameters; `body` gets them all as one dict."""
    import inspect

    from npusim.sweep import GRID_SETTINGS

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(n, kw, default=d, annotation=a) for n, a, d in head]
    for key, (_, what) in GRID_SETTINGS.items():
        if key not in exclude:
            params.append(inspect.Parameter(key, kw, annotation=Optional[str], default=typer.Option(
                None, "--" + key.replace("_", "-"), help=f"comma list: {what}")))
    params += [inspect.Parameter(n, kw, default=d, annotation=a) for n, a, d in tail]

    def command(**given):
        body(given)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


EXECUTOR_PARAMS = [
    ("executor", str, typer.Option("local", "--executor", help="local (a process pool) or dask")),
    ("workers", Optional[int], typer.Option(None, "--workers", help="worker processes (default: the local cores)")),
    ("address", Optional[str], typer.Option(None, "--address", help="a running Dask scheduler, tcp://HOST:PORT (with --executor dask)")),
]
SCENARIO_ARG = [("scenario", Optional[str], typer.Argument(None, help="scenario YAML; the options override it"))]


def _grid_from(given: dict, scenario: str | None):
    from npusim.settings import scenario_data
    from npusim.sweep import GRID_SETTINGS, parse_grid

    grid = parse_grid({k: given.pop(k) for k in list(given) if k in GRID_SETTINGS})
    return scenario_data(scenario), grid


def _progress(total: int, label: str, enabled: bool):
    """A rich progress bar on stderr (points done, failed, ETA), or None."""
    if not enabled or not total:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    bar.add_task(label, total=total, failed=0)
    bar.start()
    return bar


def _points_note(grid: dict, data: dict) -> tuple[int, str | None]:
    """The number of points, and a note (for stderr, once the run is done) on what settings that
    do not apply removed."""
    from npusim.sweep import expand

    points, dropped = expand(grid, data)
    note = None
    if dropped:
        note = (f"npusim: note: {dropped} point(s) of the grid repeat others and ran once: sharing applies to "
                f"2 or more instances, contiguous_policy to paging off, prefix_caching to paging on, router "
                f"to replicas")
    return len(points), note


def _sweep_body(given: dict) -> None:
    from npusim.sweep import SUMMARY_HEADERS, check_out, skipped_points, summary_rows, sweep as run_sweep

    scenario, out, resume, as_json = given.pop("scenario"), given.pop("out"), given.pop("resume"), given.pop("as_json")
    data, grid = _grid_from(given, scenario)
    fixed = {"seed": given["seed"], "goodput": given["goodput"] or None}
    check_out(out, resume)
    total, note = _points_note(grid, data)
    total -= skipped_points(grid, data, out, resume)
    bar = _progress(total, "sweep", sys.stderr.isatty() and not as_json)
    failed = 0

    def on_row(row):
        nonlocal failed
        failed += row["status"] != "ok"
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1, failed=failed)

    try:
        rows = run_sweep(data, fixed, grid, where=scenario or "settings", executor=given["executor"],
                         workers=given["workers"], address=given["address"], out=out, resume=resume,
                         on_row=on_row)
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
        print(f"npusim: interrupted; {'the finished points are in ' + out if out else 'nothing was written (no --out)'}",
              file=sys.stderr)
        raise typer.Exit(130)
    finally:
        if bar is not None:
            bar.stop()
    if note:
        print(note, file=sys.stderr)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "infeasible", "failed")}
    if as_json:
        _print_json({"rows": rows, **counts})
    else:
        if len(rows) <= 200:  # (the settings the grid varies; all of them are in the rows)
            shown = {k: v for k, v in grid.items() if len(v) > 1}
            t = Table(*shown, *SUMMARY_HEADERS)
            for cells in summary_rows(rows, shown):
                t.add_row(*cells)
            console.print(t)
        print(f"{len(rows)} points: {counts['ok']} ok, {counts['infeasible']} infeasible, {counts['failed']} failed"
              + (f"; rows in {out}" if out else ""))
    if not counts["ok"]:
        first = next((r["error"] for r in rows if r["error"]), "no point ran")
        raise NpusimError(f"no point of the sweep ran; the first reason: {first}")


_grid_command(
    "sweep",
    "Simulate every point of a grid (comma lists of any simulate setting), locally or on Dask; one row per point.",
    _sweep_body, SCENARIO_ARG,
    [("seed", Optional[int], typer.Option(None, "--seed", min=0, help="base seed (each point's seed derives from it)")),
     ("goodput", Optional[List[str]], typer.Option(None, "--goodput", help="SLOs for request_goodput: ttft:MS tpot:MS e2el:MS")),
     *EXECUTOR_PARAMS,
     ("out", Optional[str], typer.Option(None, "--out", help="write the rows to a .parquet or .csv file")),
     ("resume", bool, typer.Option(False, "--resume", help="keep the rows already in --out, run the rest (and the failed)")),
     ("as_json", bool, typer.Option(False, "--json", help="print the rows as JSON"))],
    exclude=set())


def _capacity_body(given: dict) -> None:
    from npusim.sweep import capacity as run_capacity, capacity_figure, setting_text

    scenario, as_json, plot = given.pop("scenario"), given.pop("as_json"), given.pop("plot")
    slo = {"ttft": given.pop("slo_ttft"), "tpot": given.pop("slo_tpot"), "e2el": given.pop("slo_e2el")}
    for m, v in slo.items():
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise NpusimError(f"--slo-{m}-p99-ms must be a positive number of milliseconds, got {v}")
    if plot is not None and not plot.strip().lower().endswith((".html", ".htm")):
        raise NpusimError(f"--plot {plot!r}: give an .html file to write")
    if plot is not None:
        from pathlib import Path
        if Path(plot).is_dir():
            raise NpusimError(f"--plot {plot} is a folder: give an .html file to write")
        if not Path(plot).resolve().parent.is_dir():
            raise NpusimError(f"--plot {plot}: the folder {Path(plot).resolve().parent} does not exist")
    requests = given.pop("requests")  # (one count for every run, not a grid setting here)
    data, grid = _grid_from(given, scenario)
    total, note = _points_note(grid, data)
    bar = _progress(total, "capacity", sys.stderr.isatty() and not as_json)

    def on_config(res):
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1, failed=0)

    try:
        result = run_capacity(data, {"seed": given["seed"]}, grid, slo, requests=requests,
                              where=scenario or "settings", executor=given["executor"],
                              workers=given["workers"], address=given["address"], on_config=on_config)
    finally:
        if bar is not None:
            bar.stop()
    if note:
        print(note, file=sys.stderr)
    if plot:
        capacity_figure(result).write_html(plot, include_plotlyjs=True)
    if as_json:
        _print_json(result)
    else:
        grid = {k: v for k, v in grid.items() if len(v) > 1} or grid  # (what the grid varies)
        t = Table(*grid, "max rate (req/s)", "p99 TTFT ms", "p99 TPOT ms", "p99 E2EL ms", "goodput req/s",
                  "out tok/s", "bound by", "why")
        for cfg in result["configs"]:
            t.add_row(*[setting_text(cfg[k]) for k in grid], _fmt(cfg["max_rate"], ",.3f"), _fmt(cfg["ttft_p99_ms"]),
                      _fmt(cfg["tpot_p99_ms"], ",.2f"), _fmt(cfg["e2el_p99_ms"], ",.0f"),
                      _fmt(cfg["goodput"], ",.3f"), _fmt(cfg["output_throughput"]), cfg["bound_by"],
                      (cfg["reason"] or "")[:80])
        console.print(t)
        best = result["best"]
        print(f"best: {best['point']} sustains {best['max_rate']:.3f} req/s" if best else "best: none meets the SLOs")
        print(result["requests_note"])
        if plot:
            print(f"plot: {plot}")
    if result["best"] is None:
        first = next((c["reason"] for c in result["configs"] if c["reason"]), "no configuration ran")
        raise NpusimError(f"no configuration meets the SLOs; the first reason: {first}")


_grid_command(
    "capacity",
    "For each configuration of a grid, the highest Poisson rate whose p99s meet every SLO; and the best.",
    _capacity_body, SCENARIO_ARG,
    [("slo_ttft", Optional[float], typer.Option(None, "--slo-ttft-p99-ms", help="p99 time to first token, ms")),
     ("slo_tpot", Optional[float], typer.Option(None, "--slo-tpot-p99-ms", help="p99 time per output token, ms")),
     ("slo_e2el", Optional[float], typer.Option(None, "--slo-e2el-p99-ms", help="p99 end-to-end latency, ms")),
     ("requests", int, typer.Option(1000, "--requests", min=100, help="requests per simulated run (the p99's stability: see the note printed)")),
     ("seed", Optional[int], typer.Option(None, "--seed", min=0, help="base seed")),
     *EXECUTOR_PARAMS,
     ("plot", Optional[str], typer.Option(None, "--plot", help="write load against p99 latency, with the SLO lines, to an .html file")),
     ("as_json", bool, typer.Option(False, "--json", help="print JSON"))],
    exclude={"rate", "requests"})


# --------------------------------------------------------------------------- analyze

def _fmt(x, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


@app.command()
def analyze(
    hw: str = HW_OPT,
    model: str = MODEL_OPT,
    batch: int = typer.Option(32, "--batch", min=1, help="sequences per instance"),
    context: int = typer.Option(2048, "--context", min=1, help="tokens of context per sequence"),
    instances: int = typer.Option(1, "--instances", help="model instances on the one device"),
    sharing: str = typer.Option("time-slice", "--sharing", help="time-slice | vnpu"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="KV page size in tokens (default: the device's recommended)"),
    weight_dtype: str = typer.Option("bf16", "--weight-dtype", help="bf16 | fp16 | fp8 | int8 | int4 | w8a8 (int8, int4: weight-only; w8a8: int8 weights and activations on the int8 matrix units, Ascend's W8A8; fp8: on FP8 tensor cores where the device has them, else weight-only)"),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="bf16 | fp16 | fp8 | int8"),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="fraction of device memory the engine may use"),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP),
    compare: bool = typer.Option(False, "--compare", help="also run the discrete-event simulator on a grid around the point, and under load"),
    tp: int = typer.Option(1, "--tp", min=1, help="tensor parallel: devices one instance spans (the point; the grid stays on one device)"),
    ep: int = typer.Option(1, "--ep", min=1, help="expert parallel (MoE): 1, the --tp size, or tp x the data-parallel ranks"),
    pp: int = typer.Option(1, "--pp", min=1, help="pipeline parallel: stages, each on --tp devices; --batch is "
                                                  "split into --pp micro-batches in flight"),
    dp: Optional[int] = typer.Option(None, "--dp", min=1, help="data parallel: replicas of the instance, each on devices of its own, each at --batch (default: 1, or --ep / --tp where the experts span ranks)"),
    cudagraph_mode: Optional[str] = typer.Option(None, "--cudagraph-mode", help=CUDAGRAPH_HELP),
    max_cudagraph_capture_size: Optional[int] = typer.Option(None, "--max-cudagraph-capture-size", min=1, help=CAPTURE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Steady-state decode from the roofline: where "throughput ∝ B · N_core / T" holds and breaks."""
    from npusim.analysis import (SHARING_MODES, analytical_point, explain_proportionality,
                                 proportionality_table)

    if sharing not in SHARING_MODES:
        raise NpusimError(f"--sharing must be one of {', '.join(SHARING_MODES)}, got {sharing!r}")
    if instances < 1:
        raise NpusimError(f"--instances must be >= 1, got {instances}")
    if not 0 < gpu_memory_utilization <= 1:
        raise NpusimError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    h = load_hardware(hw)
    m = load_model(model)
    if context + 1 > m.max_position_embeddings:
        raise NpusimError(f"--context {context} exceeds {m.name}'s context of {m.max_position_embeddings} "
                          "tokens (max_position_embeddings)")
    if compare and context < 128:
        raise NpusimError(f"--compare replays requests that decode 256 tokens centred on the context: it "
                          f"needs --context >= 128, got {context}")
    if sharing == "vnpu" and instances > h.ai_cores:
        raise NpusimError(f"--instances must be <= {h.ai_cores} (the AI cores of {h.name}) with "
                          f"--sharing vnpu, got {instances}")
    kw = dict(block_size=block_size, weight_dtype=_choice("--weight-dtype", weight_dtype, WEIGHT_DTYPES),
              kv_dtype=_choice("--kv-dtype", kv_dtype, KV_DTYPES),
              gpu_memory_utilization=gpu_memory_utilization, engine=engine)
    if tp > 1 and compare:
        raise NpusimError("--compare runs the simulator on one device's grid: with --tp, use simulate --tp")
    if pp > 1 and compare:
        raise NpusimError("--compare runs the simulator on one device's grid: with --pp, use simulate --pp")
    # data-parallel replicas: each one the point, on devices of its own (the experts of an MoE
    # model spread over the ranks when --ep = tp x dp; the point prices one rank, loaded alike)
    ranks = ep // tp if ep > tp else 1
    if dp is not None:
        if ep > tp and ep % tp == 0 and dp != ranks:  # (an --ep that is no multiple: the layout check says so)
            raise NpusimError(f"--ep {ep} over --tp {tp} devices spans {ranks} data-parallel ranks: --dp must be "
                              f"{ranks}, got {dp} (or --ep 1, --ep {tp} for experts within each replica)")
        if dp > 1 and compare:
            raise NpusimError("--compare runs the simulator on one device's grid: with --dp, use simulate --dp")
        if dp > 1 and instances > 1:
            raise NpusimError(f"--dp {dp} replicates the instance on devices of its own; --instances {instances} "
                              "shares one device among instances: give one of the two")
        ranks = dp
    graph = dict(cudagraph_mode=_choice("--cudagraph-mode", cudagraph_mode, CUDAGRAPH_MODES),
                 max_cudagraph_capture_size=max_cudagraph_capture_size)
    if compare and (cudagraph_mode or max_cudagraph_capture_size):
        raise NpusimError("--compare runs the simulator with the engine's own graph mode: with --cudagraph-mode "
                          "or --max-cudagraph-capture-size, use simulate")
    point = analytical_point(h, m, batch=batch, context=context, instances=instances, sharing=sharing,
                             tp=tp, ep=ep, pp=pp, **kw, **graph)
    # the grid around the point: B/2, B, 2B; half and all cores; one instance vs K (2 when K is 1)
    grid_k = instances if instances > 1 else 2
    if sharing == "vnpu" and grid_k > h.ai_cores:
        grid_k = 1
    grid = proportionality_table(h, m, batches=[max(1, batch // 2), batch, 2 * batch], contexts=[context],
                                 cores_list=[max(1, h.ai_cores // 2), h.ai_cores], instances=grid_k,
                                 sharing_modes=[sharing], **kw, **graph)
    if not point.feasible and not any(g["feasible"] for g in grid) and tp == 1 and pp == 1:
        raise NpusimError(f"{m.name} on {h.name} does not fit at batch {batch}, context {context} nor at any "
                          f"point around it: {point.reason}")
    explanation = explain_proportionality(grid)
    comparison = None
    if compare:
        from npusim.compare import compare_grid, compare_under_load
        comparison = {
            "grid": compare_grid(h, m, batches=sorted({max(1, batch // 2), batch, 2 * batch}),
                                 contexts=[context], instances_list=sorted({1, grid_k}), **kw),
            "under_load": compare_under_load(h, m, batch=batch, context=context,
                                             rates=_load_rates(point, batch), **kw)
            if point.feasible else [],
        }
    replicas = {"dp": ranks, "devices": tp * pp * ranks,
                "tokens_per_s": point.tokens_per_s * ranks if point.tokens_per_s is not None else None}
    if as_json:
        out = {"point": point.as_dict(), "replicas": replicas, "grid": grid, "explanation": explanation}
        if comparison is not None:
            out["comparison"] = comparison
        _print_json(out)
        return
    p = point
    t = Table(title=f"{m.name} on {h.name}: decode, {p.instances} instance(s) ({p.sharing}) x batch "
                    f"{p.batch}, context {p.context}, block {p.block_size}")
    t.add_column("quantity")
    t.add_column("value")
    per = "per device" if p.tp > 1 or p.pp > 1 else "per instance"
    if p.pp > 1:
        per = "per device (the tightest stage)"
    rows = [
        (f"cores / bandwidth {per}", f"{p.cores_per_instance} cores, {p.bandwidth_gbs_per_instance:g} GB/s"),
        (f"weights {per}", f"{p.weights_gib:.2f} GiB ({p.weight_dtype})"),
        (f"KV blocks {per} / per sequence", f"{p.num_blocks} / {p.blocks_per_seq}"),
        ("max batch per instance", str(p.max_batch)),
        ("feasible", "yes" if p.feasible else f"no: {p.reason}"),
        ("iteration T (device + host) ms", f"{_fmt(p.iteration_ms, '.2f')} ({_fmt(p.device_step_ms, '.2f')} + {_fmt(p.host_ms, '.2f')})"),
        ("TPOT ms", _fmt(p.tpot_ms, ".2f")),
        ("throughput tokens/s (per instance)", f"{_fmt(p.tokens_per_s)} ({_fmt(p.tokens_per_s_per_instance)})"),
        *([("data-parallel replicas / devices / tokens/s of all", f"{ranks} / {replicas['devices']} / "
            f"{_fmt(replicas['tokens_per_s'])}")] if ranks > 1 else []),
        ("compute / memory (KV) / overhead ms", f"{_fmt(p.compute_ms, '.2f')} / {_fmt(p.memory_ms, '.2f')} "
                                                f"({_fmt(p.kv_memory_ms, '.2f')}) / {_fmt(p.overhead_ms, '.2f')}"),
        *([("devices (tensor parallel) / collectives ms", f"{p.tp} / {_fmt(p.comm_ms, '.3f')}")] if p.tp > 1 else []),
        *([("pipeline: stages x micro-batch / stage ms / bubble",
            f"{p.pp} x {p.micro_batch} / {', '.join(f'{t:.3f}' for t in p.stage_ms)} / {_fmt(p.bubble, '.0%')}")]
          if p.pp > 1 and p.feasible else []),
        ("bound", p.bound or "-"),
        ("arithmetic intensity / ridge flop/B", f"{_fmt(p.arithmetic_intensity)} / {p.ridge_point:.1f}"),
        (f"proportional tokens/s (ref B={p.reference_batch})", f"{_fmt(p.proportional_tokens_per_s)} (ref {_fmt(p.reference_tokens_per_s)})"),
        ("actual / proportional", _fmt(p.ratio_to_proportional, ".3f")),
        ("regime", p.regime),
    ]
    for k, v in rows:
        t.add_row(k, v)
    for note in p.notes:
        t.add_row("note", note)
    console.print(t)
    if (tp > 1 or pp > 1) and not p.feasible:
        raise NpusimError(f"{m.name} on {tp * pp} x {h.name} does not fit at batch {batch}, context {context}: "
                          f"{p.reason}")
    g = Table(title="proportionality grid: ratio = actual / (B · N_core / T), T held at the B=1 reference"
                    + (" (on one device, without --tp/--pp)" if tp > 1 or pp > 1 else ""))
    for col in ("scaling", "cores", "GB/s", "K", "B", "tokens/s", "TPOT ms", "bound", "flop/B", "ratio", "regime"):
        g.add_column(col, justify="left" if col in ("scaling", "bound", "regime") else "right")
    for r in grid:
        regime = r["regime"] if r["feasible"] else f"{r['regime']}: {r['reason']}"
        g.add_row(r["core_scaling"], str(r["cores_per_instance"]), f"{r['bandwidth_gbs_per_instance']:.0f}",
                  f"{r['instances']}" + (f" {r['sharing']}" if r["instances"] > 1 else ""), str(r["batch"]),
                  _fmt(r["tokens_per_s"]), _fmt(r["tpot_ms"], ".2f"), r["bound"] or "-",
                  _fmt(r["arithmetic_intensity"]), _fmt(r["ratio_to_proportional"], ".3f"), regime)
    console.print(g)
    for line in explanation:
        console.print(f"- {line}")
    if comparison is not None:
        from npusim.compare import format_comparison
        print("\nAnalytical model vs discrete-event simulator, steady-state decode (no queueing):")
        print(format_comparison(comparison["grid"]))
        if comparison["under_load"]:
            print("\nUnder load (open-loop Poisson arrivals, then a small KV pool):")
            print(format_comparison(comparison["under_load"]))


def _load_rates(point, batch: int) -> list[float]:
    """Arrival rates at a tenth, half and all of the point's analytical capacity, and all at once."""
    out_len = 256
    cap = point.tokens_per_s_per_instance or 1.0
    return [0.1 * cap / out_len, 0.5 * cap / out_len, math.inf]


# --------------------------------------------------------------------------- kv-study

@app.command("kv-study")
def kv_study(
    trace: str = typer.Option(..., "--trace", help="CSV with arrived_at,num_prefill_tokens,num_decode_tokens (or start_time,input_len,output_len)"),
    requests: Optional[int] = typer.Option(None, "--requests", min=1, help="the first N rows (default: all)"),
    hw: str = typer.Option("ascend-910b2", "--hw"),
    model: str = typer.Option("llama-3.1-8b", "--model"),
    max_model_len: int = typer.Option(4096, "--max-model-len", min=1, help="what a max reservation holds"),
    rate: Optional[str] = typer.Option(None, "--rate", help="replace the trace's times: requests/s or inf"),
    engine: str = typer.Option("mindie", "--engine", help="engine profile (default mindie: its attention takes the study's pages of 16 and 128 tokens)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """KV waste on a trace: paged (block 16 and 128) against contiguous max/oracle reservation."""
    from npusim.kvstudy import format_study, waste_study
    from npusim.settings import _parse_rate

    rows = waste_study(trace, requests=requests, hw=hw, model=model, max_model_len=max_model_len,
                       rate=_parse_rate(rate), engine=engine)
    if as_json:
        _print_json(rows)
    else:
        print(format_study(rows))


# --------------------------------------------------------------------------- seed

@app.command()
def seed(
    gpu_memory_utilization: float = typer.Option(0.98, "--gpu-memory-utilization",
                                                 help="memory share vLLM may use (0.9 leaves no room for one request)"),
    requests: int = typer.Option(16, "--requests", min=1, help="requests per instance, all arriving at once"),
    no_alternatives: bool = typer.Option(False, "--no-alternatives", help="skip the alternative configurations"),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Reproduce the seed article's study (Llama 13B, Ascend 910, input 5120, output 128) and judge its claims."""
    from npusim.seed import format_seed, run_seed

    if not 0 < gpu_memory_utilization <= 1:
        raise NpusimError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    # (no --seed: the study's requests are fixed-length and arrive at once, so nothing is drawn)
    result = run_seed(gpu_memory_utilization, requests, alternatives=not no_alternatives, engine=engine)
    if as_json:
        _print_json(result)
    else:
        print(format_seed(result))


# --------------------------------------------------------------------------- hw / model

@hw_app.command("list")
def hw_list() -> None:
    """Known hardware profiles."""
    t = Table()
    for col in ("name", "cores", "bf16 TFLOPS", "memory GiB", "GB/s", "TDP W", "description"):
        t.add_column(col)
    for name in known_hardware():
        h = load_hardware(name)
        t.add_row(name, str(h.ai_cores), f"{h.matmul_tflops_bf16:g}", f"{h.memory_gib:g}",
                  f"{h.memory_bandwidth_gbs:g}", f"{h.tdp_w:g}", h.description)
    console.print(t)


@hw_app.command("show")
def hw_show(name: str = typer.Argument(..., help="profile name or path"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """One profile, every number with its kind and source."""
    h = load_hardware(name)
    if as_json:
        _print_json({**h.model_dump(by_alias=True), "streaming_gbs": h.streaming_gbs})
        return
    from npusim.text import hardware_rows

    t = Table(title=f"{h.name}: {h.description}")
    for col in ("field", "value", "kind", "source"):
        t.add_column(col)
    for row in hardware_rows(h):
        t.add_row(*row)
    console.print(t)
    pull = h.ai_cores * h.per_core_bandwidth_gbs
    console.print(f"streams {h.streaming_gbs:g} GB/s from memory ("
                  + (f"what its {h.ai_cores} cores pull, below the {h.memory_bandwidth_gbs:g} GB/s HBM"
                     if pull < h.memory_bandwidth_gbs else "its HBM bandwidth")
                  + f"); kernels reach {h.memory_efficiency:g} of it: {h.streaming_gbs * h.memory_efficiency:.0f} GB/s")
    if h.calibration_transfer is not None:
        console.print(f"kernel tables: {h.calibration_transfer.from_profile}'s measurements carried to this device "
                      f"(derived: {h.calibration_transfer.source})")
    elif h.calibration_files:
        console.print(f"kernel tables: measured, {len(h.calibration_files)} calibration file(s)")
    else:
        console.print("kernel tables: none (the datasheet roofline with the efficiencies above)")


@engine_app.command("list")
def engine_list() -> None:
    """Known engine profiles."""
    t = Table()
    for col in ("name", "execution", "kernels/layer (decode)", "block sizes", "host ms/iter", "description"):
        t.add_column(col)
    for name in known_engines():
        e = load_engine_profile(name)
        decode = e.kernels_per_layer() - e.kernels["attention_prefill"] - e.kernels["qk_norm"] - e.kernels["qkv_bias"]
        t.add_row(name, e.execution, str(decode), e.kv_block_sizes.describe(),
                  f"{e.host_per_iteration_ms:g}", e.description)
    console.print(t)


@engine_app.command("show")
def engine_show(name: str = typer.Argument(..., help="profile name or path"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """One engine profile, every number with its kind and source."""
    e = load_engine_profile(name)
    if as_json:
        _print_json(e.model_dump())
        return
    from npusim.text import engine_rows

    t = Table(title=f"{e.name} ({e.execution}): {e.description}")
    for col in ("field", "value", "kind", "source"):
        t.add_column(col)
    for row in engine_rows(e):
        t.add_row(*row)
    console.print(t)


@model_app.command("list")
def model_list() -> None:
    """Models in the zoo."""
    t = Table()
    for col in ("name", "params (B)", "active (B)", "experts", "layers", "hidden", "heads/kv",
                "KV KiB/token (bf16)", "context"):
        t.add_column(col)
    for name in MODEL_ZOO:
        m = load_model(name)
        t.add_row(name, f"{m.num_params / 1e9:.2f}", f"{m.active_params / 1e9:.2f}",
                  f"{m.num_experts}, top {m.experts_per_token}" if m.num_experts else "dense",
                  str(m.num_layers), str(m.hidden_size), f"{m.num_heads}/{m.num_kv_heads}",
                  f"{m.kv_bytes_per_token() / 1024:g}", str(m.max_position_embeddings))
    console.print(t)


@model_app.command("show")
def model_show(name: str = typer.Argument(..., help="zoo name or path to a config.json"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """A model's shape and derived figures."""
    m = load_model(name)
    derived = {
        "num_params": m.num_params,
        "weight_gib": {d: round(gib(m.weight_bytes(d)), 3) for d in ("bf16", "int8", "int4", "w8a8")},
        "kv_bytes_per_token": {d: m.kv_bytes_per_token(d) for d in ("bf16", "int8")},
    }
    if as_json:
        _print_json({**m.model_dump(), **derived})
        return
    t = Table(title=m.name)
    t.add_column("field")
    t.add_column("value")
    for k, v in {**m.model_dump(), **derived}.items():
        t.add_row(k, str(v))
    console.print(t)


# --------------------------------------------------------------------------- calibrate

@calibrate_app.command("run")
def calibrate_run(
    device: str = typer.Option("auto", "--device", help="auto | npu | cuda | cpu (or another torch accelerator)"),
    quick: bool = typer.Option(False, "--quick", help="small sizes and few repeats: seconds on a CPU"),
    out: Optional[str] = typer.Option(None, "--out", help="write the measurements JSON here (input of `calibrate fit`)"),
) -> None:
    """Time GEMMs, a device copy, an elementwise op and kernel launches on this machine (needs torch)."""
    from npusim.calibrate import format_measurements, run_calibration, save_measurements

    progress = (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    meas = run_calibration(device, quick, progress=progress)
    print(format_measurements(meas))
    if out:
        print(f"measurements: {save_measurements(meas, out)}")


def _print_fitted(h, mapping: dict) -> None:
    """The numbers a fit changed: old value, new value, source."""
    t = Table(title=f"{mapping['name']}: fitted from {h.name}")
    for col in ("field", "was", "now", "source"):
        t.add_column(col)
    for field, new in mapping.items():
        if isinstance(new, dict) and new.get("kind") == "calibrated" and field in h.provenance:
            old = h.provenance[field]
            if (new["value"], new["source"]) != (getattr(h, field), old.source):
                t.add_row(field, f"{getattr(h, field):g} ({old.kind})", f"{new['value']:g}", new["source"])
    console.print(t)


@calibrate_app.command("fit")
def calibrate_fit(
    hw: str = HW_OPT,
    measurements: str = typer.Option(..., "--measurements", help="JSON written by `npusim calibrate run --out`"),
    out: str = typer.Option(..., "--out", help="write the new profile YAML here"),
    name: Optional[str] = typer.Option(None, "--name", help="the new profile's name (default: HW-calibrated)"),
) -> None:
    """Fit a profile's efficiencies and kernel latency to measurements; write a new profile."""
    from npusim.calibrate import fit_notes, fit_profile, load_measurements, write_profile

    from npusim.calibration import check_measured_times

    if name is not None and not name.strip():
        raise NpusimError("--name must not be empty")
    if not out.endswith((".yaml", ".yml")):
        raise NpusimError(f"--out must name a .yaml file (profiles are YAML), got {out!r}")
    h = load_hardware(hw)
    meas = load_measurements(measurements)
    check_measured_times(measurements, meas)  # before anything is fitted to them
    mapping = fit_profile(h, meas, name)
    if meas.get("gemm_sweep"):
        # the cost model interpolates the measured tables themselves (path relative to the profile)
        from pathlib import Path
        rel = os.path.relpath(Path(measurements).resolve(), Path(out).resolve().parent)
        mapping["calibration_files"] = [rel]
        if mapping.pop("calibration_transfer", None) is not None:  # this machine's own tables, not another's
            console.print(f"- kernel tables: this run's gemm_sweep; {h.calibration_transfer.from_profile}'s carried "
                          "tables (attention, expert GEMMs, FP8/int8 GEMMs among them) are no longer used")
    else:
        mapping.pop("calibration_files", None)  # the base device's tables were not this machine's
    path = write_profile(mapping, out)
    _print_fitted(h, mapping)
    for note in fit_notes(h, meas):
        console.print(f"- {note}")
    if "calibration_transfer" in mapping:
        console.print(f"- kernel tables: still {h.calibration_transfer.from_profile}'s, carried as {h.name}'s were "
                      "(no gemm_sweep in these measurements)")
    elif not meas.get("gemm_sweep"):
        console.print("- kernel tables: none (no gemm_sweep in these measurements): the datasheet roofline with "
                      "the fitted efficiencies")
    console.print(f"profile written: {path} (use it with --hw {path})")


@calibrate_app.command("engine")
def calibrate_engine_cmd(
    trace: str = typer.Option(..., "--trace", help="a torch.profiler chrome trace (.json, .json.gz) or Ascend kernel_details.csv of one forward step"),
    model: str = MODEL_OPT,
    batch: int = typer.Option(..., "--batch", min=1, help="sequences in the traced step (decode sequences, or prompts)"),
    context: int = typer.Option(..., "--context", min=1, help="decode: tokens of context per sequence; prefill: tokens per prompt"),
    phase: str = typer.Option("decode", "--phase", help="decode | prefill: what the traced step was (a prefill gives the prefill attention's kernels, and no least kernel times)"),
    base: str = typer.Option(..., "--base", help="engine profile the rest comes from: execution mode, host terms, page sizes"),
    name: str = typer.Option(..., "--name", help="the new engine profile's name"),
    out: str = typer.Option(..., "--out", help="where to write the engine profile (.yaml)"),
    hw: Optional[str] = typer.Option(None, "--hw", help="the device traced: prints npusim's step on it with the new profile"),
    step_ms: Optional[List[float]] = typer.Option(None, "--step-ms", help="an eager engine: the traced step's wall time in ms, measured without the profiler (repeat for repeats; needs --hw): fits the dispatch per kernel"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """An engine profile from a kernel trace of one forward step: kernels per op per layer and each op's least kernel time."""
    from npusim.engine_calibration import calibrate_engine, fit_dispatch, traced_step_s, write_engine_profile
    from npusim.specs import engine_profile_from_mapping

    if not out.endswith((".yaml", ".yml")):
        raise NpusimError(f"--out must name a .yaml file, got {out}")
    if not name.strip():
        raise NpusimError("--name must not be empty")
    if phase not in ("decode", "prefill"):
        raise NpusimError(f"--phase must be decode or prefill, got {phase!r}")
    if step_ms is not None and phase != "decode":
        raise NpusimError("--step-ms fits the dispatch from a host-bound decode step: trace and time one (--phase decode)")
    if step_ms is not None and hw is None:
        raise NpusimError("--step-ms needs --hw: whether the timed step was host-bound depends on the device")
    h = load_hardware(hw) if hw is not None else None  # (refused before anything is written)
    m = load_model(model)
    if phase == "prefill" and context > m.max_position_embeddings:
        raise NpusimError(f"--context {context} exceeds {m.name}'s context of {m.max_position_embeddings} tokens")
    mapping, report = calibrate_engine(trace, m, load_engine_profile(base), name=name, batch=batch,
                                       context=context, phase=phase)
    profile = engine_profile_from_mapping(mapping, "the calibrated profile")  # it must load
    if step_ms is not None:
        us, report["dispatch"] = fit_dispatch(CostModel(h, m, engine=profile), batch, context, step_ms,
                                              os.path.basename(trace))
        mapping["dispatch_per_kernel_us"] = {"value": round(us, 3), "kind": "calibrated",
                                             "source": report["dispatch"]["source"]}
        profile = engine_profile_from_mapping(mapping, "the calibrated profile")
    path = write_engine_profile(mapping, out)
    predicted = None
    if h is not None:
        device, iteration = traced_step_s(CostModel(h, m, engine=profile), batch, context, phase)
        predicted = {"device_ms": device * 1e3, "iteration_ms": iteration * 1e3}
    if as_json:
        _print_json({**report, "out": str(path), "kernels_by_op": profile.kernels,
                     "kernel_floor_us": profile.kernel_floor_us, "predicted": predicted})
        return
    t = Table(title=f"{profile.name}: {report['kernels']} kernels in {report['file']} "
                    f"({report['layers']} layers, {report['kernels_per_layer']} kernels per layer)")
    for col in ("op", "kernels", "least kernel us"):
        t.add_column(col, justify="left" if col == "op" else "right")
    for op, n in profile.kernels.items():
        floor = profile.kernel_floor_us.get(op)
        t.add_row(op, str(n), "-" if floor is None else f"{floor:.2f}")
    console.print(t)
    if step_ms is not None:
        console.print(f"dispatch per kernel: {profile.dispatch_per_kernel_us:.3f} us ({report['dispatch']['source']})")
    if predicted:
        console.print(f"npusim on {hw}: device {predicted['device_ms']:.3f} ms, iteration "
                      f"{predicted['iteration_ms']:.3f} ms" + (" (block 16)" if phase == "decode" else ""))
    console.print("--batch agrees with the traced GEMM shapes" if report["batch_checked"] else
                  f"the trace records no GEMM shapes: --batch and --phase ({phase}) are taken as given "
                  "(record_shapes=True lets npusim check them)")
    console.print(f"wrote {path}")


@calibrate_app.command("serve")
def calibrate_serve(
    bench: List[str] = typer.Option(..., "--bench", help="a vllm bench serve --save-result --save-detailed JSON (repeat for more)"),
    hw: str = HW_OPT,
    model: str = MODEL_OPT,
    engine: Optional[str] = typer.Option(None, "--engine", help="the engine profile whose host terms are fitted (default: the device's)"),
    out: str = typer.Option(..., "--out", help="where to write the calibrated engine profile (.yaml)"),
    name: Optional[str] = typer.Option(None, "--name", help="the new profile's name (default: ENGINE-calibrated)"),
    block_size: Optional[int] = typer.Option(None, "--block-size"),
    num_blocks: Optional[int] = typer.Option(None, "--num-blocks", min=1),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", min=1),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", min=1),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1),
    cudagraph_mode: Optional[str] = typer.Option(None, "--cudagraph-mode", help=CUDAGRAPH_HELP),
    max_cudagraph_capture_size: Optional[int] = typer.Option(None, "--max-cudagraph-capture-size", min=1, help=CAPTURE_HELP),
    weight_dtype: Optional[str] = typer.Option(None, "--weight-dtype"),
    kv_dtype: Optional[str] = typer.Option(None, "--kv-dtype"),
    tp: Optional[int] = typer.Option(None, "--tp", min=1, help="tensor parallel: devices the instance spans (within a node, or whole nodes)"),
    ep: Optional[int] = typer.Option(None, "--ep", min=1, help="expert parallel (MoE): whole experts over the --tp devices, or over the --dp ranks of --tp devices each (--ep = tp x dp)"),
    pp: Optional[int] = typer.Option(None, "--pp", min=1, help="pipeline parallel: stages, each on --tp devices of its own"),
    expert_imbalance: Optional[float] = typer.Option(None, "--expert-imbalance", min=1.0, help="MoE with --ep: the busiest expert-parallel device's routed tokens over the mean, as measured (default: uniform routing)"),
    dp: Optional[int] = typer.Option(None, "--dp", min=1, help="data parallel: replicas of the instance, each on its own device(s)"),
    router: Optional[str] = typer.Option(None, "--router", help="round-robin | least-outstanding | prefix-aware: how requests reached the replicas"),
    no_chunked_prefill: bool = typer.Option(False, "--no-chunked-prefill"),
    prefix_caching: Optional[bool] = typer.Option(None, "--prefix-caching/--no-prefix-caching", help="default: the engine's (vLLM V1: on)"),
    preemption: Optional[str] = typer.Option(None, "--preemption", help="recompute | swap"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Fit an engine profile's host terms to serving benchmarks of that engine (vllm bench serve results).

    The engine flags describe the server the benchmarks ran against, as simulate takes them."""
    import tempfile
    from pathlib import Path

    from npusim.engine_calibration import write_engine_profile
    from npusim.serve_calibration import METRICS, PARAMS, calibrated_mapping, fit_host_terms, predict, read_bench
    from npusim.specs import engine_profile_from_mapping

    if not out.endswith((".yaml", ".yml")):
        raise NpusimError(f"--out must name a .yaml file, got {out}")
    from npusim.settings import apply_flags

    h = load_hardware(hw)
    load_model(model)
    base = load_engine_profile(engine or h.default_engine)
    # the server, through simulate's own flag rules (choices, cross-field checks); its workload
    # comes from each benchmark
    server_flags = dict(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                        cudagraph_mode=cudagraph_mode, max_cudagraph_capture_size=max_cudagraph_capture_size,
                        weight_dtype=weight_dtype, kv_dtype=kv_dtype, tp=tp, ep=ep, pp=pp,
                        expert_imbalance=expert_imbalance, dp=dp, router=router,
                        no_chunked_prefill=no_chunked_prefill or None, prefix_caching=prefix_caching,
                        preemption=preemption)
    def flag_text(key: str, value) -> str:
        flag = "--" + key.replace("_", "-")
        if key == "prefix_caching":
            return flag if value else "--no-prefix-caching"
        return flag if value is True else f"{flag} {value}"

    described = " ".join(flag_text(k, v) for k, v in server_flags.items() if v is not None)
    sc = apply_flags({}, {**server_flags, "hw": hw, "model": model}, "the server's flags")
    cfg = sc.engine
    server = {k: getattr(sc, k) for k in ("dp", "router") if k in sc.model_fields_set}
    benches = [read_bench(b) for b in bench]
    kw = dict(hw=hw, model=model, base=base, engine=cfg, server=server)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fit = fit_host_terms(benches, workdir=work, **kw)
        values = dict(zip(fit["names"], fit["values"]))
        rows = []
        for i, b in enumerate(benches):
            if len(benches) > 1:  # leave this file out of the fit, then predict it
                held = fit_host_terms(benches[:i] + benches[i + 1:], workdir=work, **kw)
                used = dict(zip(held["names"], held["values"]))
            else:
                used = values
            pred = predict(b, workdir=work, values=used, **kw)
            rows.append({"file": b["path"], "held_out": len(benches) > 1,
                         **{f"{k}_error": pred[k] / b[k] - 1 for k in METRICS}})
    mapping = calibrated_mapping(base, fit["names"], fit["values"], [b["path"] for b in benches],
                                 name or f"{base.name}-calibrated", cfg, described)
    engine_profile_from_mapping(mapping, "the calibrated profile")  # it must load
    path = write_engine_profile(mapping, out)
    if as_json:
        _print_json({"fitted": values, "bounds": dict(zip(fit["names"], fit["bounds"])),
                     "residuals": fit["residuals"], "errors": rows, "out": str(path)})
        return
    console.print(f"{base.name}: host terms fitted to {len(benches)} benchmark(s):")
    for n, v in values.items():
        lo, hi = PARAMS[n]
        console.print(f"  {n} = {v:.4g}  (bounds {lo:g}..{hi:g})")
    t = Table(title="errors, each file predicted by a fit to the others" if len(benches) > 1 else "errors of the fit")
    for col in ("file", *METRICS):
        t.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        t.add_row(Path(r["file"]).name, *(f"{r[f'{k}_error']:+.1%}" for k in METRICS))
    console.print(t)
    console.print(f"wrote {path}")


@calibrate_app.command("import")
def calibrate_import(
    hw: str = HW_OPT,
    profile: str = typer.Option(..., "--profile", help="a torch_npu/msprof profile folder, or one kernel_details.csv / op_summary_*.csv"),
    out: Optional[str] = typer.Option(None, "--out", help="write a profile with the fitted matmul_efficiency here"),
    name: Optional[str] = typer.Option(None, "--name", help="the new profile's name (default: HW-calibrated)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Compare profiled Ascend GEMM kernels with npusim's roofline; fit matmul_efficiency from them."""
    from npusim.calibrate import write_profile
    from npusim.profiler_import import calibrate_from_kernels, load_kernels, matmul_efficiency_from_kernels

    if out is not None and not out.endswith((".yaml", ".yml")):
        raise NpusimError(f"--out must name a .yaml file (profiles are YAML), got {out!r}")
    if name is not None and not name.strip():
        raise NpusimError("--name must not be empty")
    h = load_hardware(hw)
    records, files = load_kernels(profile)
    fit = matmul_efficiency_from_kernels(records, h)
    can_fit = fit["efficiency"] is not None
    if out and not can_fit:
        raise NpusimError(f"cannot fit matmul_efficiency: {fit['note']}")
    if as_json:
        mapping = calibrate_from_kernels(h, records, name=name) if can_fit else None
        path = write_profile(mapping, out) if out else None
        _print_json({"hw": h.name, "files": [str(f) for f in files], "kernels": len(records),
                     "gemm_kernels": len(fit["kernels"]), "skipped_gemms": fit["skipped"],
                     "gemm_by_shape": fit["by_shape"], "matmul_efficiency": fit["efficiency"],
                     "note": fit["note"], "fitted": mapping["matmul_efficiency"] if mapping else None,
                     "out": str(path) if path else None})
        return
    t = Table(title=f"GEMM kernels in {len(files)} file(s): measured vs npusim on {h.name} "
                    f"(matmul_efficiency {h.matmul_efficiency:g}, {len(records)} kernels in all)")
    for col in ("type", "dtype", "M", "K", "N", "count", "measured us", "predicted us", "meas/pred", "TFLOP/s", "bound"):
        t.add_column(col, justify="left" if col in ("type", "dtype", "bound") else "right")
    shown = fit["by_shape"][:30]
    for g in shown:
        t.add_row(g["op_type"], g["dtype"], str(g["m"]), str(g["k"]), str(g["n"]), str(g["count"]),
                  f"{g['measured_us']:,.1f}", f"{g['predicted_us']:,.1f}", f"{g['ratio']:.2f}",
                  f"{g['tflops']:,.1f}", g["bound"])
    console.print(t)
    if len(fit["by_shape"]) > len(shown):
        console.print(f"({len(fit['by_shape']) - len(shown)} more shapes; --json lists all)")
    skipped = ", ".join(f"{n} {why}" for why, n in fit["skipped"].items() if n)
    if skipped:
        console.print(f"GEMM kernels skipped: {skipped}")
    console.print(f"fit: {fit['note']}")
    if not can_fit:
        return
    mapping = calibrate_from_kernels(h, records, name=name)
    new = mapping["matmul_efficiency"]
    console.print(f"matmul_efficiency: {h.matmul_efficiency:g} -> [bold]{new['value']:g}[/]  ({new['source']})")
    if out:
        console.print(f"profile written: {write_profile(mapping, out)} (use it with --hw {out})")


# --------------------------------------------------------------------------- entry point

def _cli_exceptions() -> tuple[type[BaseException], ...]:
    # typer >= 0.29 vendors click (typer._click); older typer raises click's own exceptions
    kinds: list[type[BaseException]] = [typer.TyperException]
    try:
        import click
        kinds.append(click.ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (no traceback) and return exit status 2."""
    try:
        app(args=argv, prog_name="npusim", standalone_mode=False)
    except NpusimError as e:
        print(f"npusim: error: {e}", file=sys.stderr)
        return 2
    except (typer.Exit,) as e:
        return e.exit_code
    except typer.Abort:
        print("npusim: aborted", file=sys.stderr)
        return 130
    except _cli_exceptions() as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0
        print(f"npusim: error: {e.format_message()}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
