"""Throughput of the paged KV allocator under a serving-like workload.

A batch of up to `batch` requests runs at once. Each iteration appends one decode token to every
running request (the simulator's hot path), frees those that finished, and admits new ones.
Each kind of operation is timed as a whole loop, so the numbers include the loop overhead a
simulator would also pay. Each configuration runs --repeat times and the best rate of each kind
is kept, since a shared machine only ever makes a run slower.

Usage: python benchmarks/bench_allocator.py [--requests N] [--repeat R]
"""

from __future__ import annotations

import argparse
import random
import time

from npusim.kv import PagedKVCache


def run(block_size: int, num_requests: int, prefix_caching: bool, seed: int = 0) -> dict:
    rng = random.Random(seed)
    batch = 256
    # Enough blocks that the batch never runs out: this measures the allocator, not preemption.
    num_blocks = batch * (-(-1600 // block_size) + 1) + 64
    kv = PagedKVCache(num_blocks, block_size, watermark=0.01, enable_prefix_caching=prefix_caching)

    specs = []
    for i in range(num_requests):
        prompt = rng.randint(64, 1024)
        output = rng.randint(100, 500)
        sys_id = rng.randrange(8)  # drawn either way so both modes see the same requests
        hashes = None
        if prefix_caching:
            # Half the requests share one of 4 system prompts of 256 tokens.
            n_full = prompt // block_size
            sys_blocks = min(256 // block_size, n_full) if sys_id < 4 else 0
            hashes = [hash((sys_id, j)) for j in range(sys_blocks)]
            hashes += [hash((-1 - i, j)) for j in range(sys_blocks, n_full)]
        specs.append((i, prompt, output, hashes))
    specs.reverse()  # pop() from the end in arrival order

    remaining: dict[int, int] = {}
    n_alloc = n_append = n_free = 0
    t_alloc = t_append = t_free = 0.0
    perf = time.perf_counter
    append = kv.append_slots
    while specs or remaining:
        t0 = perf()
        while specs and len(remaining) < batch:
            rid, prompt, output, hashes = specs[-1]
            if kv.allocate(rid, prompt, hashes) is None:
                break
            specs.pop()
            remaining[rid] = output
            n_alloc += 1
        t1 = perf()
        for rid in remaining:
            if not append(rid):
                raise RuntimeError("benchmark sized wrong: ran out of blocks")
        n_append += len(remaining)
        t2 = perf()
        done = []
        for rid in remaining:
            remaining[rid] -= 1
            if remaining[rid] == 0:
                done.append(rid)
        t3 = perf()
        for rid in done:
            kv.free(rid)
            del remaining[rid]
        n_free += len(done)
        t4 = perf()
        t_alloc += t1 - t0
        t_append += t2 - t1
        t_free += t4 - t3

    total = n_alloc + n_append + n_free
    return {
        "block_size": block_size,
        "prefix": prefix_caching,
        "alloc/s": n_alloc / t_alloc,
        "append/s": n_append / t_append,
        "free/s": n_free / t_free,
        "overall/s": total / (t_alloc + t_append + t_free),
        "ops": total,
        "hit_rate": kv.prefix_cache_hit_rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'block':>5} {'prefix':>6} {'alloc/s':>11} {'append/s':>11} {'free/s':>11} "
          f"{'overall/s':>11} {'ops':>9} {'hit rate':>8}")
    for prefix in (False, True):
        for bs in (16, 128):
            runs = [run(bs, args.requests, prefix) for _ in range(args.repeat)]
            r = {k: max(x[k] for x in runs) for k in runs[0]}
            print(f"{bs:>5} {prefix!s:>6} {r['alloc/s']:>11,.0f} {r['append/s']:>11,.0f} "
                  f"{r['free/s']:>11,.0f} {r['overall/s']:>11,.0f} {r['ops']:>9,} "
                  f"{r['hit_rate']:>8.2f}")
    print(f"decode fast path alone: {fast_path_ns():.0f} ns per append_slots call")


def fast_path_ns(n_req: int = 256, steps: int = 15) -> float:
    """Best-of-5 cost of an append that stays inside the request's own last block."""
    kv = PagedKVCache(n_req, 16, watermark=0)
    reqs = list(range(n_req))
    best = float("inf")
    for _ in range(5):
        for r in reqs:
            if r in kv:
                kv.free(r)
            kv.allocate(r, 1)
        append = kv.append_slots
        t0 = time.perf_counter()
        for _ in range(steps):
            for r in reqs:
                append(r)
        best = min(best, (time.perf_counter() - t0) / (steps * n_req))
    return best * 1e9


if __name__ == "__main__":
    main()
