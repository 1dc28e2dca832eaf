"""Calibration: device detection, the fit from measurements, the written profile, the torch harness."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_cli
from npusim import calibrate
from npusim.calibrate import (DeviceInfo, detect_device, fit_notes, fit_profile, load_measurements,
                              write_profile)
from npusim.errors import NpusimError
from npusim.specs import NUMBER_FIELDS, load_hardware

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
    # an H100's numbers against the 910B2 profile: 785 > 353.9 TFLOP/s and 3015 > 1600 GB/s
    with pytest.raises(NpusimError) as e:
        fit_profile(load_hardware("ascend-910b2"), h100_measurements())
    msg = str(e.value)
    assert "785.0 TFLOP/s" in msg and "353.9" in msg and "matmul efficiency 2.22 > 1" in msg
    assert "3015 GB/s" in msg and "memory efficiency 1.88 > 1" in msg
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
    assert set(got.provenance) == set(NUMBER_FIELDS)
    for field in FITTED:
        assert got.provenance[field].kind == "calibrated"
        assert "npusim calibrate on NVIDIA H100" in got.provenance[field].source
    assert got.matmul_efficiency == pytest.approx(0.7937, abs=1e-4)
    # everything not fitted is carried over with its own provenance
    assert got.matmul_tflops_bf16 == hw.matmul_tflops_bf16
    assert got.provenance["memory_bandwidth_gbs"] == hw.provenance["memory_bandwidth_gbs"]
    assert got.kv_block_sizes == hw.kv_block_sizes
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
    assert m["npusim_calibration"] == 1 and m["quick"] is True
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
