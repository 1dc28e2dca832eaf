"""vLLM's graph modes: which steps replay a captured graph, which run piecewise or eagerly, and
how large a step is captured (vLLM's cudagraph_mode and max_cudagraph_capture_size)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from npusim.costmodel import Batch, CostModel, instance_setup
from npusim.specs import EngineConfig, load_hardware, load_model, resolve_engine


def assert_one_line_error(result, needle):
    rc, _, err = result
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


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
    assert eager.price(b)[1] == pytest.approx(max(device + eager.dispatch_s,
                                                  eager.kernels_per_iteration(True, True) * eager.dispatch_s))
    attention = L * (piecewise.kernels["attention_decode"] + piecewise.kernels["attention_prefill"])
    assert piecewise.price(b)[1] == pytest.approx(
        max(device + piecewise.graph_launch_s, (L + 1) * piecewise.graph_launch_s + attention * piecewise.dispatch_s))


def test_the_capture_size_is_the_last_step_replayed_as_a_graph():
    cm = _cm("full_and_piecewise", 64)
    host = cm.host_overhead_s + 0 * cm.host_per_sequence_s
    for n in (63, 64, 65):
        b = Batch(num_decodes=n, decode_context_tokens=n * 100, decode_kv_slots=n * 112)
        device = cm.step_time(n, n * 100, n * 112)
        held = device + cm.graph_launch_s if n <= 64 else \
            max(device + cm.dispatch_s, cm.kernels_per_iteration(True, False) * cm.dispatch_s)
        assert cm.launch_mode(n, False) == ("graph" if n <= 64 else "eager")
        assert cm.price(b)[1] == pytest.approx(held)
        assert cm.price(b)[0] == pytest.approx(host + n * cm.host_per_sequence_s)
        assert cm.price(b)[:2] == pytest.approx(cm.host_times(n, device))  # (the two paths agree)


def test_launching_without_a_graph_never_makes_a_device_bound_step_free_of_launch_time():
    # a long prefill: the device sets the pace, yet its first kernel still waits for its launch
    cm = _cm("full_decode_only", 512, model="llama-3.1-8b")
    device = cm.step_time(prefill_chunks=[(4096, 0)])
    assert cm.host_times(1, device, False, True, 4096)[1] == pytest.approx(device + cm.dispatch_s)
    pw = _cm("piecewise", 8192, model="llama-3.1-8b")
    assert pw.host_times(1, device, False, True, 4096)[1] == pytest.approx(device + pw.graph_launch_s)


def test_pipeline_stages_launch_as_the_mode_says():
    hw, m = load_hardware("h200"), load_model("llama-3.1-8b")
    cm = CostModel(hw, m, engine="vllm", pp=2, graph_mode="none", capture_tokens=512)
    b = Batch(num_decodes=4, decode_context_tokens=4 * 100, decode_kv_slots=4 * 112)
    _, held, _, _ = cm.price_stages(b)
    stages = cm.stage_times(4, 400, 448)
    kernels = cm.kernels_per_iteration(True, False)
    L = m.num_layers
    for t, h, (moe, dense) in zip(stages, held, cm.stages):
        assert h == pytest.approx(max(t + cm.dispatch_s, (moe + dense) / L * kernels * cm.dispatch_s))
    graphed = CostModel(hw, m, engine="vllm", pp=2, graph_mode="full_and_piecewise", capture_tokens=512)
    assert graphed.price_stages(b)[1] == pytest.approx([t + cm.graph_launch_s for t in stages])


def test_data_parallel_ranks_in_lock_step_launch_each_step_alike(monkeypatch):
    from npusim import costmodel
    from npusim.scenario import Scenario, run_scenario
    from npusim.workload import WorkloadSpec

    seen = []
    price = costmodel.CostModel.price

    def spy(self, batch, all_tokens=None, mode=None):
        seen.append((mode, batch.num_tokens, bool(batch.prefill_chunks)))
        return price(self, batch, all_tokens, mode)

    monkeypatch.setattr(costmodel.CostModel, "price", spy)
    sc = Scenario(hw="h200", model="qwen3-30b-a3b", dp=2,
                  engine={"profile": "vllm", "expert_parallel_size": 2, "max_cudagraph_capture_size": 64},
                  workload=WorkloadSpec(num_requests=24, input_len={"kind": "fixed", "value": 600},
                                        output_len={"kind": "fixed", "value": 20}, rate=20.0))
    r = run_scenario(sc)
    assert r["completed"] == 24
    assert seen and all(mode is not None for mode, _, _ in seen)  # every rank's price given the step's mode
    # a rank decoding a few tokens beside a rank's 600-token prefill launches eagerly with it
    small = [mode for mode, tokens, prefill in seen if tokens <= 64 and not prefill]
    assert "eager" in small and "graph" in small


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
    assert_one_line_error(run_cli("step", "--hw", hw, "--model", "qwen3-8b", "--engine", engine,
                                  "--cudagraph-mode", "none"), "no vLLM graph modes")
    assert_one_line_error(run_cli("step", "--hw", hw, "--model", "qwen3-8b", "--engine", engine,
                                  "--max-cudagraph-capture-size", "64"), "max_cudagraph_capture_size")


@pytest.mark.parametrize("edit, needle", [
    ({"max_capture_tokens": None}, "go together"),  # (one of the two capture fields)
    ({"capture_tokens_per_seq": None}, "go together"),
    ({"execution": "eager"}, "are for execution: graph"),
    ({"graph_mode": "sometimes"}, "graph_mode"),
])
def test_an_engine_profile_with_inconsistent_graph_fields_is_refused_in_one_line(tmp_path, edit, needle):
    import yaml

    from npusim.specs import ENGINE_PROFILE_DIR

    d = yaml.safe_load((ENGINE_PROFILE_DIR / "vllm.yaml").read_text())
    for key, value in edit.items():
        if value is None:
            del d[key]
        else:
            d[key] = value
    if "graph_mode" in edit or "execution" in edit:
        pass
    else:
        d["graph_mode"] = "full"  # (so that the mode itself asks for neither field)
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump(d))
    assert_one_line_error(run_cli("step", "--hw", "h200", "--model", "qwen3-8b", "--engine", str(p)), needle)


def test_step_captures_at_least_its_batch_as_a_server_running_it_would():
    # vllm-ascend captures up to max_num_seqs (256 by default on a 64 GiB NPU); a server running
    # 300 sequences has max_num_seqs >= 300, so its decode of 300 is captured, as analyze prices it
    rc, out, err = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen3-8b", "--batch", "300",
                           "--context", "256", "--json")
    assert rc == 0, err
    assert json.loads(out)["launch"] == "graph"
    rc, out, err = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen3-8b", "--batch", "600",
                           "--context", "256", "--json")
    assert json.loads(out)["launch"] == "eager"  # (above vllm-ascend's 512)


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
    assert_one_line_error(run_cli(*args, "--cudagraph-mode", "bogus"), "--cudagraph-mode")


def test_calibrate_serve_fits_the_launches_of_a_server_run_eagerly_and_writes_its_mode(tmp_path):
    import numpy as np
    import yaml

    from npusim.scenario import Scenario, run_scenario
    from npusim.specs import ENGINE_PROFILE_DIR, load_engine_profile
    from npusim.workload import WorkloadSpec

    d = yaml.safe_load((ENGINE_PROFILE_DIR / "vllm.yaml").read_text())
    d["host_per_iteration_ms"]["value"], d["dispatch_per_kernel_us"]["value"] = 1.0, 20.0
    truth = tmp_path / "truth.yaml"
    truth.write_text(yaml.safe_dump(d))
    rng = np.random.default_rng(2)
    args = ["calibrate", "serve", "--hw", "h200", "--model", "llama-3.2-1b", "--engine", "vllm",
            "--cudagraph-mode", "none", "--out", str(tmp_path / "fitted.yaml"), "--json"]
    for i, (rate, n) in enumerate(((4.0, 24), (float("inf"), 24))):
        ins, outs = rng.integers(64, 900, n).tolist(), rng.integers(8, 120, n).tolist()
        r = run_scenario(Scenario(hw="h200", model="llama-3.2-1b",
                                  engine={"profile": str(truth), "cudagraph_mode": "none"},
                                  workload=WorkloadSpec(input_lens=ins, output_lens=outs, rate=rate, num_requests=n)))
        out = {k: r[k] for k in ("duration", "completed", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms")}
        out.update(input_lens=ins, output_lens=outs, request_rate="inf" if rate == float("inf") else rate,
                   burstiness=1.0, max_concurrency=None)
        f = tmp_path / f"b{i}.json"
        f.write_text(json.dumps(out))
        args += ["--bench", str(f)]
    rc, text, err = run_cli(*args)
    assert rc == 0, err
    fitted = json.loads(text)["fitted"]
    # every decode step is host-bound, so the benchmarks fix the host time of one, the scheduler's
    # and the launches' together (without the launches fitted they would land in the scheduler's)
    kernels = _cm(engine="vllm").kernels_per_iteration(True, False)
    step_host = fitted["host_per_iteration_ms"] + kernels * fitted["dispatch_per_kernel_us"] / 1e3
    assert step_host == pytest.approx(1.0 + kernels * 20.0 / 1e3, rel=0.03)
    assert fitted["dispatch_per_kernel_us"] > 10.0
    profile = load_engine_profile(str(tmp_path / "fitted.yaml"))
    assert profile.graph_mode == "none"  # the server's mode, written with its launches


# --------------------------------------------------------------------------- invariants

_MODELS = {name: CostModel(load_hardware("h200"), load_model(name), engine="vllm") for name in ("llama-3.2-1b",)}


@settings(max_examples=150, deadline=None)
@given(mode=st.sampled_from(["full_and_piecewise", "full_decode_only", "full", "piecewise", "none"]),
       capture=st.integers(1, 1024), decodes=st.integers(0, 600),
       chunks=st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 4000)), max_size=3),
       context=st.integers(1, 4000))
def test_a_step_never_holds_the_device_for_less_than_its_kernels_and_its_launch(mode, capture, decodes, chunks,
                                                                              context):
    base = _MODELS["llama-3.2-1b"]
    cm = CostModel(base.hw, base.model, engine="vllm", graph_mode=mode, capture_tokens=capture)
    if not (decodes or chunks):
        return
    b = Batch(num_decodes=decodes, decode_context_tokens=decodes * context,
              decode_kv_slots=decodes * (-(-context // 16) * 16), prefill_chunks=list(chunks))
    device = cm.step_time(decodes, b.decode_context_tokens, b.decode_kv_slots, b.prefill_chunks)
    host, held, _, _ = cm.price(b)
    launch = cm.launch_mode(b.num_tokens, bool(chunks))
    assert held >= device + min(cm.dispatch_s, cm.graph_launch_s) - 1e-15
    assert host == pytest.approx(cm.host_overhead_s + cm.host_per_sequence_s * (decodes + len(chunks)))
    if launch == "graph":
        assert held == pytest.approx(device + cm.graph_launch_s)
        assert b.num_tokens <= capture and mode != "none"
    else:
        kernels = cm.kernels_per_iteration(bool(decodes), bool(chunks))
        assert held <= max(device + cm.graph_launch_s + cm.dispatch_s,
                           kernels * max(cm.dispatch_s, cm.graph_launch_s) * 2)  # (never more than launching all)
        if launch == "eager":
            assert held >= kernels * cm.dispatch_s - 1e-15
    # the same step, launched the way the engine's own mode says, agrees with host_times
    assert (host, held) == pytest.approx(cm.host_times(decodes + len(chunks), device, bool(decodes), bool(chunks),
                                                       b.num_tokens))


def test_simulate_counts_its_iterations_by_how_they_were_launched():
    args = ["simulate", "--hw", "h200", "--model", "llama-3.2-1b", "--requests", "20", "--input-len", "300",
            "--output-len", "16", "--rate", "inf", "--json"]
    runs = {}
    for name, extra in (("default", []), ("capture2", ["--max-cudagraph-capture-size", "2"]),
                        ("eager", ["--engine", "vllm-eager"]), ("whole", ["--engine", "torch-graph"]),
                        ("piecewise", ["--cudagraph-mode", "piecewise", "--max-num-batched-tokens", "256", "--max-num-seqs", "64"])):
        rc, out, err = run_cli(*args, *extra)
        assert rc == 0, err
        d = json.loads(out)
        launches = d["iterations_by_launch"]
        assert sum(launches.values()) == sum(p["iterations"] for p in d["per_instance"]), name
        runs[name] = launches
    assert runs["default"]["eager"] >= 1 and runs["default"]["graph"] > runs["default"]["eager"]  # (the 6000-token prefill)
    assert runs["capture2"]["graph"] == 0  # 20 decodes a step: never within a capture of 2
    assert runs["eager"] == {"graph": 0, "piecewise": 0, "eager": sum(runs["eager"].values())}
    assert runs["whole"]["eager"] == runs["whole"]["piecewise"] == 0
    assert runs["piecewise"]["piecewise"] > 0 and runs["piecewise"]["graph"] == 0


# --- vllm-ascend's host refresh of each layer's attention task before a whole graph replays

def _ascend(mode="full_decode_only", model="qwen2.5-0.5b", **kw):
    return CostModel(load_hardware("ascend-910b3"), load_model(model), engine="vllm-ascend-graph",
                     graph_mode=mode, capture_tokens=512, **kw)


def test_a_replayed_graph_is_held_for_the_longer_of_its_kernels_and_the_hosts_refresh_of_each_layer():
    cm = _ascend()
    u = cm.engine.graph_update_per_layer_us * 1e-6
    assert cm.graph_update_s == pytest.approx(u * cm.model.num_layers) and u > 0
    for n, context in ((1, 64), (256, 8000)):  # a tiny step the refresh outlasts, a long one it does not
        b = Batch(num_decodes=n, decode_context_tokens=n * context, decode_kv_slots=n * (-(-context // 128) * 128))
        device = cm.step_time(n, b.decode_context_tokens, b.decode_kv_slots)
        host, held, _, host_bound = cm.price(b)
        assert held == pytest.approx(cm.graph_launch_s + max(device, cm.graph_update_s))
        assert (host, held) == pytest.approx(cm.host_times(n, device, True, False, n))
        assert host_bound == (host + held - device > device)
    small = Batch(num_decodes=1, decode_context_tokens=64, decode_kv_slots=128)
    assert cm.step_time(1, 64, 128) < cm.graph_update_s  # (the premise: the small step waits for the host)
    assert cm.price(small)[1] == pytest.approx(cm.graph_launch_s + cm.graph_update_s)


def test_only_whole_graph_steps_pay_the_refresh():
    cm = _ascend("full_and_piecewise")
    mixed = Batch(num_decodes=1, decode_context_tokens=64, decode_kv_slots=128, prefill_chunks=[(32, 0)])
    device = cm.step_time(1, 64, 128, [(32, 0)])
    L = cm.model.num_layers
    attention = L * (cm.kernels["attention_decode"] + cm.kernels["attention_prefill"])
    # piecewise: attention runs eagerly between the captured pieces, nothing captured to refresh
    assert cm.price(mixed)[1] == pytest.approx(
        max(device + cm.graph_launch_s, (L + 1) * cm.graph_launch_s + attention * cm.dispatch_s))
    # engines whose graphs read the lengths from device memory refresh nothing
    assert _cm().graph_update_s == 0.0


def test_each_pipeline_stage_refreshes_its_own_layers():
    cm = _ascend(model="qwen3-8b", pp=2)
    b = Batch(num_decodes=1, decode_context_tokens=64, decode_kv_slots=128)
    stages = cm.stage_times(1, 64, 128)
    L = cm.model.num_layers
    held = cm.price_stages(b)[1]
    for t, h, (moe, dense) in zip(stages, held, cm.stages):
        assert h == pytest.approx(cm.graph_launch_s + max(t, (moe + dense) / L * cm.graph_update_s))


def test_step_reports_the_refresh_and_whether_the_device_waits_for_it():
    rc, out, err = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen2.5-0.5b", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["launch"] == "graph" and got["graph_update_ms"] == pytest.approx(24 * 0.184)
    # host-bound: the iteration is the refresh, the scheduler's host work and the launch
    assert got["iteration_ms"] >= got["graph_update_ms"] + 2.0 > got["device_ms"] + 2.0
    rc, out, _ = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen2.5-0.5b", "--phase", "prefill",
                         "--prompt", "256", "--json")
    assert json.loads(out)["graph_update_ms"] == 0.0


def test_the_refresh_is_printed_and_paid_only_by_a_replayed_whole_graph():
    rc, out, err = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen2.5-0.5b")
    assert rc == 0 and "graph refresh:" in out and "host-bound: the device waits for it" in " ".join(out.split()), err
    # beyond the capture size the decode step runs eagerly: nothing captured to refresh
    rc, out, _ = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen2.5-0.5b", "--batch", "4",
                         "--max-cudagraph-capture-size", "2", "--json")
    got = json.loads(out)
    assert got["launch"] == "eager" and got["graph_update_ms"] == 0.0
    # a prefill step captured whole (cudagraph_mode full) refreshes its attention too
    rc, out, _ = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen2.5-0.5b", "--phase", "prefill",
                         "--prompt", "128", "--cudagraph-mode", "full", "--json")
    got = json.loads(out)
    assert got["launch"] == "graph" and got["graph_update_ms"] == pytest.approx(24 * 0.184)


def test_analyze_prices_the_steady_decode_launched_as_the_graph_mode_says():
    def tokens(*extra, cmd="analyze"):
        rc, out, err = run_cli(cmd, "--hw", "h200", "--model", "llama-3.2-1b", "--batch", "8", "--context", "2048",
                               *extra, "--json")
        assert rc == 0, err
        d = json.loads(out)
        return d["point"]["tokens_per_s"] if cmd == "analyze" else d["tokens_per_s"]
    graphed, eager = tokens(), tokens("--cudagraph-mode", "none")
    # a 1B model's decode launched kernel by kernel is bound by its launches: slower
    assert eager < 0.9 * graphed
    assert eager == pytest.approx(tokens("--cudagraph-mode", "none", cmd="step"), rel=0.02)
    assert tokens("--max-cudagraph-capture-size", "4") == pytest.approx(eager, rel=1e-6)  # (8 > 4: eager)
    assert_one_line_error(run_cli("analyze", "--hw", "h200", "--model", "llama-3.2-1b", "--compare",
                                  "--cudagraph-mode", "none"), "use simulate")
