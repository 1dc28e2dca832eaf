"""Check the H100's tables carried from the H200 (hw_profiles/h100-sxm.yaml, calibration_transfer)
against the GEMMs measured on an H100 itself (hw_profiles/measurements/h100-sxm-2026-11-28.json):
none of these rows was used to carry the tables.

    python benchmarks/validate_transfer.py

Prints, per GEMM (M x K) @ (K x N) in bf16, the time the carried tables give, the time measured
on the H100 and the error, then the median and max error for weight-streaming (M <= 64) and the
rest.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from npusim.costmodel import CostModel
from npusim.specs import load_hardware, load_model

MEASURED = Path(__file__).resolve().parents[1] / "hw_profiles" / "measurements" / "h100-sxm-2026-11-28.json"


def main() -> None:
    hw = load_hardware("h100-sxm")
    assert hw.transfer_from is not None, "h100-sxm no longer carries the H200's tables"
    cm = CostModel(hw, load_model("llama-3.1-8b"), engine="torch-graph")
    rows = json.loads(MEASURED.read_text())["gemm"]
    groups: dict[str, list[float]] = {"M <= 64 (weights streamed)": [], "M > 64": []}
    print(f"{'M':>6s} {'N':>6s} {'K':>6s} {'carried us':>11s} {'measured us':>12s} {'error':>8s}")
    for r in rows:
        m, n, k = r["m"], r["n"], r["k"]
        t = cm.gemm(m, k, n).time_s
        err = (t - r["seconds"]) / r["seconds"]
        groups["M <= 64 (weights streamed)" if m <= 64 else "M > 64"].append(abs(err))
        print(f"{m:6d} {n:6d} {k:6d} {t * 1e6:11.1f} {r['seconds'] * 1e6:12.1f} {err:+8.1%}")
    print()
    for g, e in groups.items():
        print(f"{g:28s} median |error| {statistics.median(e):6.1%}, max {max(e):6.1%} over {len(e)}")


if __name__ == "__main__":
    main()
