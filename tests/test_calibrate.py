"""Calibration: device detection, the fit from measurements, the written profile, the torch harness."""

import importlib.util
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_cli
from npusim import calibrate
from npusim.calibrate import (DeviceInfo, detect_device, fit_notes, fit_profile, load_measurements,
                              write_profile)
from npusim.errors import NpusimError
from npusim.specs import MODEL_ZOO, load_hardware, load_model

FITTED = ("matmul_efficiency", "memory_efficiency", "kernel_latency_us")


def h100_measurements(**changes) -> dict:
    """Synthetic measurements shaped like run_calibration's, with the lent H100's numbers."""
    m = {
        "npusim_calibration": 1, "date": "2026-11-28", "quick": False,
        "device": {"kind": "cuda", "device": "cuda:0", "name": "NVIDIA H100 80GB HBM3",
                   "torch_version": "2.11.0"},
        "gemm": [
            {"m": 1, "n": 4096, "k": 4096, "dtype": "bf16", "seconds": 2.0e-5, "tflops": 1.68},
            {"m": 4096, "n": 14336, "k": 4096, "dtype": "bf16", "seconds": 7.1e-4, "tflops": 677.5},
            {"m": 8192, "n": 8192, "k": 8192, "dtype": "bf16", "seconds": 1.4e-3, "tflops": 785.0},
        ],
        "copy": {"bytes": 2**30, "bytes_moved": 2**31, "seconds": 7.12e-4, "gbs": 3015.0},
        "elementwise": {"op": "addcmul (d = c + a*b)", "elements": 2**26, "dtype": "bf16",
                        "flops": 2.0 * 2**26, "bytes": 8.0 * 2**26, "seconds": 1.9e-4,
                        "gbs": 2825.0, "gflops": 706.0},
        "latency": {"op": "x.add_(1)", "launches": 2000, "us_per_op": 5.6, "host_us_per_op": 5.9,
                    "graph_us_per_op": 2.31},
    }
    m.update(changes)
    return m


# --------------------------------------------------------------------------- device detection

def _fake_torch(accelerator: str | None, cuda: bool):
    """A stand-in for torch with just what detect_device touches."""
    dev = SimpleNamespace(type=accelerator) if accelerator else None
    backend = SimpleNamespace(is_available=lambda: cuda, current_device=lambda: 0,
                              get_device_name=lambda i: f"Fake {accelerator or 'cuda'} {i}")
    return SimpleNamespace(
        __version__="9.9.9", get_num_threads=lambda: 4,
        accelerator=SimpleNamespace(current_accelerator=lambda: dev, current_device_index=lambda: 0),
        cuda=backend, xpu=backend)


def test_detect_device_without_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(NpusimError, match=r"pip install -e '\.\[calibrate\]'"):
        detect_device()


@pytest.mark.parametrize("npu, accelerator, cuda, expected", [
    (True, "npu", False, "npu"),      # torch_npu loaded: the NPU wins
    (False, "xpu", False, "xpu"),     # torch.accelerator names another accelerator
    (False, None, True, "cuda"),      # older torch without an accelerator answer, CUDA present
    (False, None, False, "cpu"),
])
def test_detect_device_preference(monkeypatch, npu, accelerator, cuda, expected):
    fake = _fake_torch(accelerator, cuda)
    fake.npu = fake.cuda
    monkeypatch.setattr(calibrate, "_import_torch", lambda: fake)
    monkeypatch.setattr(calibrate, "_npu_present", lambda torch: npu)
    info = detect_device("auto")
    assert info.kind == expected
    assert info.device == ("cpu" if expected == "cpu" else f"{expected}:0")
    assert info.torch_version == "9.9.9"


def test_detect_device_missing_kind_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(calibrate, "_import_torch", lambda: _fake_torch(None, False))
    monkeypatch.setattr(calibrate, "_npu_present", lambda torch: False)
    with pytest.raises(NpusimError) as e:
        detect_device("npu")
    msg = str(e.value)
    assert "'npu' requested but not present" in msg and "found: cpu" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- fit

def test_fit_computes_efficiencies_from_measurements():
    hw = load_hardware("h100-sxm")
    data = fit_profile(hw, h100_measurements())
    assert data["name"] == "h100-sxm-calibrated"
    # best GEMM (8192^3 at 785) over the bf16 peak; copy over bandwidth; graph replay latency
    assert data["matmul_efficiency"]["value"] == pytest.approx(785.0 / 989.0, abs=1e-4)
    assert data["memory_efficiency"]["value"] == pytest.approx(3015.0 / 3350.0, abs=1e-4)
    assert data["kernel_latency_us"]["value"] == pytest.approx(2.31)
    for field in FITTED:
        assert data[field]["kind"] == "calibrated"
        assert "NVIDIA H100 80GB HBM3" in data[field]["source"] and "2026-11-28" in data[field]["source"]
    assert "8192x8192x8192 bf16 GEMM 785.0 TFLOP/s of 989 peak" in data["matmul_efficiency"]["source"]
    assert "eager launches 5.60 us" in data["kernel_latency_us"]["source"]
    # addcmul is memory-bound: the vector units were not measured, so vector_efficiency stays
    assert data["vector_efficiency"]["value"] == hw.vector_efficiency
    assert data["vector_efficiency"]["kind"] == hw.provenance["vector_efficiency"].kind
    notes = fit_notes(hw, h100_measurements())
    assert len(notes) == 1 and "vector_efficiency not fitted" in notes[0]


def test_fit_without_graph_uses_eager_latency_and_says_so():
    m = h100_measurements()
    del m["latency"]["graph_us_per_op"]
    data = fit_profile(load_hardware("h100-sxm"), m)
    assert data["kernel_latency_us"]["value"] == pytest.approx(5.6)
    assert "upper bound" in data["kernel_latency_us"]["source"]


def test_fit_vector_efficiency_when_the_elementwise_op_is_compute_bound():
    hw = load_hardware("h100-sxm")
    # 100 flop/B is beyond the H100's vector ridge (133.8 TFLOP/s / 3.35 TB/s = 40 flop/B)
    elementwise = {"op": "poly", "flops": 1e11, "bytes": 1e9, "gbs": 900.0, "gflops": 90_000.0}
    data = fit_profile(hw, h100_measurements(elementwise=elementwise))
    assert data["vector_efficiency"]["value"] == pytest.approx(90.0 / 133.8, abs=1e-4)
    assert data["vector_efficiency"]["kind"] == "calibrated"
    assert fit_notes(hw, h100_measurements(elementwise=elementwise)) == []


def test_fit_refuses_measurements_beyond_the_profile_peak():
    # an H100's numbers against the 910B2 profile: 785 > 353.9 TFLOP/s and 3015 GB/s > the 1382
    # its 24 cores can pull (24 x 57.6 GB/s, below its 1600 GB/s HBM)
    with pytest.raises(NpusimError) as e:
        fit_profile(load_hardware("ascend-910b2"), h100_measurements())
    msg = str(e.value)
    assert "785.0 TFLOP/s" in msg and "353.9" in msg and "matmul efficiency 2.22 > 1" in msg
    assert "3015 GB/s" in msg and "1382.4 GB/s" in msg and "memory efficiency 2.18 > 1" in msg
    assert "\n" not in msg


def test_fit_refuses_fp32_gemms_and_names_missing_parts():
    m = h100_measurements()
    for g in m["gemm"]:
        g["dtype"] = "fp32"
    with pytest.raises(NpusimError, match="fp32 but h100-sxm's matmul peaks are bf16/fp16"):
        fit_profile(load_hardware("h100-sxm"), m)
    m = h100_measurements()
    del m["copy"]
    with pytest.raises(NpusimError, match="missing 'copy'"):
        fit_profile(load_hardware("h100-sxm"), m)


def test_written_profile_loads_with_calibrated_numbers(tmp_path):
    hw = load_hardware("h100-sxm")
    path = write_profile(fit_profile(hw, h100_measurements(), name="h100-lab"), tmp_path / "h100-lab.yaml")
    got = load_hardware(str(path))
    assert got.name == "h100-lab"
    assert set(got.provenance) == set(hw.provenance)  # every number of the base, each with a source
    for field in FITTED:
        assert got.provenance[field].kind == "calibrated"
        assert "npusim calibrate on NVIDIA H100" in got.provenance[field].source
    assert got.matmul_efficiency == pytest.approx(0.7937, abs=1e-4)
    # everything not fitted is carried over with its own provenance
    assert got.matmul_tflops_bf16 == hw.matmul_tflops_bf16
    assert got.provenance["memory_bandwidth_gbs"] == hw.provenance["memory_bandwidth_gbs"]
    # the block-size rule too, where the hardware profile carries one (it may live in an engine profile)
    assert getattr(got, "kv_block_sizes", None) == getattr(hw, "kv_block_sizes", None)
    # one line per number, as in hw_profiles/
    text = path.read_text()
    assert "matmul_efficiency: {value: 0.7937, kind: calibrated, source:" in text


# --------------------------------------------------------------------------- CLI

def test_cli_fit_writes_a_profile(tmp_path):
    meas = tmp_path / "m.json"
    meas.write_text(json.dumps(h100_measurements()))
    out = tmp_path / "new.yaml"
    rc, stdout, err = run_cli("calibrate", "fit", "--hw", "h100-sxm", "--measurements", str(meas),
                              "--out", str(out), "--name", "h100-lab")
    assert rc == 0, err
    assert load_hardware(str(out)).name == "h100-lab"
    assert "matmul_efficiency" in stdout and "vector_efficiency not fitted" in stdout
    assert load_measurements(meas)["device"]["kind"] == "cuda"


@pytest.mark.parametrize("content, expect", [
    ('{"npusim_calibration": 1,\n "date": }', "malformed JSON at line 2"),
    ('{"date": "2026-01-01"}', "not an npusim calibration file"),
])
def test_cli_fit_bad_measurements_is_one_line(tmp_path, content, expect):
    meas = tmp_path / "m.json"
    meas.write_text(content)
    rc, _, err = run_cli("calibrate", "fit", "--hw", "h100-sxm", "--measurements", str(meas),
                         "--out", str(tmp_path / "x.yaml"))
    assert rc == 2
    assert err.count("\n") == 1 and expect in err and str(meas) in err


def test_cli_fit_beyond_peak_is_one_line(tmp_path):
    meas = tmp_path / "m.json"
    meas.write_text(json.dumps(h100_measurements()))
    rc, _, err = run_cli("calibrate", "fit", "--hw", "ascend-910b2", "--measurements", str(meas),
                         "--out", str(tmp_path / "x.yaml"))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("npusim: error: ascend-910b2 is wrong for this device")
    assert not (tmp_path / "x.yaml").exists()


def test_cli_run_absent_device_is_one_line():
    # with torch: the kind is not present; without torch: the install hint. Either is one line.
    rc, _, err = run_cli("calibrate", "run", "--device", "nosuchdevice", "--quick")
    assert rc == 2 and err.count("\n") == 1
    assert "not present" in err or "pip install" in err


# --------------------------------------------------------------------------- harness (needs torch)

BLOCK_HEAVY = ("import sys\n"
               "for m in ('numpy', 'pydantic', 'yaml', 'typer', 'rich', 'click', 'scipy', 'pandas'):\n"
               "    sys.modules[m] = None\n"
               "from npusim.calibrate import main\n"
               "sys.exit(main(sys.argv[1:]))\n")


def _torch_only(*args: str) -> subprocess.CompletedProcess:
    """`python -m npusim.calibrate ARGS` where npusim's other dependencies cannot be imported,
    as on a GPU machine that has only torch."""
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_entry_point_needs_only_the_standard_library():
    proc = _torch_only("--device", "nosuchdevice")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("npusim: error:") and ("not present" in last or "pip install" in last)


@pytest.fixture(scope="module")
def quick_cpu_run(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("cal") / "cpu.json"
    proc = _torch_only("--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_quick_cpu_harness_returns_consistent_positive_numbers(quick_cpu_run):
    m, stdout = quick_cpu_run
    assert m["npusim_calibration"] == calibrate.SCHEMA_VERSION and m["quick"] is True
    assert m["device"]["kind"] == "cpu" and m["device"]["device"] == "cpu"
    assert len(m["date"]) == 10 and m["timestamp"].startswith(m["date"])
    assert len(m["gemm"]) == 4  # three M values at 512x512, one square
    for g in m["gemm"]:
        assert g["dtype"] == "fp32"
        assert g["flops"] == 2.0 * g["m"] * g["n"] * g["k"]
        assert g["seconds"] > 0 and len(g["samples"]) == 3
        assert g["seconds"] == sorted(g["samples"])[1]  # the median of three
        assert g["tflops"] == pytest.approx(g["flops"] / g["seconds"] / 1e12)
    c = m["copy"]
    assert c["bytes_moved"] == 2 * c["bytes"] and c["gbs"] == pytest.approx(c["bytes_moved"] / c["seconds"] / 1e9)
    e = m["elementwise"]
    assert e["bytes"] == 4 * 4 * e["elements"] and e["gflops"] > 0 and e["gbs"] > 0
    lat = m["latency"]
    assert lat["us_per_op"] > 0 and lat["host_us_per_op"] > 0 and "graph_us_per_op" not in lat
    assert "TFLOP/s" in stdout and "kernel latency" in stdout


def test_quick_cpu_measurements_refused_by_fit_in_one_line(quick_cpu_run, tmp_path):
    meas = tmp_path / "cpu.json"
    meas.write_text(json.dumps(quick_cpu_run[0]))
    rc, _, err = run_cli("calibrate", "fit", "--hw", "h100-sxm", "--measurements", str(meas),
                         "--out", str(tmp_path / "x.yaml"))
    assert rc == 2 and err.count("\n") == 1 and "fp32" in err


def test_detect_device_real_torch():
    pytest.importorskip("torch")
    info = detect_device("auto")
    assert isinstance(info, DeviceInfo) and info.name
    assert detect_device("cpu").device == "cpu"


# --------------------------------------------------------------------------- shape-aware sweeps

MEASUREMENTS = ROOT / "hw_profiles" / "measurements"


def _decoder_module():
    spec = importlib.util.spec_from_file_location("reference_decoder", MEASUREMENTS / "reference_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reference_decoder"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_sweep_models_are_the_zoo_shapes():
    for name, shape in calibrate.SWEEP_MODELS.items():
        assert {k: MODEL_ZOO[name][k] for k in shape} == shape
        m = load_model(name)
        nk = calibrate.linear_shapes(shape)
        assert nk["qkv"] == (m.q_dim + 2 * m.kv_dim, m.hidden_size)
        assert nk["o"] == (m.hidden_size, m.q_dim)
        assert nk["gate_up"] == (2 * m.intermediate_size, m.hidden_size)
        assert nk["down"] == (m.hidden_size, m.intermediate_size)
        assert nk["lm_head"] == (m.vocab_size, m.hidden_size)
        # the linear weights of one layer, as the cost model counts them
        assert sum(n * k for layer, (n, k) in nk.items() if layer != "lm_head") == m.linear_params_per_layer


def test_zoo_gemm_pairs_are_distinct_and_cover_every_layer():
    pairs = calibrate.zoo_gemm_pairs()
    keys = [(p["n"], p["k"]) for p in pairs]
    assert len(keys) == len(set(keys))
    labels = [label for p in pairs for label in p["layers"]]
    assert sorted(labels) == sorted(f"{m}:{layer}" for m in calibrate.SWEEP_MODELS
                                    for layer in calibrate.LINEAR_LAYERS)
    assert (4096, 4096) in keys and (128256, 4096) in keys and (28672, 4096) in keys
    assert calibrate.SWEEP_M == tuple(2**i for i in range(14))


def test_attention_pairs_count_causal_pairs():
    assert calibrate.attention_pairs(4, 0) == 10  # 1 + 2 + 3 + 4
    assert calibrate.attention_pairs(2, 3) == 2 * 3 + 3


def test_decoder_configs_are_the_zoo_shapes():
    dec = _decoder_module()
    for name in ("llama-3.2-1b", "llama-3.1-8b", "llama-2-13b", "qwen2.5-7b"):
        cfg = dec.config(name)
        zoo = MODEL_ZOO[name]
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "vocab_size"):
            assert cfg[key] == zoo[key], (name, key)
        assert cfg["tie_word_embeddings"] == zoo.get("tie_word_embeddings", False)
        assert cfg["qkv_bias"] == zoo.get("qkv_bias", False)
        assert not cfg["qk_norm"]
        assert dec.weight_bytes(cfg) == load_model(name).weight_bytes("bf16")
    q3 = dec.config("qwen3-8b")
    assert (q3["num_layers"], q3["hidden_size"], q3["num_heads"], q3["num_kv_heads"], q3["head_dim"],
            q3["intermediate_size"], q3["vocab_size"], q3["qk_norm"]) == (36, 4096, 32, 8, 128, 12288, 151936, True)


# -- the torch primitives on the CPU

@pytest.fixture(scope="module")
def cpu():
    torch = pytest.importorskip("torch")
    plan = dict(warmup=1, repeats=3, target_s=0.001, rotate_bytes=0, max_copies=2, graph_max_m=1024)
    return torch, calibrate.detect_device("cpu"), plan


def test_bench_linear_counts_flops_and_bytes(cpu):
    torch, dev, plan = cpu
    row = calibrate.bench_linear(torch, dev, 4, 96, 64, "fp32", plan, ["x:o"])
    assert row["flops"] == 2.0 * 4 * 96 * 64
    assert row["bytes"] == (4 * 64 + 96 * 64 + 4 * 96) * 4
    assert row["timing"] == "eager" and row["layers"] == ["x:o"]
    assert len(row["samples"]) == 3 and all(s > 0 for s in row["samples"])
    assert row["seconds"] == statistics_median(row["samples"])
    assert row["tflops"] == pytest.approx(row["flops"] / row["seconds"] / 1e12)
    assert row["gbs"] == pytest.approx(row["bytes"] / row["seconds"] / 1e9)


def statistics_median(xs):
    import statistics
    return statistics.median(xs)


def test_bench_linear_int8_times_int8_operands_and_counts_its_bytes(cpu):
    torch, dev, plan = cpu
    row = calibrate.bench_linear(torch, dev, 32, 96, 64, "int8", plan, ["x:o"])
    assert row["dtype"] == "int8" and "_int_mm" in row["op"]
    assert row["flops"] == 2.0 * 32 * 96 * 64
    assert row["bytes"] == 32 * 64 + 96 * 64 + 32 * 96 * 4  # int8 operands, int32 out
    assert row["seconds"] > 0


def test_committed_h200_int8_sweep_is_sane():
    for path in _committed("h200-2026-12-03-calibrate-int8.json"):
        m = load_measurements(path)
        assert m["device"]["kind"] == "cuda" and "H200" in m["device"]["name"]
        sweep = m["gemm_sweep"]
        assert {g["dtype"] for g in sweep} == {"int8"}
        for g in sweep:
            assert g["flops"] == 2.0 * g["m"] * g["n"] * g["k"]
            assert 0 < g["tflops"] < 1979.0, g  # the H200's dense int8 peak (TOPS)
            assert g["bytes"] / g["seconds"] / 1e9 < H200_PEAK_GBS * 1.05, g


def test_bandwidth_counts_bytes(cpu):
    torch, dev, plan = cpu
    r = calibrate.bench_read_bandwidth(torch, dev, "fp32", 2**20 + 3, plan)
    assert r["bytes"] == r["bytes_read"] == (2**20 + 3) // 4 * 4  # whole elements only
    assert r["gbs"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9) and r["seconds"] > 0
    c = calibrate.bench_copy_bandwidth(torch, dev, 2**20, plan)
    assert c["bytes_moved"] == 2 * c["bytes"] == 2**21
    assert c["gbs"] == pytest.approx(c["bytes_moved"] / c["seconds"] / 1e9)


@pytest.mark.parametrize("op, shape", [("add", (1, 64)), ("mm", (2, 32))])
def test_kernel_chain_per_kernel_is_total_over_n(cpu, op, shape):
    torch, dev, plan = cpu
    r = calibrate.bench_kernel_chain(torch, dev, op, shape, "fp32", 40, plan)
    e = r["eager"]
    assert r["kernels"] == 40 and r["shape"] == list(shape)
    assert e["us_per_kernel"] == pytest.approx(e["seconds"] / 40 * 1e6)
    assert e["host_us_per_kernel"] == pytest.approx(e["host_seconds"] / 40 * 1e6)
    assert all(s > 0 for s in e["samples"] + e["host_samples"])
    assert "graph" not in r  # no graphs on the CPU


def test_time_calls_rotates_and_reports_per_call(cpu):
    torch, dev, plan = cpu
    seen = []
    calls = [lambda i=i: seen.append(i) for i in range(3)]
    t = calibrate.time_calls(torch, dev, calls, {**plan, "target_s": 0.0}, use_graph=True)
    assert t["timing"] == "eager" and t["calls_per_sample"] == 3
    assert seen[:6] == [0, 1, 2, 0, 1, 2]  # round-robin
    assert len(t["samples"]) == 3 and t["seconds"] > 0


def test_paged_decode_flex_and_gather_match_dense(cpu):
    torch, _, _ = cpu
    torch.manual_seed(1)
    B, hq, hkv, d, bs, ctx = 3, 8, 2, 16, 16, 48
    nb = ctx // bs
    total = B * nb + 5
    k_pool, v_pool = torch.randn(total * bs, hkv, d), torch.randn(total * bs, hkv, d)
    tables = calibrate.random_block_tables(torch, B, nb, total, 1, seed=3)
    assert tables[0].dtype == torch.int32 and tables[0].unique().numel() == B * nb
    slots = calibrate.block_slots(torch, tables[0], bs)
    q = torch.randn(B, hq, 1, d)
    dense = calibrate.sdpa(torch, q, k_pool[slots].transpose(1, 2), v_pool[slots].transpose(1, 2), "math")
    gather = calibrate.paged_decode_gather(torch, q, k_pool, v_pool, slots, "default")
    masks = calibrate.flex_paged_mask(torch, tables, bs, total * bs)
    flex = calibrate.paged_decode_flex(calibrate.flex_attention_fn(torch, compiled=False), q, k_pool, v_pool, masks[0])
    assert torch.allclose(gather, dense, atol=1e-5)
    assert torch.allclose(flex, dense, atol=1e-5)


def test_attention_benchmarks_rows(cpu):
    torch, dev, plan = cpu
    p = {**plan, "attn_heads": [(4, 2, 16)], "attn_batch": [2], "attn_context": [32],
         "attn_block_sizes": [16], "attn_impls": ["gather_sdpa", "flex_paged"],
         "attn_max_kv_bytes": 2**30, "attn_max_gather_bytes": 2**30}
    rows = calibrate.bench_decode_attention(torch, dev, "fp32", p)
    assert [r["impl"] for r in rows] == ["sdpa_dense", "gather_sdpa", "flex_paged"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["kv_bytes"] == 2.0 * 2 * 32 * 2 * 16 * 4
        assert r["gbs"] == pytest.approx(r["kv_bytes"] / r["seconds"] / 1e9)
        assert all(s > 0 for s in r["samples"])
    p = {**plan, "prefill_heads": [(4, 2, 16)], "prefill_lengths": [32], "prefill_chunks": [(16, 48)]}
    rows = calibrate.bench_prefill_attention(torch, dev, "fp32", p)
    assert [(r["chunk"], r["cached"]) for r in rows] == [(32, 0), (16, 48)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["flops"] == 4.0 * 4 * 16 * calibrate.attention_pairs(r["chunk"], r["cached"])
        assert r["tflops"] == pytest.approx(r["flops"] / r["seconds"] / 1e12)


def test_quick_cpu_run_has_the_new_sections(quick_cpu_run):
    m, stdout = quick_cpu_run
    assert m["sections"] == list(calibrate.SECTIONS)
    assert m["device_details"]["torch"] == m["device"]["torch_version"]
    assert {g["m"] for g in m["gemm_sweep"]} == {1, 4, 32}
    for key in ("gemm_sweep", "read_bandwidth", "copy_bandwidth", "kernel_chain",
                "decode_attention", "prefill_attention"):
        assert m[key], key
    for g in m["gemm_sweep"]:
        assert g["flops"] == 2.0 * g["m"] * g["n"] * g["k"]
    assert all("error" not in r for r in m["decode_attention"] + m["prefill_attention"])
    assert "GEMM sweep" in stdout and "decode attention" in stdout and "chain" in stdout


def test_unknown_section_is_an_error(monkeypatch):
    pytest.importorskip("torch")
    with pytest.raises(NpusimError, match="unknown calibration section"):
        calibrate.run_calibration("cpu", True, sections=["nope"])


# -- the reference decoder on the CPU

@pytest.fixture(scope="module")
def tiny_decoder():
    torch = pytest.importorskip("torch")
    dec = _decoder_module()
    return torch, dec


@pytest.mark.parametrize("attn", ["gather", "flex"])
@pytest.mark.parametrize("model", ["tiny", "tiny-qwen3"])
def test_decoder_decode_after_prefill_matches_one_prefill(tiny_decoder, attn, model):
    """Prefill 20 tokens, then decode the 21st from the paged cache: the same logits as one
    prefill of all 21 (checks the slot scatter, block tables, RoPE positions and both readers)."""
    torch, dec = tiny_decoder
    cfg = dec.config(model)
    params = dec.init_params(cfg, "cpu", torch.float32)
    rope = dec.rope_tables(cfg, 128, "cpu", torch.float32)
    bs, slots = 16, 16 * 16
    pools = dec.kv_pools(cfg, slots, cfg["num_layers"], "cpu", torch.float32)
    from torch.nn.attention.flex_attention import flex_attention
    with torch.inference_mode():
        pre = dec.make_batch(cfg, "cpu", chunk=20, block_size=bs, num_slots=slots, seed=5)
        ids = pre.input_ids.clone()
        table = torch.tensor([[7, 3]], dtype=torch.int32)
        pre = dec.make_batch(cfg, "cpu", chunk=20, block_size=bs, num_slots=slots, tables={"chunk": table})
        pre.input_ids = ids
        dec.forward(params, rope, cfg, pre, pools, attn, flex_attention)
        step = dec.make_batch(cfg, "cpu", num_decodes=1, context=21, block_size=bs, num_slots=slots,
                              attn=attn, tables={"decode": table})
        step.input_ids = torch.tensor([11])
        got = dec.forward(params, rope, cfg, step, pools, attn, flex_attention)
        assert step.positions.tolist() == [20] and step.slot_mapping.tolist() == [3 * bs + 4]
        fresh = dec.kv_pools(cfg, slots, cfg["num_layers"], "cpu", torch.float32)
        full = dec.make_batch(cfg, "cpu", chunk=21, block_size=bs, num_slots=slots, tables={"chunk": table})
        full.input_ids = torch.cat([ids, torch.tensor([11])])
        want = dec.forward(params, rope, cfg, full, fresh, attn, flex_attention)
    assert got.shape == want.shape == (1, cfg["vocab_size"])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_decoder_chunked_prefill_matches_one_prefill(tiny_decoder):
    """A prompt of 40 as a chunk of 24 then a chunk of 16 over the 24 cached (in a mixed
    iteration beside 2 decodes): the last token's logits equal one prefill of all 40."""
    torch, dec = tiny_decoder
    cfg = dec.config("tiny")
    params = dec.init_params(cfg, "cpu", torch.float32)
    rope = dec.rope_tables(cfg, 128, "cpu", torch.float32)
    bs, slots = 16, 16 * 32
    table = torch.tensor([[9, 2, 30]], dtype=torch.int32)
    prompt = torch.randint(cfg["vocab_size"], (40,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pools = dec.kv_pools(cfg, slots, cfg["num_layers"], "cpu", torch.float32)
        first = dec.make_batch(cfg, "cpu", chunk=24, block_size=bs, num_slots=slots, tables={"chunk": table})
        first.input_ids = prompt[:24]
        dec.forward(params, rope, cfg, first, pools, "gather", None)
        mixed = dec.make_batch(cfg, "cpu", num_decodes=2, context=32, chunk=16, cached=24, block_size=bs,
                               num_slots=slots, attn="gather",
                               tables={"chunk": table, "decode": torch.tensor([[0, 1], [4, 5]], dtype=torch.int32)})
        mixed.input_ids = torch.cat([torch.tensor([1, 2]), prompt[24:]])
        got = dec.forward(params, rope, cfg, mixed, pools, "gather", None)
        assert mixed.sample_rows.tolist() == [0, 1, 17] and mixed.positions[2:].tolist() == list(range(24, 40))
        fresh = dec.kv_pools(cfg, slots, cfg["num_layers"], "cpu", torch.float32)
        full = dec.make_batch(cfg, "cpu", chunk=40, block_size=bs, num_slots=slots, tables={"chunk": table})
        full.input_ids = prompt
        want = dec.forward(params, rope, cfg, full, fresh, "gather", None)
    assert torch.allclose(got[2:], want, atol=1e-4, rtol=1e-4)


def test_decoder_quick_cpu_run_writes_its_schema(tiny_decoder, tmp_path):
    out = tmp_path / "dec.json"
    proc = subprocess.run([sys.executable, str(MEASUREMENTS / "reference_decoder.py"), "--out", str(out),
                           "--quick", "--device", "cpu", "--models", "tiny", "--trace-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["npusim_reference_decoder"] == 1 and d["device"]["kind"] == "cpu" and d["dtype"] == "fp32"
    assert d["skipped"] == []
    phases = {r["phase"] for r in d["rows"]}
    assert phases == {"decode", "prefill", "mixed"}
    for r in d["rows"]:
        for key in ("model", "style", "phase", "attn", "batch", "context", "prompt", "chunk", "cached",
                    "block_size", "median_ms", "samples_ms", "tokens", "kv_layers_physical"):
            assert key in r, key
        assert r["median_ms"] > 0 and all(s > 0 for s in r["samples_ms"])
        assert r["tokens"] == r["batch"] + (r["prompt"] or r["chunk"])
    kc = d["kernel_counts"][0]
    assert kc["kernels_per_step"] == kc["kernels_edge"] + kc["num_layers"] * kc["kernels_per_layer"]
    assert d["traces"] and (tmp_path / d["traces"][0]["file"]).exists()


# --------------------------------------------------------------------------- committed H200 data

H200_PEAK_TFLOPS = 989.0  # dense bf16, datasheet
H200_PEAK_GBS = 4800.0


def _committed(pattern: str) -> list:
    files = sorted(MEASUREMENTS.glob(pattern))
    if not files:
        pytest.skip(f"no {pattern} committed")
    return files


def test_committed_h200_calibration_is_sane():
    for path in _committed("h200-2026-12-02-calibrate*.json"):
        m = load_measurements(path)
        assert m["device"]["kind"] == "cuda" and "H200" in m["device"]["name"] and not m["quick"]
        assert m["dtype"] == "bf16"
        if "gemm_sweep" not in m:  # a run of some sections only (another SDPA backend, chains)
            assert set(m["sections"]) <= {"kernel_chain", "decode_attention", "prefill_attention"}, m["sections"]
            for r in m.get("prefill_attention", []):  # below the dense bf16 peak, and flops as counted
                d, dv = r["head_dim"], r.get("v_head_dim", r["head_dim"])
                assert r["flops"] == 2.0 * r["heads"] * (d + dv) * r["pairs"]
                assert 0 < r["tflops"] < H200_PEAK_TFLOPS, r
            for c in m.get("kernel_chain", []):
                assert 0 < c["graph"]["us_per_kernel"] < c["eager"]["host_us_per_kernel"]
            for r in m.get("decode_attention", []):
                assert r["impl"].endswith(("_default", "_compiled", "mla_gather_bmm")), r
                assert r["gbs"] < H200_PEAK_GBS * 1.05, r
            continue
        sweep = m["gemm_sweep"]
        if m["sections"] == ["gemm_sweep"]:  # the FP8 sweep (--gemm-dtype fp8): its own peak
            assert {g["dtype"] for g in sweep} == {"fp8"}
            for g in sweep:
                assert g["flops"] == 2.0 * g["m"] * g["n"] * g["k"]
                assert 0 < g["tflops"] < 1979.0, g  # the H200's dense FP8 peak
                assert g["bytes"] / g["seconds"] / 1e9 < H200_PEAK_GBS * 1.05, g
            continue
        assert {g["m"] for g in sweep} == set(calibrate.SWEEP_M)
        assert {(g["n"], g["k"]) for g in sweep} == {(p["n"], p["k"]) for p in calibrate.zoo_gemm_pairs()}
        for g in sweep + m["gemm"]:
            assert g["flops"] == 2.0 * g["m"] * g["n"] * g["k"]
            assert 0 < g["tflops"] < H200_PEAK_TFLOPS, g
            assert g["bytes"] / g["seconds"] / 1e9 < H200_PEAK_GBS * 1.05, g  # operands stream once
        for r in m["read_bandwidth"] + m["copy_bandwidth"] + [m["copy"]]:
            assert 0 < r["gbs"] < H200_PEAK_GBS, r
        big = max(m["read_bandwidth"], key=lambda r: r["bytes"])
        assert big["gbs"] > 0.7 * H200_PEAK_GBS  # a large read runs near the peak
        for c in m["kernel_chain"]:
            assert c["eager"]["us_per_kernel"] > 0 and c["graph"]["us_per_kernel"] > 0
            assert c["graph"]["us_per_kernel"] < c["eager"]["host_us_per_kernel"]
        for r in m["decode_attention"]:
            if "seconds" in r:
                assert r["gbs"] < H200_PEAK_GBS * 1.05, r  # KV reads are rotated past the L2
        for r in m["prefill_attention"]:
            if "seconds" in r:
                assert 0 < r["tflops"] < H200_PEAK_TFLOPS, r
        fitted = fit_profile(load_hardware("h200"), m)  # the old fit still reads the new file
        assert 0 < fitted["matmul_efficiency"]["value"] < 1


def test_committed_h200_decoder_runs_are_sane():
    for path in _committed("h200-2026-12-02-decoder*.json"):
        d = json.loads(path.read_text())
        assert d["npusim_reference_decoder"] == 1 and "H200" in d["device"]["name"] and not d["quick"]
        assert d["rows"]
        for r in d["rows"]:
            cfg = d["configs"][r["model"]]
            floor_ms = cfg["weight_bytes"] / (H200_PEAK_GBS * 1e9) * 1e3
            kv_ms = (2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2
                     * r["batch"] * r["context"]) / (H200_PEAK_GBS * 1e9) * 1e3
            assert r["median_ms"] > floor_ms + kv_ms, r  # a step reads every weight and its KV once
            assert all(s > 0 for s in r["samples_ms"])
            flops = 2.0 * cfg["weight_bytes"] / 2 * r["tokens"]
            assert flops / (r["median_ms"] * 1e-3) < H200_PEAK_TFLOPS * 1e12, r
        for kc in d["kernel_counts"]:
            assert kc["kernels_per_step"] > 0 and kc["kernels_per_layer"] > 0, kc
        for t in d["traces"]:
            f = MEASUREMENTS / "traces" / t["file"]
            assert f.exists() and f.stat().st_size < 2 * 2**20


def test_decoder_merge_joins_runs(tmp_path):
    dec = _decoder_module()
    paths = []
    for i, model in enumerate(("a", "b")):
        run = {"npusim_reference_decoder": 1, "date": "2026-12-02", "timestamp": f"t{i}", "quick": False,
               "args": {"models": model}, "device": {"name": "X"}, "dtype": "bf16", "plan": {"p": i},
               "configs": {model: {"num_layers": 1}}, "rows": [{"model": model}], "kernel_counts": [],
               "traces": [], "skipped": [{"model": model, "reason": "r"}],
               "host_probe_us": {"start": 1.0 + i, "end": 2.0}, "seconds": 3.0}
        p = tmp_path / f"{model}.json"
        p.write_text(json.dumps(run))
        paths.append(str(p))
    m = dec.merge(paths)
    assert [r["model"] for r in m["rows"]] == ["a", "b"] and set(m["configs"]) == {"a", "b"}
    assert [s["model"] for s in m["skipped"]] == ["a", "b"]
    assert [r["models"] for r in m["runs"]] == [["a"], ["b"]]
    assert m["runs"][1]["host_probe_us"]["start"] == 2.0 and m["plan"] == {"p": 0}
    assert "args" not in m and "host_probe_us" not in m and m["timestamp"] == "t0"


def test_summarize_prints_the_headline_tables():
    cal = _committed("h200-2026-12-02-calibrate.json")[0]
    decs = _committed("h200-2026-12-02-decoder*.json")
    proc = subprocess.run([sys.executable, str(MEASUREMENTS / "summarize.py"), str(cal), *map(str, decs)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for needle in ("| gate_up 28672x4096 |", "| read (sum) |", "| x.add_(1) 1x4096 |",
                   "FlexAttention paged, bs 16", "| llama-3.1-8b | compile_graph |", "Host probe"):
        assert needle in proc.stdout, needle


# --------------------------------------------------------------------------- the MLA + MoE decoder

def _mla_module():
    _decoder_module()  # it imports reference_decoder's helpers
    spec = importlib.util.spec_from_file_location("mla_moe_decoder", MEASUREMENTS / "mla_moe_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mla_absorbed_decode_equals_the_up_projected_prefill():
    """The decoder's absorbed decode (q into the latent space, attention over the cached latent,
    out through W_UV) computes what its prefill computes with K and V up-projected: the logits of
    a prompt's last token agree both ways, through MoE layers too."""
    torch = pytest.importorskip("torch")
    mla = _mla_module()
    cfg = mla.CONFIGS["tiny-mla"]
    torch.manual_seed(0)
    with torch.inference_mode():
        params = mla.init_params(cfg, "cpu", torch.float64)
        rope = mla.rope_tables(cfg, 64, "cpu", torch.float64)
        width = cfg["kv_lora_rank"] + cfg["rope_dim"]
        pools = [torch.zeros(256, width, dtype=torch.float64) for _ in range(cfg["num_layers"])]
        P = 23
        pre = mla.make_batch(cfg, "cpu", prompt=P, block_size=16, num_slots=256, seed=3)
        prefill_logits = mla.forward(params, rope, cfg, pre, pools)
        dec = {"num_decodes": 1, "chunk": 0, "input_ids": pre["input_ids"][-1:],
               "positions": pre["positions"][-1:], "slot_mapping": pre["slot_mapping"][-1:],
               "decode_slots": pre["slot_mapping"][None, :], "sample_rows": torch.tensor([0])}
        decode_logits = mla.forward(params, rope, cfg, dec, pools)
        # a different last token gives different logits: the comparison has teeth
        other = dict(dec, input_ids=(dec["input_ids"] + 1) % cfg["vocab"])
        other_logits = mla.forward(params, rope, cfg, other, pools)
    assert torch.allclose(decode_logits, prefill_logits, rtol=1e-5, atol=1e-5)  # (the router softmax is fp32)
    assert not torch.allclose(other_logits, prefill_logits, rtol=1e-3, atol=1e-3)


def test_mla_moe_routing_equals_a_per_token_loop():
    """The sorted-by-expert MoE of the decoder equals each token's top-k experts summed directly."""
    torch = pytest.importorskip("torch")
    mla = _mla_module()
    cfg = mla.CONFIGS["tiny-mla"]
    with torch.inference_mode():
        params = mla.init_params(cfg, "cpu", torch.float64, seed=5)
        lp = params["layers"][1]
        x = torch.randn(9, cfg["hidden"], dtype=torch.float64)
        got = mla.moe(x, lp, cfg)
        probs = (x @ lp["router"].T).softmax(-1)
        want = mla.swiglu(x, lp["ws_gate_up"], lp["ws_down"])
        for t in range(x.shape[0]):
            w, e = probs[t].topk(cfg["top_k"])
            for wi, ei in zip(w, e):
                g, u = (x[t] @ lp["w1"][ei]).chunk(2)
                want[t] += wi * ((torch.nn.functional.silu(g) * u) @ lp["w2"][ei])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)  # (the router softmax is fp32)


def test_mla_decoder_quick_cpu_run_writes_its_schema(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "mla.json"
    proc = subprocess.run([sys.executable, str(MEASUREMENTS / "mla_moe_decoder.py"), "--out", str(out),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["npusim_mla_moe_decoder"] == 1 and d["skipped"] == [] and d["dtype"] == "fp32"
    assert {r["phase"] for r in d["rows"]} == {"decode", "prefill"}
    assert all(r["median_ms"] > 0 and r["tokens"] == r["batch"] + r["prompt"] for r in d["rows"])
    by_layers = {kc["layers"]: kc["kernels_per_step"] for kc in d["kernel_counts"]}
    assert by_layers[3] - by_layers[2] > 0 and by_layers[2] > by_layers[1]


def test_mla_decode_gather_is_attention_of_every_head_over_the_latent():
    """The harness's MLA kernel equals softmax(q k^T / sqrt(d)) v per head, with k the gathered
    latent + RoPE key and v the latent, for pages scattered in the pool."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    c, dr, bs, B, H = 8, 4, 4, 2, 3
    pool = torch.randn(64, c + dr, generator=g, dtype=torch.float64)
    tables = calibrate.random_block_tables(torch, B, 3, 16, 1, seed=1)[0]
    slots = calibrate.block_slots(torch, tables, bs)
    q = torch.randn(B, H, c + dr, generator=g, dtype=torch.float64)
    got = calibrate.mla_decode_gather(torch, q, pool, slots, c)
    for b in range(B):
        kv = pool[slots[b]]
        for h in range(H):
            w = torch.softmax(kv @ q[b, h] / math.sqrt(c + dr), dim=0)
            assert torch.allclose(got[b, h], w @ kv[:, :c], rtol=1e-6, atol=1e-6)  # (softmax in fp32)
