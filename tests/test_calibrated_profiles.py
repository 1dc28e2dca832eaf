"""The GPU profiles were calibrated on the lent H100 and H200 (hw_profiles/measurements/): the cost
model priced with them must reproduce those measurements."""

import json
from pathlib import Path

import pytest

from npusim.costmodel import CostModel
from npusim.specs import HW_PROFILE_DIR, load_hardware, load_model

MEASURED = {"h100-sxm": "h100-sxm-2026-11-28.json", "h200": "h200-2026-11-28.json"}


def measurements(name):
    return json.loads((HW_PROFILE_DIR / "measurements" / MEASURED[name]).read_text())


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_calibrated_numbers_name_their_measurement_file(name):
    hw = load_hardware(name)
    for field in ("matmul_efficiency", "memory_efficiency", "kernel_latency_us"):
        prov = hw.provenance[field]
        assert prov.kind == "calibrated"
        named = [f for f in (HW_PROFILE_DIR / "measurements").glob(f"{name}-*.json") if f.name in prov.source]
        assert named, prov.source  # the measurement file it names is committed
    for f in hw.calibration_files:  # the tables the cost model reads are committed too
        assert Path(f).exists()


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_roofline_reproduces_device_bound_gemms(name):
    hw = load_hardware(name).without_tables()  # (the roofline with the fitted efficiencies, no tables)
    cm = CostModel(hw, load_model("llama-3.1-8b"))
    ratios = []
    for g in measurements(name)["gemm"]:
        if g["m"] < 1024 or g["dtype"] != "bf16":
            continue  # smaller GEMMs in eager mode are bound by the ~10 us launch, not the device
        predicted = cm.gemm(g["m"], g["k"], g["n"], 2.0).time_s
        ratios.append(predicted / g["seconds"])
    assert len(ratios) >= 4
    for r in ratios:
        assert 0.85 <= r <= 1.15, ratios


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_roofline_reproduces_the_device_copy(name):
    hw = load_hardware(name)
    copy = measurements(name)["copy"]
    cm = CostModel(hw, load_model("llama-3.1-8b"))
    predicted = cm.vector(0.0, copy["bytes_moved"]).time_s  # read + write
    assert predicted == pytest.approx(copy["seconds"], rel=0.03)
