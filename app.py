"""npusim what-if dashboard: `streamlit run app.py`.

Pick a device, a model, dtypes, a KV page size, a batch, a context and how many instances share the
device; the page answers in well under a second from the analytical model (npusim.analysis), the
roofline cost model (npusim.costmodel) and the vLLM-style memory plan. The "Simulate" expander runs
the discrete-event simulator (npusim.scenario) on a small synthetic workload.

Every number shown comes from npusim; when a configuration does not fit, the page says why with
npusim's own numbers and shows no throughput.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from npusim.analysis import SHARING_MODES, analytical_point, decode_batch, instance_engine, reference_point
from npusim.costmodel import instance_setup
from npusim.errors import NpusimError
from npusim.scenario import Scenario, run_scenario
from npusim.specs import (KV_DTYPES, MODEL_ZOO, WEIGHT_DTYPES, EngineConfig, gib,
                          known_hardware, load_engine_profile, load_hardware, load_model)
from npusim.workload import LengthDist, WorkloadSpec

BLOCK_SIZE_CHOICES = (8, 16, 32, 64, 128, 256, 512)
BOUND_COLOURS = {"compute": "#d62728", "memory": "#1f77b4", "latency": "#7f7f7f"}
MEMORY_COLOURS = {"weights": "#1f77b4", "activations": "#ff7f0e", "runtime reserve": "#7f7f7f",
                  "KV pool": "#2ca02c", "free": "#d9d9d9"}
DEFAULTS = {
    "hw": "ascend-910b2",
    "model": "llama-3.1-8b",
    "weight_dtype": "bf16",
    "kv_dtype": "bf16",
    "batch": 32,
    "context": 2048,
    "instances": 1,
    "sharing": "time-slice",
    "gpu_memory_utilization": 0.9,
    "sim_requests": 200,
    "sim_prompt": 1024,
    "sim_output": 256,
    "sim_rate": 8.0,
    "sim_lengths": "fixed",
}
PROVENANCE = "Hardware numbers and their sources: `npusim hw show NAME`."


# --------------------------------------------------------------------------- cached computations
# Arguments are plain strings and numbers so that st.cache_data can hash them.

@st.cache_data(show_spinner=False)
def block_size_options(hw_name: str) -> tuple[list[int], int]:
    """The page sizes of BLOCK_SIZE_CHOICES the device's paged-attention kernels accept, and the
    device's recommended one."""
    rule = load_engine_profile(load_hardware(hw_name).default_engine).kv_block_sizes
    options = [b for b in BLOCK_SIZE_CHOICES if rule.accepts(b)]
    if rule.recommended not in options:
        options = sorted(options + [rule.recommended])
    return options, rule.recommended


@st.cache_data(show_spinner=False)
def compute_point(hw_name: str, model_name: str, batch: int, context: int, instances: int,
                  sharing: str, block_size: int, weight_dtype: str, kv_dtype: str,
                  utilization: float) -> dict:
    point = analytical_point(hw_name, model_name, batch=batch, context=context, instances=instances,
                             sharing=sharing, block_size=block_size, weight_dtype=weight_dtype,
                             kv_dtype=kv_dtype, gpu_memory_utilization=utilization)
    return point.as_dict()


@st.cache_data(show_spinner=False)
def compute_memory(hw_name: str, model_name: str, batch: int, instances: int, block_size: int,
                   weight_dtype: str, kv_dtype: str, utilization: float) -> dict:
    """One instance's memory plan, with the engine settings analytical_point uses for it."""
    engine = instance_engine(batch=batch, block_size=block_size, weight_dtype=weight_dtype,
                             kv_dtype=kv_dtype, utilization=utilization)
    plan = instance_setup(load_hardware(hw_name), load_model(model_name), engine, instances).plan
    d = plan.as_dict()
    d.update(device_bytes=plan.device_bytes, usable_bytes=plan.usable_bytes,
             weight_bytes=plan.weight_bytes, activation_bytes=plan.activation_bytes,
             reserve_bytes=plan.reserve_bytes,
             kv_blocks_bytes=plan.num_blocks * plan.block_bytes if plan.fits else 0.0)
    return d


@st.cache_data(show_spinner=False)
def compute_ops(hw_name: str, model_name: str, batch: int, context: int, instances: int, sharing: str,
                block_size: int, weight_dtype: str, kv_dtype: str) -> list[dict]:
    """The ops of one decode iteration of one instance, priced as analytical_point prices them:
    every sequence holds context + 1 tokens and reads every slot of its pages."""
    engine = instance_engine(batch=batch, block_size=block_size, weight_dtype=weight_dtype,
                             kv_dtype=kv_dtype, utilization=0.9)
    cost = instance_setup(load_hardware(hw_name), load_model(model_name), engine, instances, sharing).cost
    ops = cost.ops(**decode_batch(batch=batch, context=context, block_size=block_size))
    return [op.as_dict() for op in ops]


def log_spaced(top: int, count: int = 40) -> list[int]:
    """About `count` integers from 1 to `top`, evenly spaced on a log scale."""
    values = {1, top}
    for i in range(count):
        values.add(round(top ** (i / (count - 1))))
    return sorted(values)


@st.cache_data(show_spinner=False)
def compute_sweep(hw_name: str, model_name: str, context: int, instances: int, sharing: str,
                  block_size: int, weight_dtype: str, kv_dtype: str, utilization: float,
                  max_batch: int, chosen_batch: int) -> list[dict]:
    """analytical_point at log-spaced batches from 1 to the largest batch memory allows."""
    hw, model = load_hardware(hw_name), load_model(model_name)
    settings = dict(block_size=block_size, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                    gpu_memory_utilization=utilization)
    reference = reference_point(hw, model, context=context, **settings)
    batches = log_spaced(max_batch)
    if chosen_batch <= max_batch and chosen_batch not in batches:
        batches = sorted(batches + [chosen_batch])
    rows = []
    for b in batches:
        p = analytical_point(hw, model, batch=b, context=context, instances=instances, sharing=sharing,
                             reference=reference, **settings)
        rows.append(p.as_dict())
    return rows


@st.cache_data(show_spinner=False)
def simulate(hw_name: str, model_name: str, instances: int, sharing: str, block_size: int,
             weight_dtype: str, kv_dtype: str, utilization: float, max_num_seqs: int, requests: int,
             prompt: int, output: int, rate: float, lengths: str) -> dict:
    if lengths == "fixed":
        input_len = LengthDist(kind="fixed", value=prompt)
        output_len = LengthDist(kind="fixed", value=output)
    else:
        input_len = LengthDist(kind="lognormal", mean=prompt, cv=1.0, low=1, high=max(prompt * 8, 16))
        output_len = LengthDist(kind="lognormal", mean=output, cv=1.0, low=1, high=max(output * 8, 16))
    scenario = Scenario(
        hw=hw_name, model=model_name, instances=instances, sharing=sharing,
        engine=EngineConfig(block_size=block_size, gpu_memory_utilization=utilization,
                            weight_dtype=weight_dtype, kv_dtype=kv_dtype, max_num_seqs=max_num_seqs),
        workload=WorkloadSpec(num_requests=requests, rate=rate, input_len=input_len,
                              output_len=output_len))
    result = run_scenario(scenario)
    result.pop("per_instance", None)
    return result


# --------------------------------------------------------------------------- sidebar

def init_state() -> None:
    """Defaults go into session state once, so widgets are created without `value=` and a
    setting the user made survives reruns."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)


def sidebar() -> dict:
    hw_names = known_hardware()
    if st.session_state["hw"] not in hw_names:
        st.session_state["hw"] = hw_names[0]
    sb = st.sidebar
    sb.header("Configuration")
    hw_name = sb.selectbox("Hardware", hw_names, key="hw")
    model_name = sb.selectbox("Model", list(MODEL_ZOO), key="model")
    weight_dtype = sb.selectbox("Weight dtype", WEIGHT_DTYPES, key="weight_dtype",
                                help="int8/int4: weight-only quantisation of the linear layers")
    kv_dtype = sb.selectbox("KV-cache dtype", KV_DTYPES, key="kv_dtype")
    options, recommended = block_size_options(hw_name)
    if st.session_state.get("block_size") not in options:
        st.session_state["block_size"] = recommended
    block_size = sb.selectbox("KV block size (tokens per page)", options, key="block_size",
                              help=f"only sizes {hw_name}'s paged-attention kernels accept; "
                                   f"recommended {recommended}")
    batch = sb.number_input("Batch (sequences per instance)", min_value=1, max_value=8192, step=1,
                            key="batch")
    context = sb.number_input("Context (tokens per sequence)", min_value=1, max_value=131072, step=256,
                              key="context")
    instances = sb.slider("Instances on the device", min_value=1, max_value=4, key="instances")
    sharing = sb.selectbox("Sharing", SHARING_MODES, key="sharing",
                           help="time-slice: instances take turns on all cores; vnpu: each gets "
                                "1/K of the cores and their share of bandwidth. Memory is split "
                                "1/K either way.")
    utilization = sb.slider("gpu_memory_utilization", min_value=0.50, max_value=1.00, step=0.01,
                            key="gpu_memory_utilization")
    return dict(hw_name=hw_name, model_name=model_name, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                block_size=int(block_size), batch=int(batch), context=int(context),
                instances=int(instances), sharing=sharing, utilization=float(utilization))


# --------------------------------------------------------------------------- main area

def headline(p: dict, mem: dict, s: dict) -> None:
    each = " per instance" if s["instances"] > 1 else ""
    cols = st.columns(5)
    if p["feasible"]:
        cols[0].metric("Decode throughput (tokens/s)", f"{p['tokens_per_s']:,.1f}",
                       help="all instances together, steady-state decode")
        cols[1].metric("TPOT (ms)", f"{p['tpot_ms']:.2f}",
                       help=f"time between two tokens of one sequence; includes "
                            f"{p['host_ms']:.2f} ms host overhead per iteration")
        cols[2].metric("Bound", p["bound"], help=p["regime"])
    cols[3].metric(f"Max batch that fits{each}", f"{p['max_batch']:,}",
                   help=f"sequences of {s['context']} tokens the KV pool holds")
    cols[4].metric(f"KV capacity{each} (tokens)", f"{p['num_blocks'] * s['block_size']:,}",
                   help=f"{p['num_blocks']} blocks of {s['block_size']} tokens = "
                        f"{gib(mem['kv_blocks_bytes']):.2f} GiB")
    if p["feasible"]:
        st.success(f"Feasible: {p['regime']}. Iteration {p['iteration_ms']:.2f} ms "
                   f"(device {p['device_step_ms']:.2f} + host {p['host_ms']:.2f}); "
                   f"{p['ratio_to_proportional']:.2f}x the proportional law B·N_core/T.")
    else:
        st.error(f"Not feasible: {p['reason']}.")
    for note in p["notes"]:
        st.warning(note)


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
    fig.update_xaxes(categoryorder="array", categoryarray=list(df["name"]))
    where = "one instance's " if s["instances"] > 1 else ""
    fig.update_layout(
        title=f"{where}decode iteration, B={s['batch']} x {s['context']} tokens: device "
              f"{p['device_step_ms']:.2f} ms + host {p['host_ms']:.2f} ms",
        yaxis_title="ms (summed over layers)", legend_title="bound", height=380,
        margin=dict(t=50, b=10))
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
        fig.add_bar(y=[row], x=[gib(nbytes)], name=name, orientation="h",
                    marker_color=MEMORY_COLOURS[name],
                    hovertemplate=f"{name}: %{{x:.2f}} GiB<extra></extra>")
    fig.add_vline(x=gib(mem["usable_bytes"]), line_dash="dash",
                  annotation_text=f"usable {gib(mem['usable_bytes']):.1f} GiB",
                  annotation_position="top left")
    fig.add_vline(x=gib(device), line_color="black",
                  annotation_text=f"{gib(device):.1f} GiB", annotation_position="top right")
    share = f" (1/{s['instances']} of the device each)" if s["instances"] > 1 else ""
    fig.update_layout(barmode="stack", title=f"Memory{share}", xaxis_title="GiB", height=260,
                      margin=dict(t=60, b=10), legend_orientation="h")
    return fig


def sweep_chart(rows: list[dict], p: dict, s: dict) -> go.Figure:
    df = pd.DataFrame([r for r in rows if r["feasible"]])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=df["batch"], y=df["tokens_per_s"], name="throughput (tokens/s)", mode="lines+markers",
                    customdata=df[["regime"]],
                    hovertemplate="B=%{x}: %{y:,.0f} tokens/s<br>%{customdata[0]}<extra></extra>")
    fig.add_scatter(x=df["batch"], y=df["tpot_ms"], name="TPOT (ms)", mode="lines+markers",
                    secondary_y=True, hovertemplate="B=%{x}: %{y:.2f} ms<extra></extra>")
    # Vertical markers are drawn as line traces: add_vline's annotations land in the wrong place
    # on a log axis (plotly.py issue #2580).
    top = float(df["tokens_per_s"].max())
    fig.add_scatter(x=[p["max_batch"], p["max_batch"]], y=[0, top], mode="lines",
                    line=dict(color="red", dash="dash"), name=f"memory caps B at {p['max_batch']}")
    kv_bound = df[df["regime"].str.startswith("memory-bound on KV")]
    if not kv_bound.empty:
        first = int(kv_bound["batch"].iloc[0])
        fig.add_scatter(x=[first, first], y=[0, top], mode="lines",
                        line=dict(color="grey", dash="dot"),
                        name=f"KV reads outweigh weights from B≈{first}")
    if p["feasible"]:
        fig.add_scatter(x=[s["batch"]], y=[p["tokens_per_s"]], mode="markers", name="your batch",
                        marker=dict(size=14, symbol="star", color="black"))
    fig.update_xaxes(type="log", title="batch (sequences per instance)")
    fig.update_yaxes(title_text="tokens/s (all instances)", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title_text="TPOT ms", secondary_y=True, rangemode="tozero")
    fig.update_layout(title=f"Throughput and TPOT vs batch at context {s['context']}", height=420,
                      margin=dict(t=50, b=10), legend_orientation="h")
    return fig


def analysis_section(s: dict) -> None:
    p = compute_point(s["hw_name"], s["model_name"], s["batch"], s["context"], s["instances"],
                      s["sharing"], s["block_size"], s["weight_dtype"], s["kv_dtype"], s["utilization"])
    mem = compute_memory(s["hw_name"], s["model_name"], s["batch"], s["instances"], s["block_size"],
                         s["weight_dtype"], s["kv_dtype"], s["utilization"])
    headline(p, mem, s)

    left, right = st.columns(2)
    with left:
        if p["feasible"]:
            ops = compute_ops(s["hw_name"], s["model_name"], s["batch"], s["context"], s["instances"],
                              s["sharing"], s["block_size"], s["weight_dtype"], s["kv_dtype"])
            st.plotly_chart(ops_chart(ops, p, s), width="stretch", key="ops_chart")
        else:
            st.info("No per-op breakdown: the configuration does not run as set.")
    with right:
        st.plotly_chart(memory_chart(mem, s), width="stretch", key="memory_chart")
        st.caption(mem["verdict"])

    if p["max_batch"] >= 1:
        rows = compute_sweep(s["hw_name"], s["model_name"], s["context"], s["instances"], s["sharing"],
                             s["block_size"], s["weight_dtype"], s["kv_dtype"], s["utilization"],
                             p["max_batch"], s["batch"])
        st.plotly_chart(sweep_chart(rows, p, s), width="stretch", key="sweep_chart")
    else:
        st.info(f"No batch sweep: not even one sequence of {s['context']} tokens fits.")


def results_table(r: dict) -> pd.DataFrame:
    """Every number of the result (npusim.text: the CLI and the report show the same lines)."""
    from npusim.text import result_lines

    rows = [(line.section, line.label, line.text(thousands=True), line.unit) for line in result_lines(r)]
    return pd.DataFrame(rows, columns=["section", "metric", "value", "unit"])


def simulate_section(s: dict) -> None:
    st.caption("Runs the discrete-event simulator on a synthetic workload with this configuration; "
               "the engine runs at most `batch` sequences per instance (max_num_seqs). Results are "
               "keyed like `vllm bench serve`.")
    c1, c2 = st.columns(2)
    requests = c1.slider("Requests", min_value=10, max_value=500, step=10, key="sim_requests")
    rate = c1.slider("Arrival rate (requests/s, Poisson)", min_value=0.5, max_value=64.0, step=0.5,
                     key="sim_rate")
    lengths = c1.selectbox("Lengths", ("fixed", "lognormal"), key="sim_lengths",
                           help="lognormal: mean as set, CV 1, clipped to 8x the mean")
    prompt = c2.slider("Prompt tokens", min_value=16, max_value=8192, step=16, key="sim_prompt")
    output = c2.slider("Output tokens", min_value=1, max_value=2048, key="sim_output")
    args = (s["hw_name"], s["model_name"], s["instances"], s["sharing"], s["block_size"],
            s["weight_dtype"], s["kv_dtype"], s["utilization"], s["batch"], int(requests), int(prompt),
            int(output), float(rate), lengths)
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
    r = stored[1]
    if r["rejected"]:
        st.warning(f"{len(r['rejected'])} of {requests} requests rejected: "
                   f"{r['rejected'][0]['reason']}")
    st.dataframe(results_table(r), hide_index=True, width="stretch")
    st.caption(f"simulated in {r['wall_seconds']:.2f} s of wall time; max_model_len {r['max_model_len']:,}")


def main() -> None:
    st.set_page_config(page_title="npusim what-if", layout="wide")
    init_state()
    settings = sidebar()
    st.title("npusim: what-if for LLM serving")
    st.caption(f"{settings['model_name']} on {settings['hw_name']}: {settings['instances']} "
               f"instance(s), {settings['sharing']}, batch {settings['batch']}, context "
               f"{settings['context']}, page {settings['block_size']} tokens, weights "
               f"{settings['weight_dtype']}, KV {settings['kv_dtype']}. Steady-state decode from the "
               f"analytical roofline model.")
    try:
        analysis_section(settings)
    except NpusimError as e:
        st.error(f"Invalid configuration: {e}")
    with st.expander("Simulate"):
        simulate_section(settings)
    st.caption(PROVENANCE)


main()
