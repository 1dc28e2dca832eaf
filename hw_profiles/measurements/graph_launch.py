"""Host time to launch a captured graph, by the number of kernels in it.

Torch only. CUDA graphs (torch.cuda.CUDAGraph) or, with torch_npu, ACL graphs (torch.npu.NPUGraph).

    python hw_profiles/measurements/graph_launch.py --out FILE [--device cuda|npu] [--repeats 200]

For each size n, a chain of n tiny dependent kernels (x.add_(1) on one element) is captured in one
graph. Each replay's host cost is the wall time of the replay() call alone (the device is
synchronised after it, so no call waits for a full launch queue); the eager launch of the same
chain is timed the same way, op by op. The device time of the replay (events around it) is
recorded beside it. Medians of `repeats` calls.

Output JSON (schema "npusim_graph_launch": 1): date, device {name, torch, backend}, rows
[{kernels, replay_host_us, replay_device_us, eager_host_us_per_op}], and the least-squares line
replay_host_us = fixed + per_kernel * kernels over the rows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time


def backend(torch, name: str):
    if name == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)
        return torch.npu, torch.npu.NPUGraph
    return torch.cuda, torch.cuda.CUDAGraph


def measure(torch, dev: str, sizes: list[int], repeats: int) -> list[dict]:
    mod, Graph = backend(torch, dev)
    rows = []
    x = torch.zeros(1, device=dev)
    for n in sizes:
        def chain():
            for _ in range(n):
                x.add_(1)
        s = mod.Stream()
        s.wait_stream(mod.current_stream())
        with mod.stream(s):
            chain()
        mod.current_stream().wait_stream(s)
        mod.synchronize()
        g = Graph()
        with mod.graph(g):
            chain()
        mod.synchronize()
        for _ in range(5):
            g.replay()
        mod.synchronize()
        host, device = [], []
        for _ in range(repeats):
            a, b = mod.Event(enable_timing=True), mod.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            g.replay()
            t1 = time.perf_counter()
            b.record()
            b.synchronize()
            host.append((t1 - t0) * 1e6)
            device.append(a.elapsed_time(b) * 1e3)
        eager = []
        for _ in range(max(5, repeats // 10)):
            mod.synchronize()
            t0 = time.perf_counter()
            chain()
            t1 = time.perf_counter()
            eager.append((t1 - t0) * 1e6 / n)
        mod.synchronize()
        rows.append({"kernels": n, "replay_host_us": statistics.median(host),
                     "replay_host_samples_us": host[:50], "replay_device_us": statistics.median(device),
                     "eager_host_us_per_op": statistics.median(eager)})
        del g
    return rows


def fit(rows: list[dict]) -> dict:
    xs = [r["kernels"] for r in rows]
    ys = [r["replay_host_us"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"fixed_us": my - slope * mx, "per_kernel_us": slope,
            "max_residual_us": max(abs(y - (my - slope * mx) - slope * x) for x, y in zip(xs, ys))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "npu"))
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--sizes", default="1,8,64,256,512,1024,2048")
    a = p.parse_args(argv)
    import torch

    sizes = [int(s) for s in a.sizes.split(",")]
    rows = measure(torch, a.device, sizes, a.repeats)
    mod, _ = backend(torch, a.device)
    out = {"npusim_graph_launch": 1, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "device": {"name": mod.get_device_name(0), "torch": torch.__version__, "backend": a.device},
           "repeats": a.repeats, "rows": rows, "fit": fit(rows)}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        print(f"{r['kernels']:5d} kernels: replay host {r['replay_host_us']:8.2f} us, device {r['replay_device_us']:9.2f} us, "
              f"eager {r['eager_host_us_per_op']:.2f} us/op")
    f_ = out["fit"]
    print(f"host per replay = {f_['fixed_us']:.2f} us + {f_['per_kernel_us'] * 1e3:.2f} ns x kernels "
          f"(max residual {f_['max_residual_us']:.2f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
