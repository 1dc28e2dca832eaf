"""Which kernel does PyTorch's SDPA run for MLA's up-projected prefill, and how fast, as a decoder calls it?

Torch only: CUDA (or the CPU: a dry run at small sizes).

    python hw_profiles/measurements/mla_prefill_probe.py --out FILE [--device cuda|cpu] [--small]

MLA prefill (DeepSeek-V2/V3) attends with q/k of 192 dims (128 + 64 RoPE) and v of 128, every head
its own K and V. The calibration harness (npusim/calibrate.py, prefill_attention) times SDPA on
contiguous [1, H, S, D] tensors under the first backend that runs of flash, efficient, default
(until 2026-12-04, when this probe showed SDPA's own choice; since: flash, cudnn, efficient, default);
a decoder (mla_moe_decoder.py) hands SDPA transposed views of [S, H, D] tensors and lets it pick.
This probe times both, causal, batch 1, under SDPA's own choice ("default") and under each
backend forced (flash, efficient, cudnn, math where they run), and names the kernels the default
ran (torch.profiler). Timing: CUDA events around `calls` back-to-back calls over `copies` rotated
inputs, after warm-up, median of `samples`.

Output JSON (schema "npusim_mla_prefill_probe": 1): date, device {name, torch}, args, rows
[{heads, kv_heads, head_dim, v_head_dim, chunk, cached, layout ("contiguous" | "decoder"), backend,
flops, seconds, tflops, kernels (default only), error}] with flops = 2 * H * (D + Dv) * causal pairs,
the calibration's convention, so rows can join a calibration file's prefill_attention.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics

import torch
import torch.nn.functional as F

BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


def _sdpa_ctx(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name])


def _inputs(layout: str, H: int, S: int, D: int, Dv: int, dev, dtype, copies: int):
    """`copies` (q, k, v) of [1, H, S, *]: contiguous, or the decoder's transposed views of [S, H, *]."""
    out = []
    for _ in range(copies):
        if layout == "contiguous":
            q, k = (torch.randn(1, H, S, D, device=dev, dtype=dtype) for _ in range(2))
            v = torch.randn(1, H, S, Dv, device=dev, dtype=dtype)
        else:
            q, k = (torch.randn(S, H, D, device=dev, dtype=dtype).transpose(0, 1).unsqueeze(0) for _ in range(2))
            v = torch.randn(S, H, Dv, device=dev, dtype=dtype).transpose(0, 1).unsqueeze(0)
        out.append((q, k, v))
    return out


def _time(fn, dev: str, calls: int, samples: int) -> float:
    """Median seconds of one call."""
    for _ in range(3):
        fn()
    if dev == "cpu":
        import time
        ts = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            ts.append((time.perf_counter() - t0) / calls)
        return statistics.median(ts)
    torch.cuda.synchronize()
    ts = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3 / calls)
    return statistics.median(ts)


def _kernels(fn, dev: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev != "cpu" else [])
    with profile(activities=acts) as prof:
        fn()
        if dev != "cpu":
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if getattr(e, "device_type", None) is not None
             and str(e.device_type).endswith("CUDA")]
    return sorted(set(names))[:6]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (the CPU dry run)")
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev != "cpu" else torch.float32
    if args.small:
        H, D, Dv, lengths, calls, samples, copies = 2, 24, 16, [16, 32], 2, 3, 2
    else:
        H, D, Dv, lengths, calls, samples, copies = 16, 192, 128, [512, 1024, 2048, 4096, 8192], 5, 7, 4
    rows = []
    for S in lengths:
        pairs = S * (S + 1) / 2.0
        flops = 2.0 * H * (D + Dv) * pairs
        for layout in ("contiguous", "decoder"):
            xs = _inputs(layout, H, S, D, Dv, dev, dtype, copies)
            for backend in BACKENDS:
                row = {"heads": H, "kv_heads": H, "head_dim": D, "v_head_dim": Dv, "chunk": S, "cached": 0,
                       "layout": layout, "backend": backend, "flops": flops, "pairs": pairs}
                it = iter(range(10**9))

                def call(backend=backend):
                    q, k, v = xs[next(it) % copies]
                    if backend == "default":
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    with _sdpa_ctx(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                try:
                    row["seconds"] = _time(call, dev, calls, samples)
                    row["tflops"] = flops / row["seconds"] / 1e12
                    if backend == "default":
                        row["kernels"] = _kernels(call, dev)
                except (RuntimeError, ValueError) as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print(f"S={S} {layout:<10} {backend:<9} "
                      + (f"{row['seconds'] * 1e6:9.1f} us {row['tflops']:7.1f} TFLOP/s" if "seconds" in row
                         else row["error"][:60]) + (f"  {row['kernels']}" if row.get("kernels") else ""), flush=True)
            xs = None
    name = torch.cuda.get_device_name() if dev != "cpu" else "cpu"
    out = {"npusim_mla_prefill_probe": 1, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "device": {"name": name, "torch": torch.__version__}, "args": vars(args), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
