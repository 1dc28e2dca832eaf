"""Simulated output tokens per wall-clock second, and memory.

Replays the first N requests of ../shared/data/traces/splitwise_conv.csv (the Azure conversation
trace) with Llama-3.1-8B on ascend-910b2 (MindIE's engine profile, whose attention takes pages of
16 and 128 tokens; vllm-ascend takes 128 only) at the trace's own arrival times: as whole
`npusim simulate --json` processes (start-up and import time included; target >= 2,000,000 at
block 16 and at block 128) and in-process. Then memory: the same requests with 8x the tokens, and
a synthetic workload of --million requests, must not grow with tokens, nor with requests done
(beyond a few bytes of workload description per request).

Run: .venv/bin/python benchmarks/bench_simulator.py [N] [--million]
"""

import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from npusim.scenario import Scenario, run_scenario, simulate_scenario
from npusim.specs import EngineConfig
from npusim.workload import LengthDist, WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "data" / "traces" / "splitwise_conv.csv"
NPUSIM = Path(sys.executable).parent / "npusim"
ENGINE = "mindie"


def cli_run(n: int, block_size: int) -> tuple[int, float]:
    """(output tokens, wall seconds) of one whole `npusim simulate` process."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: with cached bytecode
    args = [str(NPUSIM), "simulate", "--trace", str(TRACE), "--requests", str(n),
            "--block-size", str(block_size), "--engine", ENGINE, "--json"]
    subprocess.run(args, env=env, capture_output=True, check=True)  # warm the bytecode cache
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run(args, env=env, capture_output=True, check=True, text=True).stdout
        best = min(best, time.perf_counter() - t0)
    return json.loads(out)["total_output_tokens"], best


def in_process(n: int, rate, block_size: int):
    sc = Scenario(hw="ascend-910b2", model="llama-3.1-8b",
                  engine=EngineConfig(profile=ENGINE, block_size=block_size),
                  workload=WorkloadSpec(trace=str(TRACE), num_requests=n, rate=rate))
    t0 = time.perf_counter()
    r = run_scenario(sc)
    return r, time.perf_counter() - t0


def traced_peak(sc: Scenario):
    tracemalloc.start()
    t0 = time.perf_counter()
    run = simulate_scenario(sc)
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return run, wall, peak


def main():
    if not TRACE.exists():
        sys.exit(f"{TRACE} not found: the real traces live in ../shared/data beside the checkout")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10_000
    print(f"first {n} requests of {TRACE.name}, llama-3.1-8b on ascend-910b2")
    for bs in (128, 16):
        tokens, wall = cli_run(n, bs)
        print(f"npusim simulate process, block {bs:>3}: {tokens / wall:>12,.0f} output tokens/s "
              f"({tokens:,} tokens in {wall:.2f} s, best of 3)")
    for label, rate, bs in (("in-process, trace times, block 128", None, 128),
                            ("in-process, trace times, block 16", None, 16),
                            ("in-process, all at t=0, block 128", math.inf, 128)):
        r, wall = in_process(n, rate, bs)
        it = sum(p["iterations"] for p in r["per_instance"])
        print(f"{label:<36} {r['total_output_tokens'] / wall:>12,.0f} output tokens/s  "
              f"{it / wall:>9,.0f} iterations/s  ({r['total_output_tokens']:,} tokens, {it:,} iterations, "
              f"{r['duration']:,.0f} simulated s, {wall:.2f} wall s)")
    # The same requests with 8x longer outputs simulate 8x the tokens: memory must stay flat.
    for out_len in (128, 1024):
        sc = Scenario(hw="ascend-910b2", model="llama-3.1-8b",
                      workload=WorkloadSpec(num_requests=2000, rate=4.0,
                                            input_len=LengthDist(kind="fixed", value=512),
                                            output_len=LengthDist(kind="fixed", value=out_len)))
        run, _, peak = traced_peak(sc)
        print(f"memory, 2000 requests x {out_len:>4} output tokens: {run.total_output_tokens:>9,} tokens "
              f"simulated, peak {peak / 2**20:6.1f} MiB traced")
    # Requests done must not pile up: 10x the requests, a few bytes more each (the workload's own
    # arrival and lengths, 24 bytes, and exact latencies, 24 bytes, up to 200,000 requests).
    counts = (10_000, 100_000, 1_000_000) if "--million" in sys.argv else (10_000, 100_000)
    for count in counts:
        sc = Scenario(hw="ascend-910b2", model="llama-3.1-8b",
                      workload=WorkloadSpec(num_requests=count, rate=40.0,
                                            input_len=LengthDist(kind="uniform", low=16, high=256),
                                            output_len=LengthDist(kind="uniform", low=2, high=16)))
        run, wall, peak = traced_peak(sc)
        print(f"memory, {count:>9,} short requests at 40/s: peak {peak / 2**20:6.1f} MiB traced "
              f"({peak / count:,.0f} bytes a request; {wall:.0f} s under tracemalloc)")


if __name__ == "__main__":
    main()
