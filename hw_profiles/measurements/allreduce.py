"""All-reduce time by message size between the devices of one host, as tensor parallelism uses it.

Torch only: NCCL on CUDA (HCCL with torch_npu), gloo on the CPU (a dry run).

    python hw_profiles/measurements/allreduce.py --out FILE [--device cuda|npu|cpu] [--ranks N]
        [--repeats 50]

One process per device. For each size (bf16 elements, 2 KiB to 256 MiB) every rank all-reduces
(sum) a tensor of that size: eagerly, `repeats` calls back to back between two device events, and,
on CUDA, the same calls captured in one CUDA graph and replayed (as vLLM replays its decode step's
collectives). Rank 0's medians of 5 such runs are kept. The bus bandwidth is nccl-tests': bytes x
2(N-1)/N over the time.

Output JSON (schema "npusim_allreduce": 1): date, device {name, torch, backend, ranks}, rows
[{bytes, eager_us, graph_us, busbw_gbs}] (graph_us null off CUDA or where capture failed), and
the line time_us = latency + bytes x 2(N-1)/N / bandwidth: the latency the least time of the
messages up to 32 KiB, the bandwidth what the largest message moved beyond it (graph times where
every size was captured, else eager), with the latency a step as npusim's link_latency_us counts
it (2 steps through a switch or full mesh, 2(N-1) round a ring).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time

SIZES = [2 << 10, 8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20, 128 << 20, 256 << 20]


def _timed(mod, fn, repeats: int) -> float:
    """Seconds per call of fn(), `repeats` calls between device events (wall time on the CPU)."""
    if mod is None:
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats
    a, b = mod.Event(enable_timing=True), mod.Event(enable_timing=True)
    a.record()
    for _ in range(repeats):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / repeats


def _worker(rank: int, ranks: int, dev: str, repeats: int, sizes: list[int], out: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    mod = None
    if dev == "cuda":
        torch.cuda.set_device(rank)
        mod, backend, device = torch.cuda, "nccl", torch.device("cuda", rank)
    elif dev == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)
        torch.npu.set_device(rank)
        mod, backend, device = torch.npu, "hccl", torch.device("npu", rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=ranks)
    rows = []
    capture = dev == "cuda"  # (until a capture fails on any rank)
    for nbytes in sizes:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)

        def once():
            dist.all_reduce(x)
        for _ in range(3):
            once()
        if mod:
            mod.synchronize()
        dist.barrier()
        eager = statistics.median(_timed(mod, once, repeats) for _ in range(5))
        graph = None
        if capture:
            graph = _graph_time(torch, dist, once, repeats, device)
            capture = graph is not None
        t = graph if graph is not None else eager
        rows.append({"bytes": nbytes, "eager_us": eager * 1e6, "graph_us": None if graph is None else graph * 1e6,
                     "busbw_gbs": nbytes * 2 * (ranks - 1) / ranks / t / 1e9})
        dist.barrier()
    _report(rank, ranks, dev, torch, backend, repeats, rows, out)
    dist.destroy_process_group()


def _graph_time(torch, dist, once, repeats: int, device) -> float | None:
    """Seconds per call of `repeats` all-reduces captured in one CUDA graph, or None where the
    capture failed on any rank (every rank then skips the replay alike: collectives must match)."""
    g = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            once()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(repeats):
                once()
        torch.cuda.synchronize()
    except RuntimeError as e:  # (a NCCL or driver without capture support)
        print(f"graph capture failed: {e}", flush=True)
        g = None
    ok = torch.tensor([1 if g is not None else 0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # (eager: every rank learns whether all captured)
    if not int(ok.item()):
        return None
    dist.barrier()
    g.replay()
    torch.cuda.synchronize()
    return statistics.median(_timed(torch.cuda, g.replay, 1) / repeats for _ in range(5))


def _report(rank, ranks, dev, torch, backend, repeats, rows, out) -> None:
    if rank == 0:
        name = torch.cuda.get_device_name() if dev == "cuda" else (
            torch.npu.get_device_name() if dev == "npu" else "cpu")
        key = "graph_us" if all(r["graph_us"] is not None for r in rows) else "eager_us"
        # time = latency + moved / bandwidth, moved = bytes x 2(N-1)/N: the latency from the smallest
        # messages (their bytes take well under a microsecond), the bandwidth from the largest
        small = [r[key] for r in rows if r["bytes"] <= 32 << 10] or [rows[0][key]]
        latency = min(small)
        big = rows[-1]
        moved = big["bytes"] * 2 * (ranks - 1) / ranks
        rest = big[key] - latency
        bw = moved / rest / 1e3 if rest > 0 else None
        # npusim prices an all-reduce as steps x link_latency_us + moved / (link_gbs x link_efficiency),
        # in 2 steps through a switch or a full mesh and 2(N-1) round a ring: the per-step latency of
        # either (link_efficiency is bandwidth_gbs over the profile's link_gbs)
        fit = {"from": key, "latency_us": latency, "bandwidth_gbs": bw,
               "link_latency_us_switch": latency / 2, "link_latency_us_ring": latency / (2 * (ranks - 1))}
        result = {"schema": "npusim_allreduce", "version": 1,
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "device": {"name": name, "torch": torch.__version__, "backend": backend, "ranks": ranks},
                  "repeats": repeats, "rows": rows, "fit": fit}
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        for r in rows:
            print(f"{r['bytes']:>11d} B  eager {r['eager_us']:9.1f} us  graph "
                  f"{'-' if r['graph_us'] is None else format(r['graph_us'], '9.1f')} us  "
                  f"bus {r['busbw_gbs']:8.1f} GB/s", flush=True)
        shown = "-" if bw is None else f"{bw:.1f}"
        print(f"fit ({key}): {latency:.1f} us + moved bytes / {shown} GB/s (link_latency_us {latency / 2:.2f} "
              f"through a switch, {latency / (2 * (ranks - 1)):.2f} round a ring)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "npu", "cpu"])
    ap.add_argument("--ranks", type=int, default=None, help="processes (default: every CUDA device; 2 on an NPU "
                                                              "or the CPU)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--max-bytes", type=int, default=SIZES[-1])
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    if args.ranks is None:
        args.ranks = (torch.cuda.device_count() if args.device == "cuda" else 2)
    if args.ranks < 2:
        raise SystemExit("allreduce.py: needs at least 2 devices (--ranks)")
    sizes = [s for s in SIZES if s <= args.max_bytes]
    if not sizes:
        raise SystemExit(f"allreduce.py: --max-bytes must be at least {SIZES[0]}, got {args.max_bytes}")
    mp.spawn(_worker, args=(args.ranks, args.device, args.repeats, sizes, args.out, args.port), nprocs=args.ranks)


if __name__ == "__main__":
    main()
