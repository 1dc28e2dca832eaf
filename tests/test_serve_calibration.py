"""`npusim calibrate serve`: host terms fitted to vllm bench serve results, checked by a round trip
through benchmarks made with known host terms, and bad files refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import assert_one_line_error, run_cli
from npusim.scenario import Scenario, run_scenario
from npusim.specs import ENGINE_PROFILE_DIR, load_engine_profile
from npusim.workload import WorkloadSpec

KEYS = ("duration", "completed", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms")


def _bench_file(path, hw, model, engine, ins, outs, conc, rate=float("inf")):
    """One benchmark 'measured' on `engine` (a scenario's engine mapping), in vllm bench serve's layout."""
    sc = Scenario(hw=hw, model=model, engine=engine,
                  workload=WorkloadSpec(input_lens=ins, output_lens=outs, rate=rate, num_requests=len(ins),
                                        max_concurrency=conc))
    r = run_scenario(sc)
    out = {k: r[k] for k in KEYS}
    out.update(input_lens=ins, output_lens=outs, request_rate="inf" if rate == float("inf") else rate,
               burstiness=1.0, max_concurrency=conc)
    path.write_text(json.dumps(out))
    return path


def _truth(tmp_path, profile: str, **values) -> Path:
    """The engine profile `profile` with the host terms `values`: what the benchmarks 'ran' on."""
    d = yaml.safe_load((ENGINE_PROFILE_DIR / f"{profile}.yaml").read_text())
    for key, value in values.items():
        d[key]["value"] = value
    truth = tmp_path / "truth.yaml"
    truth.write_text(yaml.safe_dump(d))
    return truth


def _bench_files(tmp_path, host_ms, seq_us):
    """Benchmarks 'measured' on an engine whose host terms we know, in vllm bench serve's layout."""
    truth = _truth(tmp_path, "vllm", host_per_iteration_ms=host_ms, host_per_sequence_us=seq_us)
    rng = np.random.default_rng(1)
    files = []
    # batches of a few, about a dozen and two dozen sequences: any two files tell the per-iteration
    # cost from the per-sequence one (at one batch size the two are one number)
    for i, (rate, n, conc) in enumerate(((float("inf"), 30, 3), (float("inf"), 30, 12), (float("inf"), 24, None))):
        ins, outs = rng.integers(64, 1200, n).tolist(), rng.integers(8, 160, n).tolist()
        files.append(_bench_file(tmp_path / f"bench{i}.json", "h200", "llama-3.2-1b", {"profile": str(truth)},
                                 ins, outs, conc, rate))
    return files


def test_the_fit_recovers_the_host_terms_the_benchmarks_were_made_with(tmp_path):
    files = _bench_files(tmp_path, host_ms=3.0, seq_us=150.0)
    out = tmp_path / "fitted.yaml"
    args = ["calibrate", "serve", "--hw", "h200", "--model", "llama-3.2-1b", "--engine", "vllm",
            "--out", str(out), "--json"]
    for f in files:
        args += ["--bench", str(f)]
    rc, text, err = run_cli(*args)
    assert rc == 0, err
    d = json.loads(text)
    assert d["fitted"]["host_per_iteration_ms"] == pytest.approx(3.0, rel=0.05)
    assert d["fitted"]["host_per_sequence_us"] == pytest.approx(150.0, rel=0.15)
    for row in d["errors"]:  # each file predicted from a fit to the other
        assert row["held_out"]
        assert abs(row["duration_error"]) < 0.10
    profile = load_engine_profile(str(out))
    assert profile.provenance["host_per_iteration_ms"].kind == "calibrated"
    assert "bench0.json" in profile.provenance["host_per_iteration_ms"].source
    assert profile.kernels == load_engine_profile("vllm").kernels  # only the host terms change


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.pop("input_lens"), "no 'input_lens' (save it with --save-detailed)"),
    (lambda d: d.update(output_lens=d["output_lens"][:-1]), "same, non-zero length"),
    (lambda d: d.update(mean_ttft_ms=-1), "mean_ttft_ms must be a positive number"),
    (lambda d: d.update(completed=3), "failed requests cannot be replayed"),
])
def test_bad_benchmark_files_are_refused_in_one_line(tmp_path, edit, needle):
    good = {"duration": 10.0, "completed": 4, "mean_ttft_ms": 50.0, "mean_tpot_ms": 10.0, "mean_itl_ms": 10.0,
            "input_lens": [100, 200, 300, 400], "output_lens": [10, 20, 30, 40], "request_rate": 1.0}
    edit(good)
    f = tmp_path / "b.json"
    f.write_text(json.dumps(good))
    assert_one_line_error("calibrate", ["serve", "--bench", str(f), "--hw", "h200", "--model", "llama-3.2-1b",
                                        "--out", str(tmp_path / "o.yaml")], needle)


def test_the_fit_recovers_a_host_bound_graph_refresh_of_vllm_ascend(tmp_path):
    """Benchmarks of a small model on an engine whose whole-graph decode waits for the host's
    refresh of each layer's attention (vllm-ascend): the refresh a layer comes back."""
    truth = _truth(tmp_path, "vllm-ascend-graph", graph_update_per_layer_us=400.0)
    rng = np.random.default_rng(2)
    files = []
    for i, conc in enumerate((2, 8)):
        ins, outs = rng.integers(64, 600, 16).tolist(), rng.integers(32, 128, 16).tolist()
        files.append(_bench_file(tmp_path / f"bench{i}.json", "ascend-910b3", "qwen2.5-0.5b", {"profile": str(truth)},
                                 ins, outs, conc))
    args = ["calibrate", "serve", "--hw", "ascend-910b3", "--model", "qwen2.5-0.5b", "--engine", "vllm-ascend-graph",
            "--out", str(tmp_path / "fitted.yaml"), "--json"]
    for f in files:
        args += ["--bench", str(f)]
    rc, text, err = run_cli(*args)
    assert rc == 0, err
    fitted = json.loads(text)["fitted"]
    assert fitted["graph_update_per_layer_us"] == pytest.approx(400.0, rel=0.05)
    assert load_engine_profile(str(tmp_path / "fitted.yaml")).provenance["graph_update_per_layer_us"].kind == "calibrated"


def test_the_server_is_described_by_simulates_flags_tensor_parallel_and_fp8_included(tmp_path):
    """Benchmarks of a TP2, FP8 server with known host terms: calibrate serve told so (--tp 2
    --weight-dtype fp8, as simulate takes them) recovers the terms and names the server in the
    profile's sources; told nothing, it fits a single bf16 device, and fits worse."""
    truth = _truth(tmp_path, "vllm", host_per_iteration_ms=2.0, host_per_sequence_us=100.0)
    rng = np.random.default_rng(3)
    files = []
    for i, conc in enumerate((2, 16)):
        ins, outs = rng.integers(200, 3000, 24).tolist(), rng.integers(16, 160, 24).tolist()
        files.append(_bench_file(tmp_path / f"bench{i}.json", "h200", "llama-3.1-8b",
                                 {"profile": str(truth), "tensor_parallel_size": 2, "weight_dtype": "fp8"},
                                 ins, outs, conc))
    args = ["calibrate", "serve", "--hw", "h200", "--model", "llama-3.1-8b", "--engine", "vllm", "--json"]
    for f in files:
        args += ["--bench", str(f)]
    rc, text, err = run_cli(*args, "--tp", "2", "--weight-dtype", "fp8", "--out", str(tmp_path / "told.yaml"))
    assert rc == 0, err
    told = json.loads(text)
    assert told["fitted"]["host_per_iteration_ms"] == pytest.approx(2.0, rel=0.05)
    assert told["fitted"]["host_per_sequence_us"] == pytest.approx(100.0, rel=0.15)
    source = load_engine_profile(str(tmp_path / "told.yaml")).provenance["host_per_iteration_ms"].source
    assert "the server: --weight-dtype fp8 --tp 2" in source
    rc, text, err = run_cli(*args, "--out", str(tmp_path / "untold.yaml"))
    assert rc == 0, err
    untold = json.loads(text)
    assert sum(x * x for x in untold["residuals"]) > 10 * sum(x * x for x in told["residuals"])


@pytest.mark.parametrize("flags, needle", [
    (["--router", "random"], "--router must be round-robin or least-outstanding or prefix-aware"),
    (["--weight-dtype", "fp5"], "--weight-dtype must be"),
    (["--preemption", "drop"], "--preemption must be recompute or swap"),
])
def test_bad_server_flags_are_refused_in_one_line(tmp_path, flags, needle):
    good = {"duration": 10.0, "completed": 4, "mean_ttft_ms": 50.0, "mean_tpot_ms": 10.0, "mean_itl_ms": 10.0,
            "input_lens": [100, 200, 300, 400], "output_lens": [10, 20, 30, 40], "request_rate": 1.0}
    f = tmp_path / "b.json"
    f.write_text(json.dumps(good))
    assert_one_line_error("calibrate", ["serve", "--bench", str(f), "--hw", "h200", "--model", "llama-3.2-1b",
                                        "--out", str(tmp_path / "o.yaml"), *flags], needle)


def test_calibrate_serve_takes_every_server_flag_simulate_takes():
    """The server is described as simulate describes it: every engine and replica flag of simulate
    (those that are not the workload, the instances sharing one device, or the output) is a flag of
    calibrate serve, passed through the same rules (settings.apply_flags)."""
    import typer.main

    from npusim.cli import app
    from npusim.settings import SIMULATE_FIELDS

    def flags_of(*path):
        cmd = typer.main.get_command(app)
        for name in path:
            cmd = cmd.commands[name]
        return {o for p in cmd.params for o in p.opts}

    sim, cal = flags_of("simulate"), flags_of("calibrate", "serve")
    not_the_server = {"--requests", "--input-len", "--output-len", "--rate", "--burstiness", "--max-concurrency",
                      "--trace", "--shared-prefix-len", "--instances", "--sharing", "--contiguous-policy",
                      "--no-paging", "--batching", "--goodput", "--report", "--seed"}
    server = {"--" + k.replace("_", "-") for k in SIMULATE_FIELDS} - not_the_server - {"--hw", "--model", "--engine"}
    assert server <= sim
    assert server - cal == set()
