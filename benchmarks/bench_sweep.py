"""Sweep throughput: points per second for a 64-point grid, local and Dask, 1 and 2 workers.

The grid: block size 16,32,64,128 x rate 2,4,8,16 x max_num_seqs 32,64,128,256 over Llama-3.1-8B
on ascend-910b2 with MindIE's engine profile, N requests per point (default 300, ShareGPT-like
lengths). Each configuration's time includes starting its workers (a process pool, or a Dask
LocalCluster), as a user's `npusim sweep` pays it; the rows of every run must be identical.

Run: .venv/bin/python benchmarks/bench_sweep.py [N]
"""

import sys
import time

from npusim.sweep import grid_points, parse_grid, sweep

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
GRID = parse_grid({"model": "llama-3.1-8b", "engine": "mindie", "requests": str(N),
                   "block_size": "16,32,64,128", "rate": "2,4,8,16", "max_num_seqs": "32,64,128,256"})
FIXED = {"seed": None, "goodput": None}


def timed(executor: str, workers: int):
    t0 = time.perf_counter()
    rows = sweep({}, FIXED, GRID, executor=executor, workers=workers)
    return rows, time.perf_counter() - t0


def main() -> None:
    points = len(grid_points(GRID))
    print(f"{points} points, {N} requests each")
    reference = None
    base = None
    for executor in ("local", "dask"):
        for workers in (1, 2):
            rows, wall = timed(executor, workers)
            assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
            if reference is None:
                reference = rows
            assert rows == reference, f"{executor} x{workers}: rows differ from local x1"
            base = base or wall
            print(f"{executor:>5} x{workers}: {wall:6.2f} s  {points / wall:6.1f} points/s  "
                  f"speed-up {base / wall:4.2f}")


if __name__ == "__main__":
    main()
