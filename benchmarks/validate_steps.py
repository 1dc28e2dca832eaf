"""npusim's step predictions against measured steps of a real decoder, by device, engine, phase, model.

The measurements: npusim's reference decoder (hw_profiles/measurements/reference_decoder.py) on the
lent H200, plain PyTorch with a paged KV cache read by gather + SDPA, decode in a CUDA graph
("graph") or launched eagerly ("eager"), five models, decode over batch x context, batch-1
prefill, and mixed iterations (decodes plus one chunk): h200-2026-12-02-decoder-per-process.json
(graph and eager, one fresh process per model), h200-2026-12-02-decoder-{qwen3,1b}-compile.json
(compile styles, one process each) and h200-2026-12-02-decoder.json (the rest); and
DeepSeek-V2-Lite (MLA attention, 64 routed experts) in plain PyTorch, graph style, decode and
prefill (mla_moe_decoder.py: h200-2026-12-02-mla-moe-decoder.json), kept out of the "all" rows. The eager
rows again in another session (h200-2026-12-04-decoder-eager.json), and the graph rows again
(h200-2026-12-04-decoder-graph.json), are reported apart, as "... (2026-12-04)":
nothing was fitted to them.

What was fitted, and on what (everything else is a prediction):
- the device: the h200 profile's tables are microbenchmarks of single kernels (GEMMs over M,
  decode and prefill attention, dependent-kernel chains): h200-2026-12-02-calibrate.json;
- the engines torch-graph and torch-eager: kernels per op per layer and each op's least kernel time,
  from ONE trace, llama-3.1-8b decode at batch 8, context 2048 (`npusim calibrate engine`);
- torch-graph's kernels of the MLA and MoE ops (mla_absorb, moe_router, moe_combine): from ONE trace of
  the DeepSeek-V2-Lite decoder, decode at batch 8, context 2048;
- torch-graph's MLA decode attention: a one-layer microbenchmark (h200-2026-12-02-calibrate-mla.json);
- torch-compile's decode attention: the attention kernels of ONE compiled layer of the decoder
  (llama-3.1-8b's and llama-3.2-1b's), over batch x context (compiled_attention.py:
  h200-2026-12-02-compiled-attention.json), not a decoder step; the compiled decoder rows come from
  one process per model (h200-2026-12-02-decoder-{qwen3,1b}-compile.json, then the older file's
  llama-3.1-8b, the first model its process compiled): qwen3-8b's layers were never timed;
- torch-eager's host dispatch per kernel: from ONE measured eager step, the traced shape
  (llama-3.1-8b decode at batch 8, context 2048; host-bound: its time over its kernels,
  `calibrate engine --step-ms`), see FIT_EAGER below. This VM's host speed drifts up to 2x within
  a run (the same model's first rows took 26-32 ms for the same kernels): eager rows carry that.
Rows used in fitting are marked and left out of the error statistics.

Run: .venv/bin/python benchmarks/validate_steps.py [--rows]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from npusim.costmodel import CostModel
from npusim.specs import ceil_div, load_engine_profile, load_hardware, load_model

MEAS = Path(__file__).resolve().parent.parent / "hw_profiles" / "measurements"
FILES = ("h200-2026-12-02-decoder-qwen3-compile.json", "h200-2026-12-02-decoder-1b-compile.json",
         "h200-2026-12-02-decoder-per-process.json",
         "h200-2026-12-02-decoder.json")
ENGINES = {"graph": "torch-graph", "eager": "torch-eager", "compile_graph": "torch-compile"}
FIT_TRACE = ("llama-3.1-8b", "decode", 8, 2048)
FIT_EAGER = ("llama-3.1-8b", "eager", "decode", 8, 2048)
# DeepSeek-V2-Lite (MLA + MoE) in its own decoder (mla_moe_decoder.py), graph style: torch-graph's
# kernels of the MLA and MoE ops come from its trace at this shape; its rows stay out of "all"
MLA_FILE = "h200-2026-12-02-mla-moe-decoder.json"
# The eager rows again in another session (2026-12-04, one process per model, nothing fitted to
# them): how far a dispatch cost fitted in one session carries to the same VM on another day
OTHER_SESSION = ("h200-2026-12-04-decoder-eager.json",
                 "h200-2026-12-04-decoder-graph.json")  # (graph, the five models)
FIT_MLA = ("deepseek-v2-lite", "decode", 8, 2048)


def rows() -> list[dict]:
    """Measured rows, each (model, style, phase, shape) once: the per-process file first."""
    seen, out = set(), []
    for name in FILES:
        data = json.loads((MEAS / name).read_text())
        for r in data["rows"]:
            if "median_ms" not in r or r["style"] not in ENGINES or r.get("attn") not in ("gather", "sdpa"):
                continue
            key = (r["model"], r["style"], r["phase"], r["batch"], r["context"], r["prompt"], r["chunk"],
                   r["cached"], r["block_size"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    for r in json.loads((MEAS / MLA_FILE).read_text())["rows"]:
        out.append({"attn": "gather", "chunk": 0, "cached": 0, **r})
    for name in OTHER_SESSION:
        for r in json.loads((MEAS / name).read_text())["rows"]:
            if "median_ms" in r and r["style"] in ENGINES and r.get("attn") in ("gather", "sdpa"):
                out.append({**r, "session": "2026-12-04"})
    return out


def predict(cm: CostModel, r: dict) -> float:
    """npusim's iteration time (ms) for a measured row."""
    bs = r["block_size"]
    B, ctx = r["batch"], r["context"]
    kw: dict = {}
    if r["phase"] in ("decode", "mixed") and B:
        kw.update(num_decodes=B, decode_context_tokens=B * ctx, decode_kv_slots=B * ceil_div(ctx, bs) * bs)
    if r["phase"] == "prefill":
        kw["prefill_chunks"] = [(r["prompt"], 0)]
    elif r["phase"] == "mixed":
        kw["prefill_chunks"] = [(r["chunk"], r["cached"])]
    kw["num_sampled"] = r["sampled"]
    device = cm.step_time(**kw)
    host, held = cm.host_times(r["sampled"], device, bool(kw.get("num_decodes")), bool(kw.get("prefill_chunks")))
    return (host + held) * 1e3


def main() -> None:
    hw = load_hardware("h200")
    engines = {s: load_engine_profile(e) for s, e in ENGINES.items()}
    models = {}
    results = []
    for r in rows():
        m = models.setdefault(r["model"], load_model(r["model"]))
        cm = CostModel(hw, m, engine=engines[r["style"]])
        pred = predict(cm, r)
        fitted = "session" not in r and ((r["model"], r["phase"], r["batch"], r["context"]) == FIT_TRACE
                  or (r["model"], r["style"], r["phase"], r["batch"], r["context"]) == FIT_EAGER
                  or (r["model"], r["phase"], r["batch"], r["context"]) == FIT_MLA)
        results.append(dict(r, predicted_ms=pred, error=pred / r["median_ms"] - 1, fitted=fitted))
    if "--rows" in sys.argv:
        for x in results:
            shape = (f"B={x['batch']} ctx={x['context']}" if x["phase"] == "decode" else
                     f"P={x['prompt']}" if x["phase"] == "prefill" else
                     f"B={x['batch']} ctx={x['context']} c={x['chunk']} p={x['cached']}")
            print(f"{x['model']:<13} {x['style']:<6} {x['phase']:<8} {shape:<28} bs={x['block_size']:<4} "
                  f"measured {x['median_ms']:8.3f}  npusim {x['predicted_ms']:8.3f}  {x['error']:+7.1%}"
                  + ("  (fitted)" if x["fitted"] else ""))
        print()
    groups: dict[tuple, list[float]] = {}
    for x in results:
        if x["fitted"]:
            continue
        phase = x["phase"]
        if phase == "prefill" and x["prompt"] < 2048:
            phase = "prefill < 2k"
        engine = ENGINES[x["style"]] + (f" ({x['session']})" if "session" in x else "")
        groups.setdefault(("h200", engine, phase, x["model"]), []).append(x["error"])
        if x["model"] != FIT_MLA[0]:
            groups.setdefault(("h200", engine, phase, "all"), []).append(x["error"])
    print(f"{'device':<6} {'engine':<25} {'phase':<13} {'model':<13} {'rows':>4} {'median |err|':>13} "
          f"{'max |err|':>10} {'median err':>11}")
    for key in sorted(groups, key=lambda k: (k[1], k[2], k[3] == "all", k[3])):
        errs = groups[key]
        print(f"{key[0]:<6} {key[1]:<25} {key[2]:<13} {key[3]:<13} {len(errs):>4} "
              f"{statistics.median(abs(e) for e in errs):>13.1%} {max(abs(e) for e in errs):>10.1%} "
              f"{statistics.median(errs):>+11.1%}")
    print(f"\n{sum(x['fitted'] for x in results)} rows were used in fitting and are not in the table; "
          f"{len(results)} rows in all.")


if __name__ == "__main__":
    main()
