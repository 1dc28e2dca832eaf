"""npusim what-if dashboard: `streamlit run app.py`.

Pick a device, an engine, a model, dtypes, a KV page size, a batch, a context and how many
instances share the device; the page answers in well under a second from the analytical model
(npusim.analysis), the cost model (npusim.costmodel) and the vLLM-style memory plan. Tabs add the
page-size study, the roofline, a comparison with a pinned configuration and across sharing modes,
the discrete-event simulator (npusim.scenario) with its report, the SLO capacity search
(npusim.sweep) and every hardware and engine number with its source.

Every number shown comes from npusim; when a configuration does not fit, the page says why with
npusim's own numbers, shows no throughput, and lists what would fit. The settings live in the URL,
so a planner can share the page as it is.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from npusim.analysis import (SHARING_MODES, analytical_point, decode_batch, instance_engine, reference_point,
                             unloaded_ttft)
from npusim.costmodel import instance_setup
from npusim.errors import NpusimError
from npusim.specs import (KV_DTYPES, MODEL_ZOO, WEIGHT_DTYPES, EngineConfig, ceil_div, gib, known_engines,
                          known_hardware, load_engine_profile, load_hardware, load_model)

BLOCK_SIZE_CHOICES = (8, 16, 32, 64, 128, 256, 512)
BOUND_COLOURS = {"compute": "#d62728", "memory": "#1f77b4", "latency": "#7f7f7f"}
MEMORY_COLOURS = {"weights": "#1f77b4", "activations": "#ff7f0e", "runtime reserve": "#7f7f7f",
                  "KV pool": "#2ca02c", "free": "#d9d9d9"}
THROUGHPUT_COLOUR, TPOT_COLOUR = "#1f77b4", "#ff7f0e"
DEFAULTS = {
    "hw": "ascend-910b2",
    "model": "llama-3.1-8b",
    "weight_dtype": "bf16",
    "kv_dtype": "bf16",
    "batch": 32,
    "context": 2048,
    "instances": 1,
    "tp": 1,
    "sharing": "time-slice",
    "gpu_memory_utilization": 0.9,
    "sim_requests": 200,
    "sim_prompt": 1024,
    "sim_output": 256,
    "sim_rate": 8.0,
    "sim_lengths": "fixed",
}
# the settings the URL carries, and how each is read from it
URL_SETTINGS = {"hw": str, "engine": str, "model": str, "weight_dtype": str, "kv_dtype": str, "block_size": int,
                "batch": int, "context": int, "instances": int, "tp": int, "sharing": str,
                "gpu_memory_utilization": float}
UPLOAD_LIMIT_BYTES = {"hardware": 1 << 20, "model": 1 << 20, "trace": 32 << 20}
PROVENANCE = "Every hardware and engine number with its source: the Hardware tab, or `npusim hw show NAME`."


# --------------------------------------------------------------------------- cached computations
# Arguments are plain strings and numbers so that st.cache_data can hash them.

@st.cache_data(show_spinner=False)
def block_size_options(engine: str) -> tuple[list[int], int]:
    """The page sizes of BLOCK_SIZE_CHOICES the engine's attention kernels accept, and its
    recommended one."""
    rule = load_engine_profile(engine).kv_block_sizes
    options = [b for b in BLOCK_SIZE_CHOICES if rule.accepts(b)]
    if rule.recommended not in options:
        options = sorted(options + [rule.recommended])
    return options, rule.recommended


@st.cache_data(show_spinner=False)
def compute_point(hw_name: str, model_name: str, batch: int, context: int, instances: int,
                  sharing: str, block_size: int, weight_dtype: str, kv_dtype: str,
                  utilization: float, engine: str | None, tp: int = 1) -> dict:
    point = analytical_point(hw_name, model_name, batch=batch, context=context, instances=instances,
                             sharing=sharing, block_size=block_size, weight_dtype=weight_dtype,
                             kv_dtype=kv_dtype, gpu_memory_utilization=utilization, engine=engine, tp=tp)
    return point.as_dict()


@st.cache_data(show_spinner=False)
def compute_memory(hw_name: str, model_name: str, batch: int, instances: int, block_size: int,
                   weight_dtype: str, kv_dtype: str, utilization: float, engine: str, tp: int = 1) -> dict:
    """One instance's memory plan (one device's, under tensor parallelism), with the engine
    settings analytical_point uses for it."""
    cfg = instance_engine(batch=batch, block_size=block_size, weight_dtype=weight_dtype,
                          kv_dtype=kv_dtype, utilization=utilization, profile=engine, tp=tp)
    plan = instance_setup(load_hardware(hw_name), load_model(model_name), cfg, instances).plan
    d = plan.as_dict()
    d.update(device_bytes=plan.device_bytes, usable_bytes=plan.usable_bytes,
             weight_bytes=plan.weight_bytes, activation_bytes=plan.activation_bytes,
             reserve_bytes=plan.reserve_bytes,
             kv_blocks_bytes=plan.num_blocks * plan.block_bytes if plan.fits else 0.0)
    return d


@st.cache_data(show_spinner=False)
def compute_ops(hw_name: str, model_name: str, batch: int, context: int, instances: int, sharing: str,
                block_size: int, weight_dtype: str, kv_dtype: str, engine: str, tp: int = 1) -> tuple[list[dict], dict]:
    """The ops of one decode iteration of one instance, priced as analytical_point prices them
    (every sequence holds context + 1 tokens and reads every slot of its pages), and the ceilings
    of the hardware the instance runs on (the device, or its vNPU partition)."""
    cfg = instance_engine(batch=batch, block_size=block_size, weight_dtype=weight_dtype,
                          kv_dtype=kv_dtype, utilization=0.9, profile=engine, tp=tp)
    setup = instance_setup(load_hardware(hw_name), load_model(model_name), cfg, instances, sharing)
    ops = setup.cost.ops(**decode_batch(batch=batch, context=context, block_size=block_size))
    h = setup.hw
    # the roof the linear layers compute under: weight-only int8/int4 dequantise to the 16-bit units
    peak = h.matmul_tflops(weight_dtype)
    roofs = {"matmul_tflops": peak, "vector_tflops": h.vector_tflops, "bandwidth_gbs": h.streaming_gbs,
             "name": h.name}
    return [op.as_dict() for op in ops], roofs


@st.cache_data(show_spinner=False)
def compute_ttft(hw_name: str, model_name: str, context: int, instances: int, sharing: str, block_size: int,
                 weight_dtype: str, kv_dtype: str, utilization: float, engine: str, tp: int = 1) -> dict:
    return unloaded_ttft(hw_name, model_name, prompt=context, instances=instances, sharing=sharing,
                         block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                         gpu_memory_utilization=utilization, engine=engine, tp=tp)


def log_spaced(top: int, count: int = 40) -> list[int]:
    """About `count` integers from 1 to `top`, evenly spaced on a log scale."""
    values = {1, top}
    for i in range(count):
        values.add(round(top ** (i / (count - 1))))
    return sorted(values)


@st.cache_data(show_spinner=False)
def compute_sweep(hw_name: str, model_name: str, context: int, instances: int, sharing: str,
                  block_size: int, weight_dtype: str, kv_dtype: str, utilization: float,
                  max_batch: int, chosen_batch: int, engine: str, tp: int = 1) -> list[dict]:
    """analytical_point at log-spaced batches from 1 to the largest batch memory allows."""
    hw, model = load_hardware(hw_name), load_model(model_name)
    settings = dict(block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                    gpu_memory_utilization=utilization, engine=engine, tp=tp)
    reference = reference_point(hw, model, context=context, **settings)
    batches = log_spaced(max_batch)
    if chosen_batch <= max_batch and chosen_batch not in batches:
        batches = sorted(batches + [chosen_batch])
    return [analytical_point(hw, model, batch=b, context=context, instances=instances, sharing=sharing,
                             reference=reference, **settings).as_dict() for b in batches]


@st.cache_resource(show_spinner=False, max_entries=8)
def simulate(hw_name: str, model_name: str, instances: int, sharing: str, block_size: int,
             weight_dtype: str, kv_dtype: str, utilization: float, max_num_seqs: int, requests: int,
             prompt: int, output: int, rate: float, lengths: str, engine: str, trace: str | None, tp: int = 1):
    """(the `simulate --json` result, the run record): the record feeds the report's figures."""
    import time

    from npusim.scenario import Scenario, simulate_scenario, summarize
    from npusim.workload import LengthDist, WorkloadSpec

    if trace is not None:
        workload = WorkloadSpec(trace=trace, num_requests=requests)
    else:
        if lengths == "fixed":
            input_len, output_len = LengthDist(kind="fixed", value=prompt), LengthDist(kind="fixed", value=output)
        else:
            input_len = LengthDist(kind="lognormal", mean=prompt, cv=1.0, low=1, high=max(prompt * 8, 16))
            output_len = LengthDist(kind="lognormal", mean=output, cv=1.0, low=1, high=max(output * 8, 16))
        workload = WorkloadSpec(num_requests=requests, rate=rate, input_len=input_len, output_len=output_len)
    scenario = Scenario(
        hw=hw_name, model=model_name, instances=instances, sharing=sharing, workload=workload,
        engine=EngineConfig(profile=engine, block_size=block_size, gpu_memory_utilization=utilization,
                            weight_dtype=weight_dtype, kv_dtype=kv_dtype, max_num_seqs=max_num_seqs,
                            tensor_parallel_size=tp))
    t0 = time.perf_counter()
    run = simulate_scenario(scenario, want_block_map=True)
    if not run.completed:
        why = run.rejected[0][1] if run.rejected else "nothing was scheduled"
        raise NpusimError(f"no request completed: all {len(run.rejected)} were rejected; the first: {why}")
    result = summarize(run, scenario)
    result["wall_seconds"] = time.perf_counter() - t0
    return result, run


@st.cache_data(show_spinner=False, max_entries=8)
def find_capacity(fixed: tuple, grid: tuple, slo: tuple, requests: int) -> dict:
    from npusim.sweep import capacity, parse_grid

    g = parse_grid({k: ",".join(map(str, v)) for k, v in grid})
    data = {}
    flags = dict(fixed)
    return capacity(data, {"seed": None, **flags}, g, dict(slo), requests=requests, workers=1)


# --------------------------------------------------------------------------- uploads

def save_upload(kind: str, upload) -> str:
    """An uploaded file saved under the temporary folder (by its content's hash, never executed);
    returns its path. Refuses files over the size limit."""
    data = upload.getvalue()
    limit = UPLOAD_LIMIT_BYTES[kind]
    if len(data) > limit:
        raise NpusimError(f"{upload.name}: {len(data) / 2**20:.1f} MiB is over the {limit / 2**20:.0f} MiB "
                          f"limit for a {kind} file")
    folder = Path(tempfile.gettempdir()) / "npusim-uploads" / hashlib.sha256(data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(upload.name).name
    if kind == "model" and name != "config.json":
        name = Path(name).stem + ".json"
    path = folder / name
    path.write_bytes(data)
    return str(path)


def uploads(sb) -> tuple[list[str], list[str]]:
    """Hardware profiles and model configs the user uploaded, checked by the CLI's own loaders."""
    hw_paths, model_paths = [], []
    with sb.expander("Your own hardware or model"):
        for kind, label, types, loader, paths in (
                ("hardware", "Hardware profile (.yaml)", ["yaml", "yml"], load_hardware, hw_paths),
                ("model", "Hugging Face config.json", ["json"], load_model, model_paths)):
            up = st.file_uploader(label, type=types, key=f"upload_{kind}")
            if up is None:
                continue
            try:
                path = save_upload(kind, up)
                loader(path)
            except NpusimError as e:
                st.error(f"{kind} file not used: {e}")
                continue
            paths.append(path)
            st.caption(f"{up.name}: loaded, now in the {kind} list")
    return hw_paths, model_paths


def short(name: str) -> str:
    """A hardware or model choice as shown: an uploaded file by its name."""
    return f"uploaded: {Path(name).name}" if "/" in name else name


# --------------------------------------------------------------------------- sidebar and URL

def init_state() -> None:
    """Defaults go into session state once, so widgets are created without `value=` and a
    setting the user made survives reruns; on the first run, the URL's settings win."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    if st.session_state.get("_url_read"):
        return
    st.session_state["_url_read"] = True
    problems = []
    for key in st.query_params:
        if key not in URL_SETTINGS:
            problems.append(f"{key} is not a setting of this page")
            continue
        raw = st.query_params[key]
        try:
            st.session_state[key] = URL_SETTINGS[key](raw)
        except ValueError:
            problems.append(f"{key}={raw!r} is not a {URL_SETTINGS[key].__name__}")
    st.session_state["_url_problems"] = problems
    st.session_state["_hw_seen"] = st.session_state["hw"]  # (the URL's engine and page hold for its device)


def _choice(key: str, options: list, default) -> None:
    """Keep a selectbox's state among its options; a value that is not (from the URL) is named."""
    if st.session_state.get(key) not in options:
        if key in st.query_params and st.session_state.get(key) is not None:
            st.session_state.setdefault("_url_problems", []).append(
                f"{key}={st.session_state[key]!r} is not one of the choices; using {default!r}")
        st.session_state[key] = default


def sidebar() -> dict:
    sb = st.sidebar
    sb.header("Configuration")
    hw_uploads, model_uploads = uploads(sb)
    hw_names = known_hardware() + hw_uploads
    _choice("hw", hw_names, DEFAULTS["hw"])
    hw_name = sb.selectbox("Hardware", hw_names, key="hw", format_func=short)
    device_engine = load_hardware(hw_name).default_engine
    if st.session_state.get("_hw_seen") != hw_name:
        # A new device: its own engine and that engine's recommended page, so that the result
        # never depends on the order of clicks.
        st.session_state["_hw_seen"] = hw_name
        st.session_state["engine"] = device_engine
        st.session_state.pop("block_size", None)
    engines = known_engines()
    _choice("engine", engines, device_engine)
    engine = sb.selectbox("Engine", engines, key="engine",
                          help=f"how the implementation runs the model (kernels, host, page sizes); "
                               f"{hw_name}'s default is {device_engine}")
    model_names = list(MODEL_ZOO) + model_uploads
    _choice("model", model_names, DEFAULTS["model"])
    model_name = sb.selectbox("Model", model_names, key="model", format_func=short)
    _choice("weight_dtype", list(WEIGHT_DTYPES), "bf16")
    weight_dtype = sb.selectbox("Weight dtype", WEIGHT_DTYPES, key="weight_dtype",
                                help="int8/int4: weight-only quantisation of the linear layers; w8a8: int8 "
                                     "weights and activations on the int8 matrix units (Ascend's W8A8); fp8: "
                                     "W8A8 on FP8 tensor cores where the device has them")
    _choice("kv_dtype", list(KV_DTYPES), "bf16")
    kv_dtype = sb.selectbox("KV-cache dtype", KV_DTYPES, key="kv_dtype")
    options, recommended = block_size_options(engine)
    _choice("block_size", options, recommended)
    block_size = sb.selectbox("KV block size (tokens per page)", options, key="block_size",
                              help=f"the sizes {engine}'s attention kernels accept; recommended {recommended}")
    batch = sb.number_input("Batch (sequences per instance)", min_value=1, max_value=8192, step=1, key="batch")
    context = sb.number_input("Context (tokens per sequence)", min_value=1, max_value=131072, step=256,
                              key="context")
    instances = sb.slider("Instances on the device", min_value=1, max_value=4, key="instances")
    node = load_hardware(hw_name).node_devices
    if int(st.session_state.get("tp", 1)) > node:
        st.session_state["tp"] = 1
    tp = sb.number_input("Devices per instance (tensor parallel)", min_value=1, max_value=node, step=1, key="tp",
                         help=f"one instance over this many of the node's {node} devices; with more than one, "
                              f"instances stay at 1 (an instance spanning devices does not share them)")
    _choice("sharing", list(SHARING_MODES), "time-slice")
    sharing = sb.selectbox("Sharing", SHARING_MODES, key="sharing",
                           help="time-slice: instances take turns on all cores; vnpu: each gets "
                                "1/K of the cores and their share of bandwidth. Memory is split "
                                "1/K either way.")
    utilization = sb.slider("gpu_memory_utilization", min_value=0.50, max_value=1.00, step=0.01,
                            key="gpu_memory_utilization")
    s = dict(hw_name=hw_name, engine=engine, model_name=model_name, weight_dtype=weight_dtype,
             kv_dtype=kv_dtype, block_size=int(block_size), batch=int(batch), context=int(context),
             instances=int(instances), sharing=sharing, utilization=float(utilization), tp=int(tp))
    url = {"hw": hw_name, "engine": engine, "model": model_name, "weight_dtype": weight_dtype,
           "kv_dtype": kv_dtype, "block_size": s["block_size"], "batch": s["batch"], "context": s["context"],
           "instances": s["instances"], "tp": s["tp"], "sharing": sharing, "gpu_memory_utilization": s["utilization"]}
    st.query_params.from_dict({k: str(v) for k, v in url.items() if "/" not in str(v)})  # (uploads stay local)
    return s


def point_of(s: dict, **change) -> dict:
    s = {**s, **change}
    return compute_point(s["hw_name"], s["model_name"], s["batch"], s["context"], s["instances"], s["sharing"],
                         s["block_size"], s["weight_dtype"], s["kv_dtype"], s["utilization"], s["engine"], s["tp"])


# --------------------------------------------------------------------------- the decode view

def headline(p: dict, mem: dict, s: dict) -> None:
    each = " per instance" if s["instances"] > 1 else ""
    top, bottom = st.columns(4), st.columns(4)
    if p["feasible"]:
        top[0].metric("Decode tok/s", f"{p['tokens_per_s']:,.1f}",
                      help="output tokens per second, all instances together, steady-state decode")
        top[1].metric("TPOT (ms)", f"{p['tpot_ms']:.2f}",
                      help=f"time between two tokens of one sequence; includes "
                           f"{p['host_ms']:.2f} ms host overhead per iteration")
        top[2].metric("Bound", p["bound"], help=p["regime"])
        t = compute_ttft(s["hw_name"], s["model_name"], s["context"], s["instances"], s["sharing"], s["block_size"],
                         s["weight_dtype"], s["kv_dtype"], s["utilization"], s["engine"], s["tp"])
        top[3].metric("TTFT, unloaded (ms)", f"{t['ttft_ms']:,.1f}",
                      help=f"one {s['context']}-token prompt alone on an idle instance: {t['iterations']} "
                           f"prefill iteration(s) of up to {t['chunk_tokens']} tokens; queueing under load "
                           f"adds to it (Simulate tab)")
    each = " / instance" if s["instances"] > 1 else ""
    bottom[0].metric(f"Max batch{each}", f"{p['max_batch']:,}",
                     help=f"sequences of {s['context']} tokens the KV pool holds")
    bottom[1].metric("KV capacity / instance" if each else "KV capacity (tokens)", f"{p['num_blocks'] * s['block_size']:,}",
                     help=f"{p['num_blocks']} blocks of {s['block_size']} tokens = "
                          f"{gib(mem['kv_blocks_bytes']):.2f} GiB")
    bottom[2].metric("Weights (GiB)", f"{p['weights_gib']:.2f}", help=f"{s['weight_dtype']} weights of one instance")
    if p["feasible"]:
        st.success(f"Feasible: {p['regime']}. Iteration {p['iteration_ms']:.2f} ms "
                   f"(device {p['device_step_ms']:.2f} + host {p['host_ms']:.2f}); "
                   f"{p['ratio_to_proportional']:.2f}x the proportional law B·N_core/T.")
    else:
        st.error(f"Not feasible: {p['reason']}.")
        fits = what_fits(p, s)
        if fits:
            st.info("What would fit:\n" + "\n".join(f"- {line}" for line in fits))
    for note in p["notes"]:
        st.warning(note)


def what_fits(p: dict, s: dict) -> list[str]:
    """Nearby configurations that fit, with npusim's numbers, for a point that does not."""
    out = []
    if p["max_batch"] >= 1:
        out.append(f"batch {p['max_batch']:,} or fewer at context {s['context']:,}")
        blocks_each = p["num_blocks"] // s["batch"]
        if blocks_each >= 1:
            out.append(f"context {blocks_each * s['block_size'] - 1:,} or less at batch {s['batch']:,}")
    variants = [(f"{d} weights", dict(weight_dtype=d)) for d in ("int8", "int4", "w8a8") if d != s["weight_dtype"]]
    if s["kv_dtype"] != "int8":
        variants.append(("int8 KV cache", dict(kv_dtype="int8")))
    if s["instances"] > 1:
        variants.append(("one instance", dict(instances=1)))
    node = load_hardware(s["hw_name"]).node_devices
    for tp in (2, 4, 8):
        if tp > s["tp"] and tp <= node and s["instances"] == 1:
            variants.append((f"{tp} devices (tensor parallel)", dict(tp=tp)))
    for util in (0.95, 0.98):
        if util > s["utilization"]:
            variants.append((f"gpu_memory_utilization {util:g}", dict(utilization=util)))
    for label, change in variants:
        try:
            q = point_of(s, **change)
        except NpusimError:
            continue
        if q["feasible"]:
            out.append(f"{label}: fits, max batch {q['max_batch']:,}, {q['tokens_per_s']:,.0f} tokens/s at batch "
                       f"{s['batch']}")
    if len(out) < 3:  # other devices, with their own engine and recommended page
        for hw in known_hardware():
            if hw == s["hw_name"]:
                continue
            engine = load_hardware(hw).default_engine
            try:
                q = point_of(s, hw_name=hw, engine=engine, block_size=block_size_options(engine)[1])
            except NpusimError:
                continue
            if q["feasible"]:
                out.append(f"{hw} ({engine}): fits, {q['tokens_per_s']:,.0f} tokens/s, max batch {q['max_batch']:,}")
    return out[:6]


def ops_chart(ops: list[dict], p: dict, s: dict) -> go.Figure:
    df = pd.DataFrame(ops)
    df["GFLOP"] = df["flops"] / 1e9
    df["MB"] = df["bytes"] / 1e6
    fig = go.Figure()
    for bound, colour in BOUND_COLOURS.items():
        part = df[df["bound"] == bound]
        if part.empty:
            continue
        fig.add_bar(x=part["name"], y=part["time_ms"], name=bound, marker_color=colour,
                    customdata=part[["GFLOP", "MB", "kernels"]],
                    hovertemplate="%{x}: %{y:.3f} ms<br>%{customdata[0]:.2f} GFLOP, "
                                  "%{customdata[1]:,.1f} MB, %{customdata[2]} kernels<extra></extra>")
    fig.update_xaxes(categoryorder="array", categoryarray=list(df["name"]), tickangle=-60)
    fig.update_layout(title="Decode iteration by op", yaxis_title="ms (summed over layers)", height=400,
                      legend=dict(title=dict(text="bound ", side="left"), orientation="h", x=0, y=1.0,
                                  yanchor="bottom"),
                      margin=dict(t=70, b=10))
    return fig


def memory_chart(mem: dict, s: dict) -> go.Figure:
    weights, act, reserve = mem["weight_bytes"], mem["activation_bytes"], mem["reserve_bytes"]
    kv = mem["kv_blocks_bytes"]
    device = mem["device_bytes"]
    parts = {"weights": weights, "activations": act, "runtime reserve": reserve, "KV pool": kv,
             "free": max(0.0, device - weights - act - reserve - kv)}
    row = "one instance" if s["instances"] > 1 else "device"
    fig = go.Figure()
    for name, nbytes in parts.items():
        fig.add_bar(y=[row], x=[gib(nbytes)], name=name, orientation="h", marker_color=MEMORY_COLOURS[name],
                    hovertemplate=f"{name}: %{{x:.2f}} GiB<extra></extra>")
    fig.add_vline(x=gib(mem["usable_bytes"]), line_dash="dash")
    fig.add_vline(x=gib(device), line_color="black")
    fig.update_layout(barmode="stack", title="Memory (GiB)", height=300, margin=dict(t=60, b=10),
                      legend=dict(orientation="h", x=0, y=-0.25, yanchor="top"))
    return fig


def _log_ticks(top: float) -> list[int]:
    ticks, base = [], 1
    while base <= top * 1.01:
        ticks += [t for t in (base, 2 * base, 5 * base) if t <= top * 1.01]
        base *= 10
    return ticks


def sweep_chart(rows: list[dict], p: dict, s: dict, pinned: list[dict] | None = None) -> go.Figure:
    df = pd.DataFrame([r for r in rows if r["feasible"]])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=df["batch"], y=df["tokens_per_s"], name="throughput (tokens/s)", mode="lines+markers",
                    line=dict(color=THROUGHPUT_COLOUR), customdata=df[["regime"]],
                    hovertemplate="B=%{x}: %{y:,.0f} tokens/s<br>%{customdata[0]}<extra></extra>")
    fig.add_scatter(x=df["batch"], y=df["tpot_ms"], name="TPOT (ms, right axis)", mode="lines+markers",
                    secondary_y=True, line=dict(color=TPOT_COLOUR, dash="dash"),
                    hovertemplate="B=%{x}: %{y:.2f} ms<extra></extra>")
    if pinned:
        a = pd.DataFrame([r for r in pinned if r["feasible"]])
        if not a.empty:
            fig.add_scatter(x=a["batch"], y=a["tokens_per_s"], name="A: throughput", mode="lines",
                            line=dict(color="#9467bd"))
    # Vertical markers are drawn as line traces: add_vline's annotations land in the wrong place
    # on a log axis (plotly.py issue #2580).
    top = float(df["tokens_per_s"].max())
    fig.add_scatter(x=[p["max_batch"], p["max_batch"]], y=[0, top], mode="lines",
                    line=dict(color="red", dash="dot"), name=f"memory caps B at {p['max_batch']}")
    kv_bound = df[df["regime"].str.startswith("memory-bound on KV")]
    if not kv_bound.empty:
        first = int(kv_bound["batch"].iloc[0])
        fig.add_scatter(x=[first, first], y=[0, top], mode="lines", line=dict(color="grey", dash="dot"),
                        name=f"KV reads outweigh weights from B≈{first}")
    if p["feasible"]:
        fig.add_scatter(x=[s["batch"]], y=[p["tokens_per_s"]], mode="markers", name="your batch",
                        marker=dict(size=14, symbol="star", color="black"))
    ticks = _log_ticks(float(df["batch"].max()))
    fig.update_xaxes(type="log", title="batch (sequences per instance)", tickvals=ticks,
                     ticktext=[f"{t:,}" for t in ticks])
    fig.update_yaxes(title_text="tokens/s (all instances)", secondary_y=False, rangemode="tozero",
                     title_font_color=THROUGHPUT_COLOUR)
    fig.update_yaxes(title_text="TPOT (ms)", secondary_y=True, rangemode="tozero", tickmode="auto",
                     showgrid=False, title_font_color=TPOT_COLOUR)
    fig.update_layout(title=f"Throughput and TPOT against batch at context {s['context']}", height=460,
                      margin=dict(t=50, b=10), legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"))
    return fig


def decode_section(s: dict) -> dict:
    p = point_of(s)
    mem = compute_memory(s["hw_name"], s["model_name"], s["batch"], s["instances"], s["block_size"],
                         s["weight_dtype"], s["kv_dtype"], s["utilization"], s["engine"], s["tp"])
    headline(p, mem, s)
    left, right = st.columns(2)
    with left:
        if p["feasible"]:
            ops, _ = compute_ops(s["hw_name"], s["model_name"], s["batch"], s["context"], s["instances"],
                                 s["sharing"], s["block_size"], s["weight_dtype"], s["kv_dtype"], s["engine"], s["tp"])
            st.plotly_chart(ops_chart(ops, p, s), width="stretch", key="ops_chart")
            where = "one instance's " if s["instances"] > 1 else ""
            st.caption(f"{where}decode iteration, B={s['batch']} x {s['context']} tokens: device "
                       f"{p['device_step_ms']:.2f} ms + host {p['host_ms']:.2f} ms ({s['engine']})")
        else:
            st.info("No per-op breakdown: the configuration does not run as set.")
    with right:
        st.plotly_chart(memory_chart(mem, s), width="stretch", key="memory_chart")
        share = f"One instance's 1/{s['instances']} of the device. " if s["instances"] > 1 else ""
        verdict = mem["verdict"][:1].upper() + mem["verdict"][1:]
        st.caption(f"{share}Usable {gib(mem['usable_bytes']):.1f} of {gib(mem['device_bytes']):.1f} GiB (dashed "
                   f"line: gpu_memory_utilization). {verdict}")
    rows = None
    if p["max_batch"] >= 1:
        rows = compute_sweep(s["hw_name"], s["model_name"], s["context"], s["instances"], s["sharing"],
                             s["block_size"], s["weight_dtype"], s["kv_dtype"], s["utilization"],
                             p["max_batch"], s["batch"], s["engine"], s["tp"])
        pinned = st.session_state.get("pinned")
        st.plotly_chart(sweep_chart(rows, p, s, pinned["sweep"] if pinned else None), width="stretch",
                        key="sweep_chart")
    else:
        st.info(f"No batch sweep: not even one sequence of {s['context']} tokens fits.")
    return {"point": p, "sweep": rows}


# --------------------------------------------------------------------------- page size, roofline

def page_size_section(s: dict) -> None:
    options, recommended = block_size_options(s["engine"])
    rows = []
    for b in options:
        q = point_of(s, block_size=b)
        slots = ceil_div(s["context"] + 1, b) * b
        rows.append({"block": b, "waste": 1 - (s["context"] + 1) / slots, "tpot": q["tpot_ms"],
                     "max_batch": q["max_batch"], "feasible": q["feasible"]})
    df = pd.DataFrame(rows)
    if not df["feasible"].any():
        st.info("No page size makes this configuration fit: see the Decode tab for what would.")
        return
    labels = [f"{b}{' (rec.)' if b == recommended else ''}" for b in df["block"]]
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"KV padding: {s['context']} tokens + 1 being made", "TPOT (ms) at your batch", "Max batch that fits"))
    colours = ["#2ca02c" if b == recommended else "#7f7f7f" for b in df["block"]]
    fig.add_bar(x=labels, y=df["waste"] * 100, marker_color=colours, row=1, col=1,
                hovertemplate="%{x}: %{y:.2f} % of the slots<extra></extra>")
    fig.add_bar(x=labels, y=df["tpot"], marker_color=colours, row=1, col=2,
                hovertemplate="%{x}: %{y:.3f} ms<extra></extra>")
    fig.add_bar(x=labels, y=df["max_batch"], marker_color=colours, row=1, col=3,
                hovertemplate="%{x}: %{y:,} sequences<extra></extra>")
    fig.update_yaxes(title_text="% of allocated slots", row=1, col=1)
    fig.update_xaxes(title_text="page size (tokens)", type="category")
    fig.update_layout(height=380, showlegend=False, margin=dict(t=50, b=10))
    st.plotly_chart(fig, width="stretch", key="page_size_chart")
    st.caption(f"The page sizes {s['engine']}'s attention kernels accept (green: recommended). A sequence "
               f"leaves its last page partly empty; paged-attention kernels read whole pages, so padding "
               f"costs bandwidth in each decode step and memory that holds fewer sequences. Under real "
               f"traffic the mean padding is about half a page per sequence: `npusim kv-study` and "
               f"`npusim sweep --block-size ...` measure it on a workload.")


def roofline_section(s: dict, p: dict) -> None:
    if not p["feasible"]:
        st.info("No roofline: the configuration does not run as set.")
        return
    ops, roofs = compute_ops(s["hw_name"], s["model_name"], s["batch"], s["context"], s["instances"],
                             s["sharing"], s["block_size"], s["weight_dtype"], s["kv_dtype"], s["engine"], s["tp"])
    df = pd.DataFrame([o for o in ops if o["flops"] > 0 and o["bytes"] > 0 and o["time_ms"] > 0])
    df["intensity"] = df["flops"] / df["bytes"]
    df["tflops"] = df["flops"] / (df["time_ms"] / 1e3) / 1e12
    bw = roofs["bandwidth_gbs"] * 1e9
    x = [min(df["intensity"].min(), 0.1) / 2, max(df["intensity"].max(), 2e3) * 2]
    ridge = roofs["matmul_tflops"] * 1e12 / bw
    fig = go.Figure()
    fig.add_scatter(x=[x[0], ridge, x[1]], y=[x[0] * bw / 1e12, roofs["matmul_tflops"], roofs["matmul_tflops"]],
                    mode="lines", line=dict(color="black"), name=f"matmul peak {roofs['matmul_tflops']:g} TFLOP/s "
                                                                  f"and {roofs['bandwidth_gbs']:g} GB/s")
    fig.add_scatter(x=[x[0], roofs["vector_tflops"] * 1e12 / bw, x[1]],
                    y=[x[0] * bw / 1e12, roofs["vector_tflops"], roofs["vector_tflops"]], mode="lines",
                    line=dict(color="grey", dash="dot"), name=f"vector peak {roofs['vector_tflops']:g} TFLOP/s")
    df = df.sort_values("intensity")
    total = df["time_ms"].sum()  # (ops under 3 % of the time are drawn, labelled on hover only)
    spots = ("top center", "bottom center", "middle right", "middle left")  # (neighbours' labels apart)
    df["where"] = [spots[i % len(spots)] for i in range(len(df))]
    for bound, colour in BOUND_COLOURS.items():
        part = df[df["bound"] == bound]
        if not part.empty:
            labels = [n if t >= 0.03 * total else "" for n, t in zip(part["name"], part["time_ms"])]
            fig.add_scatter(x=part["intensity"], y=part["tflops"], mode="markers+text", text=labels,
                            customdata=part["name"], textposition=list(part["where"]), textfont=dict(size=10),
                            marker=dict(size=9, color=colour), name=f"{bound}-bound ops",
                            hovertemplate="%{customdata}: %{x:.2f} FLOP/byte, %{y:.2f} TFLOP/s<extra></extra>")
    fig.update_xaxes(type="log", dtick=1, title="arithmetic intensity (FLOP per byte moved)")
    fig.update_yaxes(type="log", dtick=1, title="attained TFLOP/s")
    fig.update_layout(title=f"Roofline of one decode iteration on {roofs['name']}", height=520,
                      margin=dict(t=50, b=10), legend=dict(orientation="h", x=0, y=-0.15, yanchor="top"))
    st.plotly_chart(fig, width="stretch", key="roofline_chart")
    st.caption("Each op at the FLOPs and bytes the cost model charges it and the time it prices: ops far "
               "below both ceilings pay fixed kernel costs (latency), not work. Ops with no FLOPs (copies, "
               "KV writes, collectives) are not drawn; ops under 3 % of the iteration are named on hover.")


# --------------------------------------------------------------------------- compare

COMPARED = (("Decode throughput (tokens/s)", "tokens_per_s", ",.1f"), ("TPOT (ms)", "tpot_ms", ".2f"),
            ("Iteration (ms)", "iteration_ms", ".2f"), ("Max batch that fits", "max_batch", ",d"),
            ("KV blocks per instance", "num_blocks", ",d"), ("Weights (GiB)", "weights_gib", ".2f"))


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def compare_section(s: dict, current: dict) -> None:
    p = current["point"]
    if st.button("Pin this configuration as A", key="pin"):
        st.session_state["pinned"] = {"settings": s, "point": p, "sweep": current["sweep"]}
    pinned = st.session_state.get("pinned")
    if pinned:
        a, sa = pinned["point"], pinned["settings"]
        changed = [k for k in s if s[k] != sa[k]]
        st.caption("A: " + ", ".join(f"{k} {sa[k]}" for k in sa) + ". B (now): "
                   + (", ".join(f"{k} {s[k]}" for k in changed) or "the same settings") + ".")
        rows = []
        for label, key, spec in COMPARED:
            va, vb = a.get(key), p.get(key)
            diff = (f"{(vb - va) / va:+.1%}" if va not in (None, 0) and vb is not None else "")
            rows.append((label, _cell(va, spec), _cell(vb, spec), diff))
        rows.append(("Bound", a["bound"] or "does not fit", p["bound"] or "does not fit", ""))
        st.dataframe(pd.DataFrame(rows, columns=["metric", "A (pinned)", "B (now)", "B vs A"]), hide_index=True,
                     width="stretch", key="compare_table")
        st.caption("The batch chart on the Decode tab overlays A's throughput.")
    else:
        st.caption("Pin the current configuration, change the settings, and see the new one beside it.")
    st.subheader(f"One instance, two time-sliced, two vNPUs: {s['model_name']} on {short(s['hw_name'])}")
    rows = []
    for label, instances, sharing in (("1 instance", 1, "time-slice"), ("2 instances, time-sliced", 2, "time-slice"),
                                      ("2 vNPUs", 2, "vnpu")):
        try:
            q = point_of(s, instances=instances, sharing=sharing)
        except NpusimError as e:  # (e.g. two instances of an instance spanning devices)
            rows.append((label, "no", "n/a", "n/a", "n/a", str(e)))
            continue
        rows.append((label, "yes" if q["feasible"] else "no", _cell(q["tokens_per_s"], ",.1f"),
                     _cell(q["tpot_ms"], ".2f"), _cell(q["max_batch"], ",d"), q["reason"] or q["regime"]))
    st.dataframe(pd.DataFrame(rows, columns=["layout", "fits", "tokens/s (all)", "TPOT (ms)",
                                             "max batch per instance", "why"]),
                 hide_index=True, width="stretch", key="sharing_table",
                 column_config={"why": st.column_config.TextColumn(width="large")})
    st.caption(f"Batch {s['batch']} per instance at context {s['context']} (two instances hold twice the "
               f"sequences of one), from the analytical model; the Capacity tab finds the load each one "
               f"sustains under an SLO.")


# --------------------------------------------------------------------------- simulate

def results_table(r: dict) -> pd.DataFrame:
    """Every number of the result (npusim.text: the CLI and the report show the same lines)."""
    from npusim.text import result_lines

    rows = [(line.section, line.label, line.text(thousands=True), line.unit) for line in result_lines(r)]
    return pd.DataFrame(rows, columns=["section", "metric", "value", "unit"])


def workload_inputs() -> dict:
    c1, c2 = st.columns(2)
    requests = c1.slider("Requests", min_value=10, max_value=500, step=10, key="sim_requests")
    rate = c1.slider("Arrival rate (requests/s, Poisson)", min_value=0.5, max_value=64.0, step=0.5,
                     key="sim_rate")
    lengths = c1.selectbox("Lengths", ("fixed", "lognormal"), key="sim_lengths",
                           help="lognormal: mean as set, CV 1, clipped to 8x the mean")
    prompt = c2.slider("Prompt tokens", min_value=16, max_value=8192, step=16, key="sim_prompt")
    output = c2.slider("Output tokens", min_value=1, max_value=2048, key="sim_output")
    trace = None
    up = c2.file_uploader("Or a trace CSV (arrived_at,num_prefill_tokens,num_decode_tokens)", type=["csv"],
                          key="upload_trace")
    if up is not None:
        from npusim.workload import read_trace
        try:
            trace = save_upload("trace", up)
            read_trace(trace, None)
            c2.caption(f"{up.name}: replayed at its own times (its first {requests} requests)")
        except NpusimError as e:
            c2.error(f"trace not used: {e}")
            trace = None
    return dict(requests=int(requests), rate=float(rate), lengths=lengths, prompt=int(prompt),
                output=int(output), trace=trace)


def simulate_section(s: dict) -> None:
    st.caption("Runs the discrete-event simulator on a workload with this configuration; the engine runs at "
               "most `batch` sequences per instance (max_num_seqs), so its activation reserve, and with it the "
               "KV block count, differ a little from the Decode tab's (which sizes for vLLM's 256). Results "
               "are keyed like `vllm bench serve`.")
    w = workload_inputs()
    args = (s["hw_name"], s["model_name"], s["instances"], s["sharing"], s["block_size"], s["weight_dtype"],
            s["kv_dtype"], s["utilization"], s["batch"], w["requests"], w["prompt"], w["output"], w["rate"],
            w["lengths"], s["engine"], w["trace"], s["tp"])
    if st.button("Run simulation", key="simulate"):
        try:
            with st.spinner("simulating..."):
                st.session_state["sim_result"] = (args, simulate(*args))
        except NpusimError as e:
            st.session_state.pop("sim_result", None)
            st.error(f"Cannot simulate: {e}")
    stored = st.session_state.get("sim_result")
    if stored is None or stored[0] != args:
        return
    r, run = stored[1]
    from npusim.report import report_figures, report_html
    from npusim.sweep import flatten
    from npusim.text import overload_warning

    warning = overload_warning(r)
    if warning:
        st.warning(f"Overloaded: {warning.split(': ', 1)[1]}")
    if r["rejected"]:
        st.warning(f"{len(r['rejected'])} of {r['completed'] + len(r['rejected'])} requests rejected: "
                   f"{r['rejected'][0]['reason']}")
    cols = st.columns(4)
    cols[0].metric("Output throughput (tokens/s)", f"{r['output_throughput']:,.1f}")
    cols[1].metric("p99 TTFT (ms)", f"{r['p99_ttft_ms']:,.1f}")
    cols[2].metric("p99 TPOT (ms)", f"{r['p99_tpot_ms']:,.2f}" if r["p99_tpot_ms"] is not None else "n/a")
    cols[3].metric("KV waste (mean)", f"{r['kv_cache']['mean_waste_fraction']:.1%}")
    for i, fig in enumerate(report_figures(run)):
        st.plotly_chart(fig, width="stretch", key=f"sim_fig_{i}")
    table = results_table(r)
    st.dataframe(table, hide_index=True, width="stretch", height=35 * (len(table) + 1) + 3, key="sim_table",
                 column_config={"value": st.column_config.TextColumn(width="large")})
    d1, d2, d3 = st.columns(3)
    d1.download_button("Download JSON", json.dumps(r, indent=2), file_name="npusim-result.json",
                       mime="application/json", key="dl_json")
    d2.download_button("Download CSV", pd.DataFrame([flatten(r)]).to_csv(index=False), file_name="npusim-result.csv",
                       mime="text/csv", key="dl_csv")
    d3.download_button("Download HTML report", report_html(r, run), file_name="npusim-report.html",
                       mime="text/html", key="dl_html")
    st.caption(f"simulated in {r['wall_seconds']:.2f} s of wall time; max_model_len {r['max_model_len']:,}")


# --------------------------------------------------------------------------- capacity

def capacity_section(s: dict) -> None:
    st.caption("The highest Poisson arrival rate at which the simulated p99s meet every SLO (`npusim capacity`), "
               "with the Simulate tab's lengths and max_num_seqs = batch.")
    c1, c2, c3 = st.columns(3)
    ttft = c1.number_input("SLO: p99 TTFT (ms)", min_value=1.0, value=2000.0, step=100.0, key="slo_ttft")
    tpot = c2.number_input("SLO: p99 TPOT (ms)", min_value=0.1, value=50.0, step=5.0, key="slo_tpot")
    requests = c3.number_input("Requests per run", min_value=100, max_value=2000, value=300, step=100,
                               key="cap_requests", help="the p99's stability: the note below says how stable")
    modes = st.checkbox("Compare 1 instance, 2 time-sliced and 2 vNPUs", value=True, key="cap_modes")
    if not st.button("Find the highest load", key="capacity"):
        stored = st.session_state.get("cap_result")
        if stored is None:
            return
        result = stored
    else:
        prompt, output = int(st.session_state["sim_prompt"]), int(st.session_state["sim_output"])
        fixed = (("hw", s["hw_name"]), ("model", s["model_name"]), ("engine", s["engine"]),
                 ("block_size", s["block_size"]), ("weight_dtype", s["weight_dtype"]), ("kv_dtype", s["kv_dtype"]),
                 ("gpu_memory_utilization", s["utilization"]), ("max_num_seqs", s["batch"]),
                 ("input_len", prompt), ("output_len", output), ("tp", s["tp"]))
        grid = (("instances", (1, 2)), ("sharing", ("time-slice", "vnpu"))) if modes else \
            (("instances", (s["instances"],)), ("sharing", (s["sharing"],)))
        try:
            with st.spinner("searching..."):
                result = find_capacity(fixed, grid, (("ttft", float(ttft)), ("tpot", float(tpot)), ("e2el", None)),
                                       int(requests))
        except NpusimError as e:
            st.error(f"Cannot search: {e}")
            return
        st.session_state["cap_result"] = result
    from npusim.sweep import capacity_figure, setting_text

    rows = [(setting_text(c["instances"]), setting_text(c["sharing"]), _cell(c["max_rate"], ",.3f"),
             _cell(c["ttft_p99_ms"], ",.1f"), _cell(c["tpot_p99_ms"], ",.2f"), _cell(c["output_throughput"], ",.1f"),
             c["bound_by"], c["reason"] or "") for c in result["configs"]]
    st.dataframe(pd.DataFrame(rows, columns=["instances", "sharing", "max rate (req/s)", "p99 TTFT ms", "p99 TPOT ms",
                                             "output tok/s", "bound by", "why"]),
                 hide_index=True, width="stretch", key="capacity_table",
                 column_config={"why": st.column_config.TextColumn(width="large")})
    best = result["best"]
    if best:
        named = ", ".join(part.replace("=", " ") for part in best["point"].split() if part.split("=")[0] in
                          ("instances", "sharing"))
        st.success(f"Most load: {named} sustains {best['max_rate']:.3f} req/s")
    else:
        reasons = [c["reason"] for c in result["configs"] if c["reason"]]
        st.error("No configuration meets the SLOs" + (f": {reasons[0]}" if reasons else "."))
    if any(c["evaluations"] for c in result["configs"]):
        st.plotly_chart(capacity_figure(result), width="stretch", key="capacity_chart")
        st.caption(result["requests_note"].replace("quadruple --requests", "quadruple the requests per run"))


# --------------------------------------------------------------------------- hardware

def _provenance_table(rows: list[tuple[str, str, str, str]], key: str) -> None:
    """A profile's numbers with their kinds and sources, every row shown."""
    st.dataframe(pd.DataFrame(rows, columns=["field", "value", "kind", "source"]), hide_index=True,
                 width="stretch", key=key, height=35 * (len(rows) + 1) + 3,
                 column_config={"source": st.column_config.TextColumn(width="large")})


def hardware_section(s: dict) -> None:
    from npusim.text import engine_rows, hardware_rows

    h = load_hardware(s["hw_name"])
    st.subheader(f"{h.name}: {h.description}")
    _provenance_table(hardware_rows(h), "hw_table")
    if h.calibration_files:
        st.markdown("**Calibrated from these measurements** (`hw_profiles/measurements/`): the device "
                    "tables price each op from them; `benchmarks/validate_steps.py` reports the error on "
                    "steps not used for fitting.")
        for name in h.calibration_files:  # (absolute: the loader resolves them against the profile)
            st.caption(f"{Path(name).name}: {_measurement_summary(Path(name))}")
    e = load_engine_profile(s["engine"])
    st.subheader(f"Engine {e.name} ({e.execution}): {e.description}")
    _provenance_table(engine_rows(e), "engine_table")


def _measurement_summary(path: Path) -> str:
    if not path.exists():
        return "file not found"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "not readable"
    counts = {k: len(v) for k, v in data.items() if isinstance(v, list) and v}
    device = data.get("device", {})
    name = device.get("name", "?") if isinstance(device, dict) else device
    return (f"{name}, {data.get('date', '?')}, {data.get('dtype', '?')}; measured points: "
            + ", ".join(f"{k} {n}" for k, n in counts.items()))


# --------------------------------------------------------------------------- page

def main() -> None:
    st.set_page_config(page_title="npusim what-if", layout="wide")
    init_state()
    settings = sidebar()
    st.title("npusim: what-if for LLM serving")
    st.caption(f"{short(settings['model_name'])} on {short(settings['hw_name'])} with {settings['engine']}: "
               f"{settings['instances']} instance(s), {settings['sharing']}, batch {settings['batch']}, context "
               f"{settings['context']}, page {settings['block_size']} tokens, weights {settings['weight_dtype']}, "
               f"KV {settings['kv_dtype']}. Steady-state decode from the analytical model; the settings are in "
               f"the URL.")
    for problem in st.session_state.get("_url_problems", []):
        st.warning(f"URL: {problem}")
    tabs = st.tabs(["Decode", "Page size", "Roofline", "Compare", "Simulate", "Capacity", "Hardware"])
    current = None
    try:
        with tabs[0]:
            current = decode_section(settings)
        with tabs[1]:
            page_size_section(settings)
        with tabs[2]:
            roofline_section(settings, current["point"])
        with tabs[3]:
            compare_section(settings, current)
    except NpusimError as e:
        st.error(f"Invalid configuration: {e}")
    with tabs[4]:
        simulate_section(settings)
    with tabs[5]:
        capacity_section(settings)
    with tabs[6]:
        hardware_section(settings)
    st.caption(PROVENANCE)


main()
