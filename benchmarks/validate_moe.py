"""npusim's grouped expert GEMMs against measured ones on the H200, on layouts not used for them.

The measurements: hw_profiles/measurements/moe_grouped_gemm.py on the lent H200 (torch._grouped_mm,
bf16, eager launches timed by wall clock over 20 calls, tokens routed uniformly at random to
top-k of E experts): Qwen3-30B-A3B's experts (128, top 8, 2048 -> 768) and Mixtral-8x7B's (8,
top 2, 4096 -> 14336), 1 to 4096 tokens (2026-12-02), and DeepSeek-V2-Lite's (64, top 6, 2048 ->
1408), DeepSeek-V3's (256, top 8, 7168 -> 2048) and Qwen3-235B-A22B's (128, top 8, 4096 -> 1536),
1 to 8192 tokens (2026-12-04), and one tensor-parallel device's share of four of them (each
expert's intermediate split: Qwen3-30B-A3B over 2, Qwen3-235B-A22B, DeepSeek-V3 and Mixtral over 8,
as vLLM runs them without expert parallelism; 2026-12-04). The h200 profile prices MoE layers from
these files; here each layout is predicted three ways:
- the roofline alone (the profile's matmul and memory efficiencies, fitted to dense GEMMs);
- from the nearest OTHER layout's measured curve, carried to this layout by the roofline (held out);
- from the same layout's curve with every other token count left out (interpolation).

Run: .venv/bin/python benchmarks/validate_moe.py [--rows]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from npusim.calibration import GroupedGemmTable
from npusim.costmodel import CostModel
from npusim.specs import load_hardware, load_model

MEAS_DIR = Path(__file__).resolve().parent.parent / "hw_profiles" / "measurements"
MEAS = ("h200-2026-12-02-moe-grouped-gemm.json", "h200-2026-12-04-moe-grouped-gemm.json",
        "h200-2026-12-04-moe-grouped-gemm-tp.json")
OPS = (("gate_up_proj", "gate_up_seconds"), ("down_proj", "down_seconds"))


def main() -> None:
    rows = []
    for name in MEAS:
        data = json.loads((MEAS_DIR / name).read_text())
        rows += data["moe_grouped_gemm"]
        print(f"{name}: {data['device']}, torch {data['torch']}, {len(data['moe_grouped_gemm'])} token counts x 2 ops")
    h200 = load_hardware("h200")
    roofline_hw = h200.without_tables()
    models = sorted({r["model"] for r in rows})
    errors: dict[tuple[str, str], list[float]] = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        other = GroupedGemmTable([r for r in rows if r["model"] != model])
        even = GroupedGemmTable([r for i, r in enumerate(mine) if i % 2 == 0 or i == len(mine) - 1])
        spec = load_model(mine[0].get("base_model", model))
        if "base_model" in mine[0]:  # one tensor-parallel device's share of every expert
            spec = spec.model_copy(update={"moe_intermediate_size": mine[0]["expert_size"]})
        roof = CostModel(roofline_hw, spec)
        shape = (spec.num_experts, spec.experts_per_token, spec.hidden_size, spec.moe_intermediate_size)
        for i, r in enumerate(mine):
            ops = {o.name: o for o in roof.layer_dense_ops(r["tokens"])}
            for op, key in OPS:
                meas = r[key]
                guesses = {"roofline": ops[op].time_s,
                           "other layout": other.time(op, *shape, r["tokens"], roof._grouped_roofline(op))}
                if not (i % 2 == 0 or i == len(mine) - 1):
                    guesses["interpolated"] = even.time(op, *shape, r["tokens"], roof._grouped_roofline(op))
                for how, t in guesses.items():
                    errors.setdefault((model, how), []).append(t / meas - 1)
                if "--rows" in sys.argv:
                    print(f"{model:14s} T={r['tokens']:5d} {op:13s} measured {meas * 1e6:8.1f} us  "
                          + "  ".join(f"{h} {t * 1e6:8.1f} ({t / meas - 1:+.0%})" for h, t in guesses.items()))
    print(f"\n{'layout':14s} {'predicted from':14s} {'GEMMs':>5s} {'median |err|':>12s} {'max |err|':>9s} {'median err':>10s}")
    for (model, how), errs in errors.items():
        print(f"{model:14s} {how:14s} {len(errs):5d} {statistics.median(abs(e) for e in errs):12.1%} "
              f"{max(abs(e) for e in errs):9.1%} {statistics.median(errs):+10.1%}")


if __name__ == "__main__":
    main()
