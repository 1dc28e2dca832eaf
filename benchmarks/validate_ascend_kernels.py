"""Real Ascend kernel times (an Atlas 800 A3 die, from vllm-ascend profiles) beside npusim's price.

    python benchmarks/validate_ascend_kernels.py [--cases benchmarks/ascend_kernel_cases.yaml]

Rows marked as fitted set the Ascend profiles' GEMM and prefill-attention terms (their sources in
hw_profiles/ say which); the rest were used for nothing and show how far those terms carry: other
models, shapes and weight formats, and whole decode steps (device, collectives and host) of
another run. Prints each row and the median
and largest |error| of the fitted and the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from npusim.costmodel import CostModel
from npusim.specs import load_hardware, load_model, tp_shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=str(Path(__file__).with_name("ascend_kernel_cases.yaml")))
    args = ap.parse_args()
    cases = yaml.safe_load(Path(args.cases).read_text())
    hw = load_hardware(cases["hw"])
    rows = []
    for r in cases["gemm"]:
        cm = CostModel(hw, load_model("qwen3-8b"), weight_dtype=r["dtype"])
        w = {"bf16": 2.0, "int8": 1.0, "w8a8": 1.0}[r["dtype"]]
        # (a W8A8 row is the GEMM kernel's time, its input quantised by a kernel before it)
        rows.append(("gemm", r, cm.gemm(r["m"], r["k"], r["n"], w, quantise_input=False).time_s * 1e6))
    quant = CostModel(hw, load_model("qwen3-8b"), weight_dtype="w8a8", engine="vllm-ascend-graph")
    for r in cases.get("act_quant", []):
        rows.append(("act_quant", r, quant._quantise(r["m"] * r["k"], experts=r["experts"])[0] * 1e6))
    for r in cases["prefill_attention"]:
        m = tp_shard(load_model(r["model"]), r["tp"])
        cm = CostModel(hw, m, tp=r["tp"])
        t = cm.attention_prefill_op([(r["tokens"], 0)] * r["sequences"]).time_s
        rows.append(("prefill attention", r, t * 1e6))
    for r in cases["decode_attention"]:
        m = tp_shard(load_model(r["model"]), r["tp"])
        cm = CostModel(hw, m, tp=r["tp"])
        slots = r["batch"] * -(-r["context"] // cm.block_size) * cm.block_size
        rows.append(("decode attention", r, cm.attention_decode_op(r["batch"], r["batch"] * r["context"], slots).time_s * 1e6))
    for r in cases.get("steps", []):
        out = subprocess.run([sys.executable, "-m", "npusim", "step", "--hw", cases["hw"], "--model", r["model"],
                              "--tp", str(r["tp"]), "--batch", str(r["batch"]), "--context", str(r["context"]),
                              "--json"], capture_output=True, text=True, check=True).stdout
        rows.append(("decode step", {**r, "us": r["ms"] * 1e3}, json.loads(out)["iteration_ms"] * 1e3))
    print(f"{hw.name}: {cases['source'].split()[0]}")
    print(f"{'kernel':20s} {'what':58s} {'shape':>22s} {'predicted us':>12s} {'measured us':>11s} {'error':>7s}  used")
    errors: dict[bool, list[float]] = {True: [], False: []}
    for kind, r, us in rows:
        err = (us - r["us"]) / r["us"]
        fit = bool(r.get("fit"))
        errors[fit].append(abs(err))
        shape = (f"{r['m']}x{r['k']}x{r['n']} {r['dtype']}" if kind == "gemm" else f"{r['m']}x{r['k']}" if kind == "act_quant"
                 else f"{r.get('sequences', r.get('batch'))}x{r.get('tokens', r.get('context'))}"
                 + (f" tp{r['tp']}" if kind == "decode step" else ""))
        print(f"{kind:20s} {r['what'][:58]:58s} {shape:>22s} {us:12.1f} {r['us']:11.1f} {err:+7.1%}  {'fit' if fit else 'held out'}")
    print()
    for fit, e in errors.items():
        if e:
            print(f"{'fitted' if fit else 'held out':9s} median |error| {statistics.median(e):6.1%}, max {max(e):6.1%} over {len(e)} kernels")


if __name__ == "__main__":
    main()
