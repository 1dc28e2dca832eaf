"""Headline tables (markdown) of one calibration file and reference-decoder files; stdlib only.

    python hw_profiles/measurements/summarize.py CALIBRATE.json DECODER.json [DECODER.json ...]

The README's tables were printed by this script from the files committed beside it.
"""

from __future__ import annotations

import json
import sys

MIB = 2**20
EIGHT_B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
           "lm_head": (128256, 4096)}


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def calibration(m: dict) -> str:
    parts = []
    by = {(g["n"], g["k"], g["m"]): g for g in m["gemm_sweep"]}
    ms = [1, 8, 64, 256, 1024, 8192]
    rows = []
    for layer, (n, k) in EIGHT_B.items():
        g1 = by[(n, k, 1)]
        rows.append([f"{layer} {n}x{k}", f"{g1['seconds'] * 1e6:.1f} us, {g1['gbs']:.0f} GB/s"]
                    + [f"{by[(n, k, x)]['tflops']:.1f}" for x in ms])
    parts.append("GEMM y = x @ W^T, llama-3.1-8b shapes (bf16; TFLOP/s by M; M <= 1024 replayed from a CUDA graph):\n\n"
                 + table(["layer N x K", "M=1 time, bytes/s"] + [f"M={x}" for x in ms], rows))
    rd = {r["bytes"] // MIB: r for r in m["read_bandwidth"]}
    cp = {r["bytes"] // MIB: r for r in m["copy_bandwidth"]}
    sizes = sorted(set(rd) | set(cp))
    parts.append("Bandwidth (GB/s; read = torch.sum over the buffer, graph-replayed; copy = copy_ counted "
                 "read + write, eager; copy in a graph = a memcpy node):\n\n"
                 + table(["buffer"] + [f"{s} MiB" for s in sizes],
                         [["read (sum)"] + [f"{rd[s]['gbs']:.0f}" if s in rd else "-" for s in sizes],
                          ["copy (eager)"] + [f"{cp[s]['gbs']:.0f}" if s in cp else "-" for s in sizes],
                          ["copy (graph)"] + [f"{cp[s]['graph']['gbs']:.0f}" if s in cp else "-" for s in sizes]]))
    rows = []
    for c in m["kernel_chain"]:
        rows.append([f"{c['desc']} {c['shape'][0]}x{c['shape'][1]}", f"{c['graph']['us_per_kernel']:.2f}",
                     f"{c['eager']['us_per_kernel']:.2f}", f"{c['eager']['host_us_per_kernel']:.2f}"])
    parts.append(f"Dependent kernel chains ({m['kernel_chain'][0]['kernels']} kernels, bf16; us per kernel):\n\n"
                 + table(["kernel", "graph replay (device cost)", "eager (device view)", "eager (host wall)"], rows))
    att = {}
    for r in m["decode_attention"]:
        if "seconds" in r and r["heads"] == 32 and r["kv_heads"] == 8 and r["head_dim"] == 128:
            att[(r["batch"], r["context"], r["impl"], r["block_size"])] = r
    cols = [("sdpa_dense", None), ("gather_sdpa", 16), ("flex_paged", 16), ("flex_paged", 128)]
    rows = []
    for b in (1, 16, 64, 128):
        for c in (2048, 8192):
            cells = []
            for impl, bs in cols:
                r = att.get((b, c, impl, bs))
                cells.append(f"{r['seconds'] * 1e6:.0f} ({r['gbs']:.0f})" if r else "-")
            rows.append([b, c] + cells)
    parts.append("Decode attention, one layer, 32 q / 8 kv heads x 128 (us, and KV GB/s):\n\n"
                 + table(["batch", "context", "SDPA flash, contiguous", "gather + SDPA, bs 16",
                          "FlexAttention paged, bs 16", "FlexAttention paged, bs 128"], rows))
    pre = [r for r in m["prefill_attention"] if "seconds" in r and r["heads"] == 32 and r["head_dim"] == 128]
    rows = [[r["chunk"], r["cached"], f"{r['seconds'] * 1e6:.0f}", f"{r['tflops']:.0f}"] for r in pre]
    parts.append("Causal prefill attention, batch 1, 32 q / 8 kv heads x 128, SDPA "
                 f"{pre[0]['backend']} (chunk of c new tokens over p cached; causal pairs x 4 x heads x dim):\n\n"
                 + table(["c", "p", "us", "TFLOP/s"], rows))
    return "\n\n".join(parts)


def decoder(files: list[tuple[str, dict]]) -> str:
    parts = []
    rows = []
    for name, d in files:
        for kc in d["kernel_counts"]:
            rows.append([kc["model"], kc["style"], kc["attn"], kc["kernels_per_step"], kc["kernels_per_layer"],
                         kc["kernels_edge"], ", ".join(f"{k} {v}" for k, v in sorted(kc["kernels_by_class"].items())),
                         name])
    parts.append("Device kernels of one decode step (torch.profiler; batch 8, context 2048):\n\n"
                 + table(["model", "style", "attn", "per step", "per layer", "edge", "by class", "file"], rows))
    rows = []
    for name, d in files:
        idx = {}
        for r in d["rows"]:
            if r["phase"] == "decode" and r["attn"] == "gather" and r["block_size"] == 16:
                idx[(r["model"], r["style"], r["batch"], r["context"])] = r["median_ms"]
        for model in d["configs"]:
            cfg = d["configs"][model]
            floor = cfg["weight_bytes"] / 4.8e12 * 1e3
            for style in ("eager", "graph", "compile", "compile_graph"):
                cells = [idx.get((model, style, b, 2048)) for b in (1, 8, 32, 128)]
                if any(c is not None for c in cells):
                    rows.append([model, style] + [f"{c:.2f}" if c is not None else "-" for c in cells]
                                + [f"{floor:.2f}", name])
    parts.append("Decode step, context 2048, block size 16, gather reader (median ms, embedding to sampled "
                 "token; weight floor = weight bytes / 4.8 TB/s):\n\n"
                 + table(["model", "style", "B=1", "B=8", "B=32", "B=128", "weight floor", "file"], rows))
    rows = []
    for name, d in files:
        for r in d["rows"]:
            if r["phase"] == "prefill" and r["style"] == "graph":
                rows.append([r["model"], r["prompt"], f"{r['median_ms']:.1f}", name])
    parts.append("Prefill, batch 1, graph style (median ms):\n\n" + table(["model", "prompt", "ms", "file"], rows))
    rows = []
    for name, d in files:
        probes = d.get("host_probe_us") or {}
        if "runs" in d:
            probes = {r["models"][0]: r["host_probe_us"] for r in d["runs"]}
        rows.append([name, json.dumps(probes)])
    parts.append("Host probe (us per eager launch of a tiny add, see reference_decoder.host_probe):\n\n"
                 + table(["file", "probe"], rows))
    return "\n\n".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    print(calibration(json.load(open(argv[0]))))
    print()
    files = [(p.rsplit("/", 1)[-1], json.load(open(p))) for p in argv[1:]]
    print(decoder(files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
