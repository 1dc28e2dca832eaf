"""Decode attention as the compiled reference decoder runs it: one layer of `reference_decoder.py`
through torch.compile (as its compile styles do), timed kernel by kernel with torch.profiler.

    python hw_profiles/measurements/compiled_attention.py --out FILE.json [--models a,b] [--device cuda]

Inductor fuses the decoder's gather of the KV pages with the RoPE and the cache write around the
SDPA call, and picks kernels by how the shapes were seen (static, then dynamic batch, then dynamic
context), so a standalone microbenchmark of the gather and SDPA does not reproduce what the
compiled decoder spends on attention. Here the decoder's own `layer_forward` is compiled once per
model and run over a batch x context grid in the decoder's order of shapes; each shape's device
kernels are summed by class, attention being every kernel whose name says attention or SDPA (cuDNN,
flash) and Inductor's fused kernels that gather the pages (`index` in their name: the gather, with
the RoPE and the cache write it absorbed). The output is an `npusim calibrate` file with
`decode_attention` rows of impl `gather_sdpa_compiled_inplace` (its rows carry every kernel's name
and microseconds, so the split can be checked), which the torch-compile engine profile names.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_decoder as rd  # noqa: E402  (the decoder this measures)

torch = rd.torch
IMPL = "gather_sdpa_compiled_inplace"
ATTN = ("flash", "fmha", "sdpa", "attention", "attn", "cudnn")


def attention_kernel(name: str) -> bool:
    n = name.lower()
    return any(h in n for h in ATTN) or (n.startswith("triton") and "index" in n)


def profile_layer(fn, dev: str, calls: int) -> list[tuple[str, float]]:
    """(name, microseconds) of every device kernel of `calls` calls of fn, in order."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        rd.sync(dev)
    out = []
    for e in prof.events():
        on_device = str(getattr(e, "device_type", "")).endswith("CUDA")
        if dev.startswith("cuda") and not on_device:
            continue
        if not dev.startswith("cuda") and (e.cpu_parent is not None or not e.name.startswith(("aten::", "graph_"))):
            continue
        name = e.name
        if "memcpy" in name.lower() or "memset" in name.lower():
            continue
        us = getattr(e, "device_time", None) if on_device else getattr(e, "cpu_time", None)
        if us is None:  # (older profilers)
            us = getattr(e, "cuda_time", 0.0) if on_device else e.cpu_time_total
        out.append((name, float(us)))
    return out


def run(args) -> dict:
    dev = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    on_cpu = not dev.startswith("cuda")
    models = args.models.split(",") if args.models else (["tiny"] if on_cpu else ["llama-3.1-8b", "llama-3.2-1b"])
    # the decoder's compiled shapes first, in its order (its guards go dynamic the same way), then the rest
    first = [(1, 2048), (8, 2048), (32, 2048), (128, 2048), (32, 8192)] if not on_cpu else [(1, 32), (4, 32)]
    grid = [(b, c) for c in ([512, 1024, 2048, 4096, 8192] if not on_cpu else [32, 64])
            for b in ([1, 4, 16, 32, 64, 128] if not on_cpu else [1, 2])]
    shapes = first + [s for s in grid if s not in first]
    block_size = 16
    rows, skipped = [], []
    t0 = time.perf_counter()
    for name in models:
        cfg = dict(rd.config(name), num_layers=1)
        params = rd.init_params(cfg, dev, dtype)
        lp = params["layers"][0]
        max_tokens = max(b * c for b, c in shapes)
        num_slots = -(-(max_tokens + (max(b for b, _ in shapes) + 2) * block_size) // block_size) * block_size
        pool = rd.kv_pools(cfg, num_slots, 1, dev, dtype)[0]
        cos_t, sin_t = rd.rope_tables(cfg, max(c for _, c in shapes) + 8, dev, dtype)
        layer = torch.compile(rd.layer_forward, mode=args.compile_mode)
        for b, c in shapes:
            key = {"model": name, "batch": b, "context": c}
            if time.perf_counter() - t0 > args.budget_s:
                skipped.append({**key, "reason": "time budget spent"})
                continue
            try:
                batch = rd.make_batch(cfg, dev, num_decodes=b, context=c, block_size=block_size,
                                      num_slots=num_slots, attn="gather", seed=b * 7919 + c)
                x = torch.randn(b, cfg["hidden_size"], device=dev, dtype=dtype)
                cos = cos_t[batch.positions].unsqueeze(1)
                sin = sin_t[batch.positions].unsqueeze(1)

                def fn(layer=layer, lp=lp, x=x, cos=cos, sin=sin, pool=pool, batch=batch, cfg=cfg):
                    return layer(lp, x, cos, sin, pool, batch, cfg, "gather", None)
                s = time.perf_counter()
                fn()
                rd.sync(dev)
                first_call = time.perf_counter() - s
                for _ in range(args.warmup):
                    fn()
                rd.sync(dev)
                kernels = profile_layer(fn, dev, args.calls)
            except Exception as e:  # one failed shape must not lose the run
                skipped.append({**key, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
                if not on_cpu:
                    torch.cuda.empty_cache()
                continue
            per_call: dict[str, list[float]] = collections.defaultdict(list)
            for kname, us in kernels:
                per_call[kname].append(us)
            attn_us = sum(us for kname, us in kernels if attention_kernel(kname)) / args.calls
            total_us = sum(us for _, us in kernels) / args.calls
            row = {"impl": IMPL, "heads": cfg["num_heads"], "kv_heads": cfg["num_kv_heads"],
                   "head_dim": cfg["head_dim"], "block_size": block_size, "batch": b, "context": c,
                   "dtype": "bf16" if dtype == torch.bfloat16 else "fp32", "model": name,
                   "layer_kernel_us": round(total_us, 3), "first_call_s": round(first_call, 3),
                   "kernels": [[k[:200], round(sum(v) / args.calls, 3), len(v) // args.calls]
                               for k, v in per_call.items()]}
            if attn_us > 0:
                row["seconds"] = attn_us * 1e-6
            rows.append(row)
            print(f"  [{time.perf_counter() - t0:6.1f} s] {name} b={b} c={c}: attention {attn_us:.1f} us "
                  f"of {total_us:.1f} us a layer (first call {first_call:.1f} s)", file=sys.stderr, flush=True)
        del params, pool, layer
        torch._dynamo.reset()
        if not on_cpu:
            torch.cuda.empty_cache()
    info = rd.device_info(dev)
    return {"npusim_calibration": 2, "date": _dt.date.today().isoformat(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": {"kind": "cuda" if not on_cpu else "cpu", "name": info.get("name", dev),
                       "torch_version": torch.__version__},
            "device_details": info, "dtype": "bf16" if not on_cpu else "fp32",
            "sections": ["decode_attention"], "script": "hw_profiles/measurements/compiled_attention.py",
            "plan": {"models": models, "shapes": shapes, "block_size": block_size, "calls": args.calls,
                     "warmup": args.warmup, "compile_mode": args.compile_mode,
                     "attention_kernels": "names with " + "/".join(ATTN) + ", or triton kernels with 'index'"},
            "decode_attention": rows, "skipped": skipped,
            "total_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", help="comma-separated reference_decoder configs")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--calls", type=int, default=5, help="profiled calls per shape")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--budget-s", type=float, default=1e9)
    args = ap.parse_args(argv)
    if torch is None:
        print("compiled_attention.py needs torch", file=sys.stderr)
        return 2
    out = run(args)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(out['decode_attention'])} rows, {len(out['skipped'])} skipped -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
