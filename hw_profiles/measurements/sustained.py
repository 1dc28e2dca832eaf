"""Does the device keep its short-burst speed under minutes of load (as serving runs are)?

Torch only: CUDA, or torch_npu's NPU (torch.npu), or the CPU (a dry run).

    python hw_profiles/measurements/sustained.py --out FILE [--device cuda|npu|cpu]
        [--gemm-seconds 150] [--read-seconds 60] [--window-s 1.0]

Two phases, each timed in windows of about `window_s`:
- gemm: one prefill-sized bf16 GEMM back to back, (M, K) x (K, N) with M = 8192 tokens, K = 5120,
  N = 34816 (Qwen3-14B's gate_up_proj), weights rotated over 4 copies past the L2 cache;
- read: a 4 GiB bf16 tensor summed (a read-mostly stream, as decode reads weights and KV).
Each window's rate comes from device events around its calls. On CUDA, `nvidia-smi` is polled in
the background every 0.5 s (SM clock, power, temperature, throttle reasons); its samples are kept.

Output JSON (schema "npusim_sustained": 1): date, args, device {name, torch, backend}, phases
[{name, shape, windows: [{t_s, calls, seconds, rate}]}] (rate in TFLOP/s for gemm, GB/s for read),
and smi: [{t_s, sm_mhz, power_w, temp_c, throttle}] (empty off CUDA or without nvidia-smi).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import threading
import time


def _poll_smi(stop: threading.Event, t0: float, out: list[dict]) -> None:
    q = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    while not stop.is_set():
        try:
            line = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0]
            sm, pw, temp, thr = (v.strip() for v in line.split(","))
            out.append({"t_s": round(time.perf_counter() - t0, 2), "sm_mhz": float(sm), "power_w": float(pw),
                        "temp_c": float(temp), "throttle": thr})
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
        stop.wait(0.5)


def _timed_windows(torch, dev: str, step, work_per_call: float, seconds: float, window_s: float,
                   t0: float) -> list[dict]:
    """Run step() back to back for `seconds`, in windows of about window_s; each window's rate is
    work_per_call x calls over its device time (events; wall time on the CPU)."""
    mod = getattr(torch, dev) if dev != "cpu" else None
    # calls a window: from one timed call
    step()
    if mod:
        mod.synchronize()
    a = time.perf_counter()
    step()
    if mod:
        mod.synchronize()
    per = max(time.perf_counter() - a, 1e-6)
    calls = max(1, int(window_s / per))
    windows = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start_t = time.perf_counter() - t0
        if mod:
            e0, e1 = mod.Event(enable_timing=True), mod.Event(enable_timing=True)
            e0.record()
            for _ in range(calls):
                step()
            e1.record()
            e1.synchronize()
            s = e0.elapsed_time(e1) / 1e3
        else:
            w = time.perf_counter()
            for _ in range(calls):
                step()
            s = time.perf_counter() - w
        windows.append({"t_s": round(start_t, 2), "calls": calls, "seconds": s,
                        "rate": work_per_call * calls / s})
    return windows


def run(dev: str, gemm_seconds: float, read_seconds: float, window_s: float, small: bool = False) -> dict:
    import torch

    if dev == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)
    dtype = torch.bfloat16
    M, K, N = (256, 512, 1024) if small else (8192, 5120, 34816)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    ws = [torch.randn(K, N, device=dev, dtype=dtype) for _ in range(4)]  # 4 x 356 MB: past any L2
    i = [0]

    def gemm():
        i[0] = (i[0] + 1) % len(ws)
        torch.matmul(x, ws[i[0]])

    read_bytes = (64 << 20) if small else (4 << 30)
    big = torch.ones(read_bytes // 2, device=dev, dtype=dtype)

    def read():
        big.sum()

    smi: list[dict] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    poller = None
    if dev == "cuda" and shutil.which("nvidia-smi"):
        poller = threading.Thread(target=_poll_smi, args=(stop, t0, smi), daemon=True)
        poller.start()
    try:
        phases = [
            {"name": "gemm", "shape": [M, K, N], "unit": "TFLOP/s",
             "windows": _timed_windows(torch, dev, gemm, 2.0 * M * K * N / 1e12, gemm_seconds, window_s, t0)},
            {"name": "read", "bytes": read_bytes, "unit": "GB/s",
             "windows": _timed_windows(torch, dev, read, read_bytes / 1e9, read_seconds, window_s, t0)},
        ]
    finally:
        stop.set()
        if poller:
            poller.join(timeout=10)
    name = torch.cuda.get_device_name() if dev == "cuda" else (
        torch.npu.get_device_name() if dev == "npu" else "cpu")
    return {"schema": "npusim_sustained", "version": 1,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "args": {"gemm_seconds": gemm_seconds, "read_seconds": read_seconds, "window_s": window_s,
                     "small": small},
            "device": {"name": name, "torch": torch.__version__, "backend": dev},
            "phases": phases, "smi": smi}


def summary(result: dict) -> list[str]:
    """One line a phase: the first windows' rate against the last third's median."""
    import statistics

    lines = []
    for p in result["phases"]:
        rates = [w["rate"] for w in p["windows"]]
        if not rates:
            lines.append(f"{p['name']}: no windows (a phase of 0 s)")
            continue
        first = statistics.median(rates[:3])
        tail = statistics.median(rates[-max(1, len(rates) // 3):])
        lines.append(f"{p['name']}: first windows {first:,.1f} {p['unit']}, last third {tail:,.1f} "
                     f"({tail / first - 1:+.1%}) over {len(rates)} windows")
    if result["smi"]:
        clocks = [s["sm_mhz"] for s in result["smi"]]
        power = [s["power_w"] for s in result["smi"]]
        lines.append(f"SM clock {min(clocks):.0f}-{max(clocks):.0f} MHz, power up to {max(power):.0f} W")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "npu", "cpu"])
    ap.add_argument("--gemm-seconds", type=float, default=150.0)
    ap.add_argument("--read-seconds", type=float, default=60.0)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--small", action="store_true", help="small shapes (a dry run on the CPU)")
    args = ap.parse_args()
    result = run(args.device, args.gemm_seconds, args.read_seconds, args.window_s, args.small)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for line in summary(result):
        print(line, flush=True)


if __name__ == "__main__":
    main()
