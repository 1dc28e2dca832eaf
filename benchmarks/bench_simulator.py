"""Simulated output tokens per wall-clock second (target >= 1,000,000 on one core), and memory.

Replays the first N requests of ../shared/data/traces/splitwise_conv.csv (the Azure conversation
trace) with Llama-3.1-8B on ascend-910b2, at the trace's own arrival times and all at once.

Run: .venv/bin/python benchmarks/bench_simulator.py [N]
"""

import math
import sys
import time
import tracemalloc
from pathlib import Path

from npusim.scenario import Scenario, run_scenario
from npusim.specs import EngineConfig
from npusim.workload import LengthDist, WorkloadSpec

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "traces" / "splitwise_conv.csv"


def run(n: int, rate, block_size: int = 128, measure_memory: bool = False):
    sc = Scenario(hw="ascend-910b2", model="llama-3.1-8b", engine=EngineConfig(block_size=block_size),
                  workload=WorkloadSpec(trace=str(TRACE), num_requests=n, rate=rate))
    if measure_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    r = run_scenario(sc)
    wall = time.perf_counter() - t0
    peak = None
    if measure_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return r, wall, peak


def main():
    if not TRACE.exists():
        sys.exit(f"{TRACE} not found: the real traces live in ../shared/data beside the checkout")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    print(f"first {n} requests of {TRACE.name}, llama-3.1-8b on ascend-910b2")
    for label, rate, bs in (("trace arrival times, block 128", None, 128),
                            ("trace arrival times, block 16", None, 16),
                            ("all at t=0 (saturated), block 128", math.inf, 128)):
        r, wall, _ = run(n, rate, bs)
        it = sum(p["iterations"] for p in r["per_instance"])
        print(f"{label:<36} {r['total_output_tokens'] / wall:>12,.0f} output tokens/s  "
              f"{it / wall:>9,.0f} iterations/s  ({r['total_output_tokens']:,} tokens, {it:,} iterations, "
              f"{r['duration']:,.0f} simulated s, {wall:.2f} wall s)")
    # Memory: the same requests with 8x longer outputs simulate 8x the tokens; the simulator's
    # peak memory must stay flat (per-request records only, histograms for per-token latencies).
    for out_len in (128, 1024):
        sc = Scenario(hw="ascend-910b2", model="llama-3.1-8b",
                      workload=WorkloadSpec(num_requests=2000, rate=4.0,
                                            input_len=LengthDist(kind="fixed", value=512),
                                            output_len=LengthDist(kind="fixed", value=out_len)))
        tracemalloc.start()
        r = run_scenario(sc)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"memory, 2000 requests x {out_len:>4} output tokens: {r['total_output_tokens']:>9,} tokens "
              f"simulated, peak {peak / 2**20:6.1f} MiB traced")

if __name__ == "__main__":
    main()
