"""The device measurement scripts of hw_profiles/measurements on their CPU path (a dry run): what
they write is what their docstrings say, so a run on a lent device needs no second try."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the measurement scripts run on torch (the calibration extra)")

SCRIPTS = Path(__file__).resolve().parents[1] / "hw_profiles" / "measurements"


def test_allreduce_writes_its_rows_and_the_latency_and_bandwidth_they_imply(tmp_path):
    out = tmp_path / "ar.json"
    subprocess.run([sys.executable, str(SCRIPTS / "allreduce.py"), "--device", "cpu", "--ranks", "3",
                    "--repeats", "2", "--max-bytes", str(32 << 10), "--port", "29731", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    d = json.loads(out.read_text())
    assert d["schema"] == "npusim_allreduce" and d["device"]["ranks"] == 3 and d["device"]["backend"] == "gloo"
    assert [r["bytes"] for r in d["rows"]] == [2 << 10, 8 << 10, 32 << 10]
    for r in d["rows"]:
        assert r["graph_us"] is None and r["eager_us"] > 0
        # nccl-tests' bus bandwidth: bytes x 2(N-1)/N over the time
        assert r["busbw_gbs"] == pytest.approx(r["bytes"] * 4 / 3 / (r["eager_us"] * 1e-6) / 1e9)
    assert d["fit"]["from"] == "eager_us"
    assert d["fit"]["latency_us"] == min(r["eager_us"] for r in d["rows"])
    # npusim's link_latency_us: 2 steps through a switch, 2(N-1) = 4 round a ring of 3
    assert d["fit"]["link_latency_us_switch"] == pytest.approx(d["fit"]["latency_us"] / 2)
    assert d["fit"]["link_latency_us_ring"] == pytest.approx(d["fit"]["latency_us"] / 4)


def test_sustained_times_both_phases_in_windows_and_records_its_arguments(tmp_path):
    out = tmp_path / "s.json"
    run = subprocess.run([sys.executable, str(SCRIPTS / "sustained.py"), "--device", "cpu", "--small",
                          "--gemm-seconds", "1", "--read-seconds", "0.5", "--window-s", "0.2", "--out", str(out)],
                         check=True, capture_output=True, text=True, timeout=120)
    d = json.loads(out.read_text())
    assert d["args"]["gemm_seconds"] == 1.0 and [p["name"] for p in d["phases"]] == ["gemm", "read"]
    gemm = d["phases"][0]
    m, k, n = gemm["shape"]
    for w in gemm["windows"]:
        assert w["rate"] == pytest.approx(2.0 * m * k * n / 1e12 * w["calls"] / w["seconds"])
    assert d["smi"] == [] and "gemm: first windows" in run.stdout


def test_mla_prefill_probe_times_both_layouts_under_every_backend_that_runs(tmp_path):
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, str(SCRIPTS / "mla_prefill_probe.py"), "--device", "cpu", "--small",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    d = json.loads(out.read_text())
    assert d["npusim_mla_prefill_probe"] == 1
    rows = d["rows"]
    assert {(r["chunk"], r["layout"], r["backend"]) for r in rows} == {
        (s, lay, b) for s in (16, 32) for lay in ("contiguous", "decoder")
        for b in ("default", "flash", "efficient", "cudnn", "math")}
    for r in rows:
        assert ("seconds" in r) != ("error" in r)
        # the calibration's convention: 2 H (D + Dv) causal pairs
        assert r["flops"] == 2.0 * r["heads"] * (r["head_dim"] + r["v_head_dim"]) * r["chunk"] * (r["chunk"] + 1) / 2
    assert all("seconds" in r for r in rows if r["backend"] in ("default", "math"))


def test_sync_probe_times_each_step_kind_and_records_syncs(tmp_path):
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, str(SCRIPTS / "sync_probe.py"), "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    d = json.loads(out.read_text())
    assert d["npusim_sync_probe"] == 1 and [s["kind"] for s in d["steps"]] == ["decode", "prefill", "mixed"]
    for s in d["steps"]:
        assert s["syncs"] == [] and 0 < s["launched_ms"] <= s["wall_ms"]
