"""Measure the grouped expert GEMMs of a mixture-of-experts layer, to check npusim's MoE pricing.

For T tokens each routed to k of E experts (uniformly at random, seeded), the tokens are sorted by
expert and each expert's SwiGLU runs as two grouped GEMMs: gate_up (h -> 2f) and down (f -> h),
one kernel over all experts (torch._grouped_mm where the device has it; else one torch.mm per
expert that got tokens, timed as the fallback it is). Device-agnostic: torch_npu when present,
else CUDA, else the CPU (quick smoke runs only).

Run: python hw_profiles/measurements/moe_grouped_gemm.py --out FILE.json [--quick]
         [--models qwen3-30b-a3b,mixtral-8x7b,...] (default: those two; MORE_SHAPES has the others)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

# Qwen3-30B-A3B's experts; Mixtral-8x7B's (few, large)
SHAPES = [
    {"model": "qwen3-30b-a3b", "experts": 128, "top_k": 8, "hidden": 2048, "expert_size": 768},
    {"model": "mixtral-8x7b", "experts": 8, "top_k": 2, "hidden": 4096, "expert_size": 14336},
]
# whole experts of the zoo's other MoE models (measured 2026-12-04): DeepSeek-V2-Lite's (the
# validation decoder's), DeepSeek-V3's and Qwen3-235B-A22B's
MORE_SHAPES = [
    {"model": "deepseek-v2-lite", "experts": 64, "top_k": 6, "hidden": 2048, "expert_size": 1408},
    {"model": "deepseek-v3", "experts": 256, "top_k": 8, "hidden": 7168, "expert_size": 2048},
    {"model": "qwen3-235b-a22b", "experts": 128, "top_k": 8, "hidden": 4096, "expert_size": 1536},
    # each expert's intermediate split over tensor-parallel devices, as vLLM runs them without
    # expert parallelism (one device's share)
    {"model": "qwen3-30b-a3b-tp2", "base_model": "qwen3-30b-a3b", "tp": 2,
     "experts": 128, "top_k": 8, "hidden": 2048, "expert_size": 384},
    {"model": "qwen3-235b-a22b-tp8", "base_model": "qwen3-235b-a22b", "tp": 8,
     "experts": 128, "top_k": 8, "hidden": 4096, "expert_size": 192},
    {"model": "deepseek-v3-tp8", "base_model": "deepseek-v3", "tp": 8,
     "experts": 256, "top_k": 8, "hidden": 7168, "expert_size": 256},
    {"model": "mixtral-8x7b-tp8", "base_model": "mixtral-8x7b", "tp": 8,
     "experts": 8, "top_k": 2, "hidden": 4096, "expert_size": 1792},
]
TOKENS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
MORE_TOKENS = [8192]  # with --models: prefill chunks as long as vLLM's on large devices


def device():
    import torch

    try:
        import torch_npu  # noqa: F401

        return torch.device("npu"), "npu"
    except ImportError:
        pass
    if torch.cuda.is_available():
        return torch.device("cuda"), "cuda"
    return torch.device("cpu"), "cpu"


def sync(kind):
    import torch

    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "npu":
        torch.npu.synchronize()


def timed(fn, kind, reps: int) -> float:
    """Median seconds of fn over reps runs of a batch of calls, after warm-up."""
    for _ in range(3):
        fn()
    sync(kind)
    inner = 20 if kind != "cpu" else 2
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(kind)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def measure(shape: dict, tokens: int, dev, kind: str, reps: int) -> dict:
    import torch

    E, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["expert_size"]
    g = torch.Generator().manual_seed(tokens)
    choice = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])  # (T, k) distinct experts
    counts = torch.bincount(choice.flatten(), minlength=E)
    dtype = torch.bfloat16 if kind != "cpu" else torch.float32
    x = torch.randn(tokens * k, h, device=dev, dtype=dtype)
    w1 = torch.randn(E, h, 2 * f, device=dev, dtype=dtype) * 0.01
    w2 = torch.randn(E, f, h, device=dev, dtype=dtype) * 0.01
    mid = torch.randn(tokens * k, f, device=dev, dtype=dtype)
    offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    grouped = hasattr(torch, "_grouped_mm") and kind == "cuda"
    method = "torch._grouped_mm"
    if grouped:
        try:
            torch._grouped_mm(x, w1, offs=offs)
        except Exception as e:  # noqa: BLE001 - an unsupported device or shape: the fallback says so
            grouped, method = False, f"per-expert torch.mm (torch._grouped_mm failed: {type(e).__name__})"
    else:
        method = "per-expert torch.mm (no torch._grouped_mm here)"
    ends = counts.cumsum(0).tolist()
    starts = [0] + ends[:-1]
    active = [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]

    def gate_up():
        if grouped:
            return torch._grouped_mm(x, w1, offs=offs)
        return [x[s:t] @ w1[e] for e, s, t in active]

    def down():
        if grouped:
            return torch._grouped_mm(mid, w2, offs=offs)
        return [mid[s:t] @ w2[e] for e, s, t in active]

    return {**shape, "tokens": tokens, "active_experts": len(active), "max_rows": int(counts.max()),
            "method": method, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "gate_up_seconds": timed(gate_up, kind, reps), "down_seconds": timed(down, kind, reps)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="a few small points (a CPU smoke run)")
    ap.add_argument("--models", help="comma list of: " + ", ".join(s["model"] for s in SHAPES + MORE_SHAPES))
    args = ap.parse_args()
    dev, kind = device()
    tokens = TOKENS[:3] if args.quick else TOKENS
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.models is not None:
        known = {s["model"]: s for s in SHAPES + MORE_SHAPES}
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in known]
        if unknown or not names:
            what = f"unknown {unknown[0]!r}" if unknown else "no model given"
            raise SystemExit(f"moe_grouped_gemm: --models: {what} (known: {', '.join(known)})")
        shapes = [known[m] for m in names]
        tokens = tokens if args.quick else TOKENS + MORE_TOKENS
    rows = []
    for shape in shapes:
        for t in tokens:
            r = measure(shape, t, dev, kind, reps=3 if args.quick else 15)
            rows.append(r)
            print(f"{r['model']:14s} T={t:5d} active {r['active_experts']:3d}  gate_up {r['gate_up_seconds'] * 1e6:9.1f} us"
                  f"  down {r['down_seconds'] * 1e6:9.1f} us  ({r['method']})", flush=True)
    name = torch.cuda.get_device_name() if kind == "cuda" else kind
    json.dump({"npusim_moe_grouped_gemm": 1, "date": datetime.date.today().isoformat(), "device": name,
               "torch": torch.__version__, "moe_grouped_gemm": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
