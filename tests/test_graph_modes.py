"""vLLM's graph modes: which steps replay a captured graph, which run piecewise or eagerly, and
how large a step is captured (vLLM's cudagraph_mode and max_cudagraph_capture_size)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from npusim.costmodel import Batch, CostModel, instance_setup
from npusim.specs import EngineConfig, load_hardware, load_model, resolve_engine


def _cm(mode=None, capture=None, engine="vllm", model="llama-3.2-1b"):
    return CostModel(load_hardware("h200"), load_model(model), engine=engine, graph_mode=mode,
                     capture_tokens=capture)


@pytest.mark.parametrize("mode, decode, mixed, too_big", [
    ("full_and_piecewise", "graph", "piecewise", "eager"),
    ("full_decode_only", "graph", "eager", "eager"),
    ("full", "graph", "graph", "eager"),
    ("piecewise", "piecewise", "piecewise", "eager"),
    ("none", "eager", "eager", "eager"),
])
def test_each_mode_launches_steps_as_vllm_dispatches_them(mode, decode, mixed, too_big):
    cm = _cm(mode, 512)
    assert cm.launch_mode(512, has_prefill=False) == decode  # (the largest captured size itself)
    assert cm.launch_mode(300, has_prefill=True) == mixed
    assert cm.launch_mode(513, has_prefill=False) == too_big
    assert cm.launch_mode(513, has_prefill=True) == too_big


def test_engines_without_vllm_modes_launch_every_step_their_one_way():
    graph = _cm(engine="torch-graph")
    eager = _cm(engine="vllm-eager")
    for tokens, prefill in ((1, False), (10**5, False), (4096, True)):
        assert graph.launch_mode(tokens, prefill) == "graph"
        assert eager.launch_mode(tokens, prefill) == "eager"


def test_a_step_above_the_capture_size_pays_its_eager_launches_when_they_exceed_the_kernels():
    # a small model's decode is far shorter than launching its few hundred kernels one by one
    cm = _cm("full_and_piecewise", 16)
    b = Batch(num_decodes=32, decode_context_tokens=32 * 100, decode_kv_slots=32 * 112)
    device = cm.step_time(b.num_decodes, b.decode_context_tokens, b.decode_kv_slots)
    launches = cm.kernels_per_iteration(True, False) * cm.dispatch_s
    assert launches > device  # (the premise)
    _, held, _, host_bound = cm.price(b)
    assert held == pytest.approx(launches) and host_bound
    # captured (a larger capture size): one graph launch on top of the kernels
    _, held_graph, _, _ = _cm("full_and_piecewise", 32).price(b)
    assert held_graph == pytest.approx(device + cm.graph_launch_s)


def test_a_mixed_step_of_full_decode_only_runs_eagerly_and_of_the_default_piecewise():
    b = Batch(num_decodes=8, decode_context_tokens=8 * 500, decode_kv_slots=8 * 512, prefill_chunks=[(64, 0)])
    eager, piecewise = _cm("full_decode_only", 512), _cm("full_and_piecewise", 512)
    device = eager.step_time(8, 8 * 500, 8 * 512, [(64, 0)])
    L = eager.model.num_layers
    assert eager.price(b)[1] == pytest.approx(max(device, eager.kernels_per_iteration(True, True) * eager.dispatch_s))
    attention = L * (piecewise.kernels["attention_decode"] + piecewise.kernels["attention_prefill"])
    assert piecewise.price(b)[1] == pytest.approx(
        max(device, (L + 1) * piecewise.graph_launch_s + attention * piecewise.dispatch_s))


def test_price_agrees_with_host_times_on_both_sides_of_the_capture_size():
    cm = _cm("full_and_piecewise", 64)
    for n in (63, 64, 65):
        b = Batch(num_decodes=n, decode_context_tokens=n * 100, decode_kv_slots=n * 112)
        device = cm.step_time(n, n * 100, n * 112)
        assert cm.price(b)[:2] == pytest.approx(cm.host_times(n, device))


@pytest.mark.parametrize("engine, seqs, expected", [("vllm", 100, 200), ("vllm", 1024, 512),
                                                     ("vllm-ascend-graph", 100, 100), ("vllm-ascend-graph", 600, 512)])
def test_the_capture_size_defaults_as_vllm_and_vllm_ascend_size_it(engine, seqs, expected):
    hw = "h200" if engine == "vllm" else "ascend-910b3"
    _, cfg = resolve_engine(load_hardware(hw), EngineConfig(profile=engine, max_num_seqs=seqs))
    assert cfg.max_cudagraph_capture_size == expected
    assert cfg.cudagraph_mode == "full_and_piecewise"
    setup = instance_setup(load_hardware(hw), load_model("qwen3-8b"), cfg)
    assert setup.cost.capture_tokens == expected and setup.cost.graph_mode == "full_and_piecewise"


@pytest.mark.parametrize("engine", ["torch-graph", "vllm-eager", "mindie"])
def test_graph_modes_on_an_engine_without_them_are_refused_in_one_line(engine):
    hw = "ascend-910b3" if engine == "mindie" else "h200"
    rc, out, err = run_cli("step", "--hw", hw, "--model", "qwen3-8b", "--engine", engine, "--cudagraph-mode", "none")
    assert rc == 2 and "no vLLM graph modes" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli("step", "--hw", hw, "--model", "qwen3-8b", "--engine", engine,
                         "--max-cudagraph-capture-size", "64")
    assert rc == 2 and "max_cudagraph_capture_size" in err


def test_a_scenario_sets_the_mode_and_the_server_runs_it():
    # a host-bound small model: decode steps above the capture size run eagerly and slower
    args = ["simulate", "--hw", "h200", "--model", "llama-3.2-1b", "--requests", "32", "--input-len", "64",
            "--output-len", "64", "--rate", "inf", "--json"]
    rc, out, err = run_cli(*args)
    base = json.loads(out)
    rc, out, err = run_cli(*args, "--max-cudagraph-capture-size", "8")
    small = json.loads(out)
    assert rc == 0, err
    assert small["scenario"]["engine"]["max_cudagraph_capture_size"] == 8
    assert small["mean_tpot_ms"] > base["mean_tpot_ms"]
    rc, out, err = run_cli(*args, "--cudagraph-mode", "bogus")
    assert rc == 2 and "--cudagraph-mode" in err
