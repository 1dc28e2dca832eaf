"""A reference Llama-family decoder of our own, timed step by step on the device in front of you.

Torch only (no npusim, no hub downloads; random weights). gpt-fast style: a few plain functions.

    python hw_profiles/measurements/reference_decoder.py --out FILE [--quick] [--device cuda]
        [--models llama-3.1-8b,...] [--styles eager,graph,compile,compile_graph]
        [--budget-s 300] [--trace-dir DIR] [--no-flex]
    python hw_profiles/measurements/reference_decoder.py --merge A.json B.json ... --out FILE

The model: RMSNorm, RoPE (rotate-half), GQA attention with fused QKV (optional Qwen2 QKV bias,
optional Qwen3 per-head q/k RMSNorm), SwiGLU MLP with fused gate/up, an LM head whose logits are
upcast to fp32 and sampled greedily (argmax). The KV cache is paged: per layer one pool of slots
[num_slots, kv_heads, head_dim] for K and one for V (vLLM's [blocks, block_size, kv_heads,
head_dim], flattened), every sequence owning a random (fragmented) set of blocks through its block
table. The new tokens' K/V are scattered into the pool by slot (index_put); decode attention reads
the pool either by gathering each sequence's slots and running SDPA (flash) on the copy ("gather",
the reader of the main rows) or with FlexAttention and a block mask built from the block tables
("flex": the kernel reads pages in place; compiled with static shapes, one compile per batch
size; run for the trace model on plan["flex_shapes"], and on every row with --attn flex). The
gather became the main reader after a smoke run on the H200 (torch 2.11), where it was the faster
at the few shapes tried and FlexAttention could not take 16-token pages with a symbolic batch; the
full sweep later showed FlexAttention with 128-token pages faster from batch 32 on (see
hw_profiles/measurements/README.md). A prefill chunk attends causally (bottom-right aligned) over
its cached context plus itself.

Styles: "eager" (plain PyTorch, one launch per op; FlexAttention, where used, is compiled, its
eager form being a slow reference; on the CPU it runs eagerly), "graph" (the same step captured once in a CUDA graph and
replayed, as serving engines do for decode), "compile" (each layer through torch.compile, default
mode, launched eagerly) and "compile_graph" (the compiled step captured in a CUDA graph).

Timing: CUDA events around each whole step (embedding to sampled token), after warm-up steps; the
device is synchronised between steps, so an eager step includes the gaps where the device waits
for the host's launches, as an engine's step does. Medians of the samples are reported.

When the KV cache of every layer does not fit device memory, layers share physical pools
("kv_layers_physical" < num_layers, layer i using pool i mod P). Each physical pool is larger than
the L2 cache and the weights of the layers in between stream through the L2, so a layer never
finds another layer's KV in the cache; the bytes each layer reads are those of its own context.

Output JSON (schema "npusim_reference_decoder": 1):
  date, timestamp, quick, args         when and how it ran
  device   {kind, device, name, torch, cuda, driver, multi_processor_count, L2_cache_size, ...}
  dtype    "bf16" (fp32 on the CPU)
  configs  {model: {num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
                    intermediate_size, vocab_size, tie_word_embeddings, qkv_bias, qk_norm,
                    weight_bytes}}
  rows     one per timed configuration:
           model, style, phase ("decode" | "prefill" | "mixed"), attn ("flex" | "gather" for
           decode reads; "sdpa" for a prefill-only step), batch (decode sequences), context
           (tokens each decode attends, its new token included), prompt (prefill tokens, batch 1),
           chunk, cached (mixed: one chunk of `chunk` new tokens over `cached` cached ones),
           block_size, tokens (new tokens in the step), sampled (rows through the LM head),
           kv_layers_physical, median_ms, samples_ms, warmup, first_call_s (compile/capture +
           first step), kernels (device kernels per step, from kernel_counts where profiled)
  kernel_counts  one per (model, style, phase) profiled with torch.profiler on one step:
           model, style, phase, batch, context, prompt, block_size, attn,
           kernels_per_step (device kernels, memcpy/memset excluded), memops_per_step,
           kernels_per_layer and kernels_edge (from 1- and 2-layer truncations of the same step;
           graph styles reuse their eager twin's truncations), kernels_by_class (gemm, attention,
           triton, elementwise/other), top_kernels [[name, count], ...]
  traces   [{model, style, file, bytes}] gzipped chrome traces (torch.profiler export_chrome_trace)
  skipped  [{model, style, phase, ..., reason}] what did not run (memory, budget, errors)
  host_probe_us  {start, end}: wall us per eager launch of a tiny add (see host_probe); each
           config also carries the probe taken before its model ran. Eager steps are bound by
           the host, so compare eager rows through this probe.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import gc
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the configs and the schema stay importable (tests) without torch
    torch = None
    F = None

SCHEMA = 1
GIB = 2**30

# Shapes of the npusim model zoo (npusim/specs.py MODEL_ZOO; a test keeps them equal) plus Qwen3-8B.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=128256),
    "llama-2-13b": dict(num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40, head_dim=128,
                        intermediate_size=13824, vocab_size=32000),
    "qwen2.5-7b": dict(num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                       intermediate_size=18944, vocab_size=152064, qkv_bias=True),
    "qwen3-8b": dict(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate_size=12288, vocab_size=151936, qk_norm=True),
    # CPU test shapes
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=256),
    "tiny-qwen3": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=256, qk_norm=True, qkv_bias=True),
}


def config(name: str) -> dict[str, Any]:
    cfg = dict(tie_word_embeddings=False, qkv_bias=False, qk_norm=False, rms_eps=1e-6,
               rope_theta=500000.0)
    cfg.update(CONFIGS[name])
    return cfg


def weight_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of the weights (norm vectors included; the embedding once when tied)."""
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_heads"] * d, cfg["num_kv_heads"] * d
    layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    if cfg["qkv_bias"]:
        layer += q + 2 * kv
    if cfg["qk_norm"]:
        layer += 2 * d
    edge = cfg["vocab_size"] * h * (1 if cfg["tie_word_embeddings"] else 2) + h
    return (cfg["num_layers"] * layer + edge) * dtype_bytes


# --------------------------------------------------------------------------- model

def init_params(cfg: dict, device, dtype, seed: int = 0) -> dict:
    """Random weights, scaled so that activations stay finite through the layers."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_heads"] * d, cfg["num_kv_heads"] * d

    def w(*shape, scale=None):
        t = torch.empty(*shape, device=device, dtype=dtype)
        return t.normal_(0.0, scale or 1.0 / math.sqrt(shape[-1]), generator=g)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    layers = []
    for _ in range(cfg["num_layers"]):
        lp = {"attn_norm": ones(h), "wqkv": w(q + 2 * kv, h), "wo": w(h, q), "mlp_norm": ones(h),
              "w_gate_up": w(2 * f, h), "w_down": w(h, f)}
        if cfg["qkv_bias"]:
            lp["bqkv"] = w(q + 2 * kv, scale=0.02)
        if cfg["qk_norm"]:
            lp["q_norm"], lp["k_norm"] = ones(d), ones(d)
        layers.append(lp)
    embed = w(cfg["vocab_size"], h, scale=1.0)
    lm_head = embed if cfg["tie_word_embeddings"] else w(cfg["vocab_size"], h)
    return {"embed": embed, "layers": layers, "final_norm": ones(h), "lm_head": lm_head}


def rope_tables(cfg: dict, max_pos: int, device, dtype):
    """cos, sin [max_pos, head_dim] for rotate-half RoPE."""
    d = cfg["head_dim"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rms_norm(x, w, eps: float):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def apply_rope(x, cos, sin):
    """x [T, H, D]; cos, sin [T, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sdpa(q, k, v, **kw):
    """SDPA, grouped-query when q has more heads than k/v."""
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kw)


@dataclass
class Batch:
    """One iteration's inputs: `num_decodes` decode tokens first, then one prefill chunk of
    `chunk` tokens over `cached` cached ones (chunk 0: decode only)."""
    input_ids: Any  # [T] int64
    positions: Any  # [T] int64
    slot_mapping: Any  # [T] int64: where each new token's K/V goes in the pool
    sample_rows: Any  # [S] int64: rows whose logits are computed
    num_decodes: int
    context: int  # tokens each decode attends (its own included)
    decode_slots: Any  # [B, context] int64 (gather) or None
    decode_mask: Any  # FlexAttention BlockMask or None
    chunk: int
    cached: int
    chunk_slots: Any  # [1, cached + chunk] int64 or None
    causal_mask: Any  # torch.nn.attention.bias.causal_lower_right(chunk, cached + chunk) or None


def table_slots(table, block_size: int, length: int):
    """Slot of each of the first `length` tokens of each sequence of a block table [B, nb]."""
    offs = torch.arange(block_size, device=table.device, dtype=torch.int64)
    return (table.to(torch.int64)[:, :, None] * block_size + offs).reshape(table.shape[0], -1)[:, :length]


def flex_block_mask(tables, lengths: list[int], block_size: int, num_slots: int):
    """A BlockMask that reads each sequence's pages in place from the pool [1, H, num_slots, D]:
    full pages are full blocks (no mask function in the kernel), a partly filled last page is a
    partial block whose mask function maps the physical slot back to the sequence's position."""
    from torch.nn.attention.flex_attention import BlockMask

    batch = tables.shape[0]
    device = tables.device
    total_blocks = num_slots // block_size
    phys2log = torch.full((batch, total_blocks), -1, dtype=torch.int32, device=device)
    seq_len = torch.tensor(lengths, dtype=torch.int32, device=device)
    full_n = torch.zeros(batch, 1, 1, dtype=torch.int32, device=device)
    part_n = torch.zeros(batch, 1, 1, dtype=torch.int32, device=device)
    full_idx = torch.zeros(batch, 1, 1, total_blocks, dtype=torch.int32, device=device)
    part_idx = torch.zeros(batch, 1, 1, total_blocks, dtype=torch.int32, device=device)
    for b, n in enumerate(lengths):
        nb = -(-n // block_size)
        row = tables[b, :nb]
        phys2log[b, row.long()] = torch.arange(nb, dtype=torch.int32, device=device)
        nfull = n // block_size
        full_n[b] = nfull
        full_idx[b, 0, 0, :nfull] = row[:nfull]
        if nb > nfull:
            part_n[b] = 1
            part_idx[b, 0, 0, 0] = row[nfull]

    def mask_mod(b, h, q_idx, kv_idx):
        logical = phys2log[b, kv_idx // block_size]
        pos = logical * block_size + kv_idx % block_size
        return (logical >= 0) & (pos < seq_len[b])

    return BlockMask.from_kv_blocks(part_n, part_idx, full_n, full_idx, BLOCK_SIZE=(128, block_size),
                                    mask_mod=mask_mod, seq_lengths=(1, num_slots), compute_q_blocks=False)


def attend(q, k, v, pool, batch: Batch, attn: str, flex):
    """Attention of one layer: q [T, Hq, D]; k, v [T, Hkv, D] (already written to the pool)."""
    k_pool, v_pool = pool
    B = batch.num_decodes
    outs = []
    if B:
        qd = q[:B].unsqueeze(2)  # [B, Hq, 1, D]
        if attn == "flex":
            kp = k_pool.permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, slots, D] view
            vp = v_pool.permute(1, 0, 2).unsqueeze(0)
            o = flex(qd, kp, vp, block_mask=batch.decode_mask, enable_gqa=qd.shape[1] != kp.shape[1])
        else:
            kd = k_pool[batch.decode_slots].transpose(1, 2)  # [B, Hkv, ctx, D]
            vd = v_pool[batch.decode_slots].transpose(1, 2)
            o = sdpa(qd, kd, vd)
        outs.append(o.reshape(B, -1))
    if batch.chunk:
        qc = q[B:].transpose(0, 1).unsqueeze(0)  # [1, Hq, c, D]
        if batch.cached == 0:
            kc, vc = k[B:].transpose(0, 1).unsqueeze(0), v[B:].transpose(0, 1).unsqueeze(0)
            o = sdpa(qc, kc, vc, is_causal=True)
        else:
            kc = k_pool[batch.chunk_slots].transpose(1, 2)  # [1, Hkv, p + c, D]
            vc = v_pool[batch.chunk_slots].transpose(1, 2)
            o = sdpa(qc, kc, vc, attn_mask=batch.causal_mask)
        outs.append(o[0].transpose(0, 1).reshape(batch.chunk, -1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def layer_forward(lp: dict, x, cos, sin, pool, batch: Batch, cfg: dict, attn: str, flex):
    T = x.shape[0]
    hq, hkv, d = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    eps = cfg["rms_eps"]
    h = rms_norm(x, lp["attn_norm"], eps)
    qkv = F.linear(h, lp["wqkv"], lp.get("bqkv"))
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    if cfg["qk_norm"]:
        q, k = rms_norm(q, lp["q_norm"], eps), rms_norm(k, lp["k_norm"], eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pool[0][batch.slot_mapping] = k
    pool[1][batch.slot_mapping] = v
    o = attend(q, k, v, pool, batch, attn, flex)
    x = x + F.linear(o, lp["wo"])
    h = rms_norm(x, lp["mlp_norm"], eps)
    gate, up = F.linear(h, lp["w_gate_up"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, lp["w_down"])


def forward(params: dict, rope: tuple, cfg: dict, batch: Batch, pools: list, attn: str, flex,
            layer_fn: Callable = layer_forward, num_layers: int | None = None):
    """fp32 logits [S, vocab] of the sampled rows of one iteration."""
    x = F.embedding(batch.input_ids, params["embed"])
    cos = rope[0][batch.positions].unsqueeze(1)
    sin = rope[1][batch.positions].unsqueeze(1)
    for i, lp in enumerate(params["layers"][:num_layers]):
        x = layer_fn(lp, x, cos, sin, pools[i % len(pools)], batch, cfg, attn, flex)
    x = rms_norm(x[batch.sample_rows], params["final_norm"], cfg["rms_eps"])
    return F.linear(x, params["lm_head"]).float()


# --------------------------------------------------------------------------- batches and caches

class BlockAllocator:
    """Hands out random free blocks of a pool, so block tables are fragmented."""

    def __init__(self, total_blocks: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(total_blocks, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"pool out of blocks ({n} asked, {len(self.free)} free)")
        out, self.free = self.free[:n], self.free[n:]
        return out


def make_batch(cfg: dict, device, *, num_decodes: int = 0, context: int = 0, chunk: int = 0,
               cached: int = 0, block_size: int = 16, num_slots: int, attn: str = "flex",
               seed: int = 0, tables: dict | None = None) -> Batch:
    """An iteration of `num_decodes` decodes (each attending `context` tokens, its new one at
    position context - 1) and one chunk of `chunk` tokens at positions cached..cached+chunk-1.
    `tables` ({"decode": [B, nb] tensor, "chunk": [1, nb] tensor}) reuses existing block
    tables (a test decoding after a prefill); else blocks are drawn at random."""
    total_blocks = num_slots // block_size
    alloc = BlockAllocator(total_blocks, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids, pos, slots, rows = [], [], [], []
    decode_slots = decode_mask = chunk_slots = causal = None
    if num_decodes:
        nb = -(-context // block_size)
        if tables and "decode" in tables:
            dtab = tables["decode"].to(device)
        else:
            dtab = torch.tensor([alloc.take(nb) for _ in range(num_decodes)], dtype=torch.int32, device=device)
        all_slots = table_slots(dtab, block_size, context)
        ids.append(torch.randint(cfg["vocab_size"], (num_decodes,), generator=g))
        pos.append(torch.full((num_decodes,), context - 1, dtype=torch.int64))
        slots.append(all_slots[:, context - 1].cpu())
        rows += list(range(num_decodes))
        if attn == "flex":
            decode_mask = flex_block_mask(dtab, [context] * num_decodes, block_size, num_slots)
        else:
            decode_slots = all_slots
    if chunk:
        total = cached + chunk
        nb = -(-total // block_size)
        ctab = tables["chunk"].to(device) if tables and "chunk" in tables else \
            torch.tensor([alloc.take(nb)], dtype=torch.int32, device=device)
        cslots = table_slots(ctab, block_size, total)
        ids.append(torch.randint(cfg["vocab_size"], (chunk,), generator=g))
        pos.append(torch.arange(cached, total, dtype=torch.int64))
        slots.append(cslots[0, cached:].cpu())
        rows.append(num_decodes + chunk - 1)
        if cached:
            from torch.nn.attention.bias import causal_lower_right
            chunk_slots, causal = cslots, causal_lower_right(chunk, total)
    cat = lambda ts: torch.cat(ts).to(device)
    return Batch(cat(ids), cat(pos), cat(slots), torch.tensor(rows, dtype=torch.int64, device=device),
                 num_decodes, context, decode_slots, decode_mask, chunk, cached, chunk_slots, causal)


def kv_pools(cfg: dict, num_slots: int, physical: int, device, dtype) -> list:
    pools = []
    for _ in range(physical):
        k = torch.empty(num_slots, cfg["num_kv_heads"], cfg["head_dim"], device=device, dtype=dtype).normal_()
        pools.append((k, torch.empty_like(k).normal_()))
    return pools


def kv_bytes_per_token_layer(cfg: dict, dtype_bytes: int = 2) -> int:
    return 2 * cfg["num_kv_heads"] * cfg["head_dim"] * dtype_bytes


# --------------------------------------------------------------------------- device helpers

def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(fn: Callable, dev: str, warmup: int, min_samples: int, max_samples: int,
               max_s: float) -> tuple[float, list[float]]:
    """Median ms per call and the samples: each call between two CUDA events (perf_counter on the
    CPU), the device synchronised between calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < max_samples and (len(samples) < min_samples or time.perf_counter() - t0 < max_s):
        if dev.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        else:
            s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - s) * 1e3)
    return statistics.median(samples), samples


def capture(fn: Callable):
    """A CUDA graph of fn (warmed up on a side stream first) and its static output."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def host_probe(dev: str, launches: int = 500, repeats: int = 5) -> float:
    """Wall-clock microseconds per eager launch of a tiny x.add_(1): the host's dispatch speed,
    which bounds every eager step; recorded beside the rows it may explain."""
    x = torch.zeros(1, device=dev)
    samples = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(launches):
            x.add_(1.0)
        sync(dev)
        samples.append((time.perf_counter() - t0) / launches * 1e6)
    return statistics.median(samples)


GEMM_HINTS = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "splitk")
ATTN_HINTS = ("flash", "fmha", "flex", "attention", "attn")


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(h in n for h in ATTN_HINTS):
        return "attention"
    if any(h in n for h in GEMM_HINTS):
        return "gemm"
    if n.startswith("triton"):
        return "triton"
    return "elementwise/other"


def profile_step(fn: Callable, dev: str, trace_path: str | None = None) -> dict:
    """Device kernels (and memcpy/memset) of one call of fn, by torch.profiler; on the CPU, the
    top-level aten ops. Optionally a gzipped chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True) as prof:  # (shapes: calibrate engine checks --batch)
        fn()
        sync(dev)
    names: collections.Counter = collections.Counter()
    memops = 0
    for e in prof.events():
        is_dev = str(getattr(e, "device_type", "")).endswith("CUDA")
        if dev.startswith("cuda"):
            if not is_dev:
                continue
            if e.name.startswith(("Memcpy", "Memset")) or "memcpy" in e.name.lower() or "memset" in e.name.lower():
                memops += 1
                continue
            names[e.name] += 1
        elif e.cpu_parent is None and e.name.startswith("aten::"):
            names[e.name] += 1
    out = {"kernels_per_step": sum(names.values()), "memops_per_step": memops,
           "kernels_by_class": dict(collections.Counter(kernel_class(n) for n in names.elements())),
           "top_kernels": [[n[:160], c] for n, c in names.most_common(15)]}
    if trace_path:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as src, gzip.open(trace_path, "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
        out["trace_bytes"] = os.path.getsize(trace_path)
    return out


def device_info(dev: str) -> dict:
    info: dict[str, Any] = {"device": dev, "torch": torch.__version__, "python": platform.python_version()}
    if dev.startswith("cuda"):
        info["kind"] = "cuda"
        info["name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(0)
        for a in ("multi_processor_count", "L2_cache_size", "total_memory"):
            info[a] = getattr(props, a, None)
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                r = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                info["driver"] = r.stdout.strip().splitlines()[0]
            except Exception:
                pass
    else:
        info["kind"] = "cpu"
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------- the run

DEFAULT_MODELS = ("llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "qwen3-8b", "llama-2-13b")


def plan(quick: bool, on_cpu: bool) -> dict:
    if on_cpu:
        return dict(models=["tiny", "tiny-qwen3"], batches=[1, 4], contexts=[32, 64], prompts=[32, 64],
                    mixed=[(2, 32, 16, 0), (2, 32, 16, 16)], block_size=16, extra_block_sizes=[32],
                    extra_bs_shapes=[(2, 64)],
                    compile_models=["tiny"], compile_shapes=[(1, 32), (4, 32)], flex_shapes=[],
                    warmup=1, min_samples=3, max_samples=3, max_s=0.2, styles=["eager"],
                    kv_budget_bytes=GIB, trace_model="tiny", trace_shape=(4, 32))
    if quick:
        return dict(models=["llama-3.1-8b", "qwen3-8b"], batches=[1, 32], contexts=[2048], prompts=[2048],
                    mixed=[(32, 2048, 512, 1536)], block_size=16, extra_block_sizes=[128],
                    extra_bs_shapes=[(32, 2048)],
                    compile_models=["llama-3.1-8b"], compile_shapes=[(8, 2048)], flex_shapes=[(8, 2048)],
                    warmup=2, min_samples=3, max_samples=5, max_s=0.3,
                    styles=["eager", "graph", "compile", "compile_graph"],
                    kv_budget_bytes=None, trace_model="llama-3.1-8b", trace_shape=(8, 2048))
    return dict(models=list(DEFAULT_MODELS), batches=[1, 8, 32, 64, 128], contexts=[512, 2048, 8192],
                prompts=[512, 2048, 4096, 8192],
                mixed=[(32, 2048, 512, 0), (32, 2048, 512, 1536), (8, 8192, 2048, 2048), (128, 1024, 256, 3840)],
                block_size=16, extra_block_sizes=[128],
                extra_bs_shapes=[(1, 2048), (32, 2048), (128, 2048), (32, 8192)],
                compile_models=["llama-3.1-8b", "llama-3.2-1b"],
                compile_shapes=[(1, 2048), (8, 2048), (32, 2048), (128, 2048), (32, 8192)],
                flex_shapes=[(1, 2048), (8, 512), (8, 2048), (32, 2048), (128, 2048), (32, 8192)],
                warmup=2, min_samples=5, max_samples=15, max_s=0.4,
                styles=["eager", "graph", "compile", "compile_graph"],
                kv_budget_bytes=None, trace_model="llama-3.1-8b", trace_shape=(8, 2048))


class Runner:
    def __init__(self, args, dev: str, dtype):
        self.args, self.dev, self.dtype = args, dev, dtype
        self.on_cpu = not dev.startswith("cuda")
        self.p = plan(args.quick, self.on_cpu)
        if args.models:
            self.p["models"] = args.models.split(",")
        if args.styles:
            self.p["styles"] = args.styles.split(",")
        if getattr(args, "compile_models", None):
            self.p["compile_models"] = args.compile_models.split(",")
        if self.on_cpu:
            self.p["styles"] = [s for s in self.p["styles"] if "graph" not in s]
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.counts: list[dict] = []
        self.traces: list[dict] = []
        self.skipped: list[dict] = []
        self.configs: dict[str, dict] = {}
        self.flex_plain = None
        self.flex_compiled = None
        self.compiled_layer = None
        self.dbytes = 2 if dtype in (torch.bfloat16, torch.float16) else 4

    # -- bookkeeping
    def say(self, msg: str) -> None:
        print(f"  [{time.perf_counter() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def skip(self, reason: str, **key) -> None:
        self.skipped.append({**key, "reason": reason[:300]})
        self.say(f"skip {key}: {reason[:200]}")

    def flex_fn(self, style: str):
        from torch.nn.attention.flex_attention import flex_attention
        if style.startswith("compile") or self.on_cpu:
            return flex_attention  # traced inside the compiled layer / eager reference on the CPU
        if self.flex_compiled is None:
            # static shapes by default: with a symbolic batch, torch 2.11 leaves its decode kernel
            # for the general one, which refuses pages smaller than its KV tile
            self.flex_compiled = torch.compile(flex_attention, dynamic=bool(self.args.flex_dynamic))
        return self.flex_compiled

    def layer_fn(self, style: str):
        if not style.startswith("compile"):
            return layer_forward
        if self.compiled_layer is None:
            self.compiled_layer = torch.compile(layer_forward, mode=self.args.compile_mode)
        return self.compiled_layer

    max_gather = 16 * GIB

    def gather_bytes(self, cfg: dict, batch: int, context: int) -> int:
        """The K and V copy the gather reader makes per layer."""
        return batch * context * kv_bytes_per_token_layer(cfg, self.dbytes)

    # -- one model
    def run_model(self, name: str) -> None:
        cfg = config(name)
        p = self.p
        wb = weight_bytes(cfg, self.dbytes)
        self.configs[name] = {**CONFIGS[name], "weight_bytes": wb,
                              **{k: cfg[k] for k in ("tie_word_embeddings", "qkv_bias", "qk_norm")}}
        self.configs[name]["host_probe_us"] = round(host_probe(self.dev), 3)
        self.say(f"{name}: init {wb / GIB:.1f} GiB of weights (host probe "
                 f"{self.configs[name]['host_probe_us']:.2f} us per eager launch)")
        params = init_params(cfg, self.dev, self.dtype)
        bs_all = [p["block_size"]] + p["extra_block_sizes"]
        max_tokens = max([b * c for b in p["batches"] for c in p["contexts"]]
                         + [b * c + ch + ca for b, c, ch, ca in p["mixed"]] + list(p["prompts"]))
        # the largest iteration, plus a partly filled last block per sequence at the largest block size
        big = max(bs_all)
        num_slots = -(-(max_tokens + (max(p["batches"]) + 2) * big) // big) * big
        per_layer = num_slots * kv_bytes_per_token_layer(cfg, self.dbytes)
        if p["kv_budget_bytes"]:
            budget = p["kv_budget_bytes"]
        else:
            free, _ = torch.cuda.mem_get_info()
            # activations, graphs and compile workspaces, and the largest gathered KV copy
            gathered = [self.gather_bytes(cfg, b, c) for b in p["batches"] for c in p["contexts"]]
            budget = free - 6 * GIB - max(g for g in gathered if g <= self.max_gather)
        physical = min(cfg["num_layers"], int(budget // per_layer))
        if physical < 1:
            self.skip(f"KV pool of {per_layer / GIB:.1f} GiB per layer does not fit", model=name)
            return
        self.say(f"{name}: KV pools {physical} x {per_layer / GIB:.2f} GiB ({num_slots} slots)")
        pools = kv_pools(cfg, num_slots, physical, self.dev, self.dtype)
        rope = rope_tables(cfg, max(p["contexts"] + p["prompts"]) + 8192, self.dev, self.dtype)
        ctx = dict(name=name, cfg=cfg, params=params, pools=pools, rope=rope, num_slots=num_slots,
                   physical=physical)
        attn = self.args.attn
        trace_model = name == p["trace_model"]
        eager_styles = [s for s in p["styles"] if not s.startswith("compile")]
        decode = [(b, c) for c in p["contexts"] for b in p["batches"]]
        # kernel counts and traces first: they are the scarcest data
        tb, tc = p["trace_shape"]
        for style in p["styles"]:
            if style.startswith("compile") and name not in p["compile_models"]:
                continue
            self.count(ctx, style, attn, tb, tc, trace=trace_model)
        if trace_model and self.args.trace_dir and self.args.trace_prefill:
            self.trace_prefill(ctx, self.args.trace_prefill)
        if trace_model and attn != "flex" and p["flex_shapes"] and not self.args.no_flex:
            for style in eager_styles:
                self.count(ctx, style, "flex", tb, tc, trace=False)
        for style in eager_styles:
            for b, c in decode:
                self.time_row(ctx, style, "decode", attn, batch=b, context=c)
            if trace_model:
                for bs in p["extra_block_sizes"]:
                    for b, c in p["extra_bs_shapes"]:
                        self.time_row(ctx, style, "decode", attn, batch=b, context=c, block_size=bs)
            for n in p["prompts"]:
                self.time_row(ctx, style, "prefill", "sdpa", chunk=n)
            for b, c, ch, ca in p["mixed"]:
                self.time_row(ctx, style, "mixed", attn, batch=b, context=c, chunk=ch, cached=ca)
        if trace_model and attn != "flex" and not self.args.no_flex:  # FlexAttention reading the pages
            for style in eager_styles:
                for bs in [p["block_size"]] + p["extra_block_sizes"]:
                    for b, c in p["flex_shapes"]:
                        self.time_row(ctx, style, "decode", "flex", batch=b, context=c, block_size=bs)
        if name in p["compile_models"]:
            for style in [s for s in p["styles"] if s.startswith("compile")]:
                for b, c in p["compile_shapes"]:
                    self.time_row(ctx, style, "decode", attn, batch=b, context=c)
        del ctx, params, pools
        self.compiled_layer = None  # a fresh compile cache entry per model keeps guards simple
        if not self.on_cpu:
            torch.cuda.empty_cache()

    def build(self, ctx: dict, attn: str, batch: int = 0, context: int = 0, chunk: int = 0,
              cached: int = 0, block_size: int | None = None) -> Batch:
        return make_batch(ctx["cfg"], self.dev, num_decodes=batch, context=context, chunk=chunk,
                          cached=cached, block_size=block_size or self.p["block_size"],
                          num_slots=ctx["num_slots"], attn=attn, seed=batch * 7919 + context + chunk)

    def step_fn(self, ctx: dict, style: str, attn: str, batch: Batch, num_layers: int | None = None):
        flex = self.flex_fn(style)
        layer = self.layer_fn(style)

        def step():
            logits = forward(ctx["params"], ctx["rope"], ctx["cfg"], batch, ctx["pools"], attn, flex,
                             layer, num_layers)
            return logits.argmax(dim=-1)
        return step

    def runnable(self, ctx: dict, style: str, attn: str, key: dict) -> Callable | None:
        """The step to time (a graph replay for graph styles), or None if skipped."""
        b, c = key.get("batch", 0), key.get("context", 0)
        cfg = ctx["cfg"]
        gathered = self.gather_bytes(cfg, b, c)
        if attn == "gather" and gathered > self.max_gather:
            self.skip(f"gathered KV copy of {gathered / GIB:.0f} GiB per layer", **key)
            return None
        batch = self.build(ctx, attn, batch=b, context=c, chunk=key.get("chunk", 0),
                           cached=key.get("cached", 0), block_size=key.get("block_size"))
        step = self.step_fn(ctx, style, attn, batch)
        if style.endswith("graph"):
            g, _ = capture(step)
            return g.replay
        return step

    def time_row(self, ctx: dict, style: str, phase: str, attn: str, **shape) -> None:
        name = ctx["name"]
        key = {"model": name, "style": style, "phase": phase, "attn": attn, **shape}
        if self.left() < (60 if style.startswith("compile") else 5):
            self.skip("time budget spent", **key)
            return
        t0 = time.perf_counter()
        try:
            fn = self.runnable(ctx, style, attn, key)
            if fn is None:
                return
            fn()
            sync(self.dev)
            first = time.perf_counter() - t0
            gc.collect()
            p = self.p
            med, samples = time_steps(fn, self.dev, p["warmup"], p["min_samples"], p["max_samples"], p["max_s"])
        except Exception as e:  # record and go on: one failed shape must not lose the run
            self.skip(f"{type(e).__name__}: {e}", **key)
            if not self.on_cpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return
        b, chunk = shape.get("batch", 0), shape.get("chunk", 0)
        row = {"model": name, "style": style, "phase": phase, "attn": attn, "batch": b,
               "context": shape.get("context", 0), "prompt": chunk if phase == "prefill" else 0,
               "chunk": chunk if phase == "mixed" else 0, "cached": shape.get("cached", 0),
               "block_size": shape.get("block_size") or self.p["block_size"],
               "tokens": b + chunk, "sampled": b + (1 if chunk else 0),
               "kv_layers_physical": ctx["physical"], "median_ms": med, "samples_ms": samples,
               "warmup": self.p["warmup"], "first_call_s": round(first, 3)}
        for kc in self.counts:
            if kc["model"] == name and kc["style"] == style and kc["phase"] == "decode" and phase == "decode" \
                    and kc["batch"] == b and kc["context"] == row["context"] and kc["attn"] == attn:
                row["kernels"] = kc["kernels_per_step"]
        self.rows.append(row)
        self.say(f"{name} {style} {phase} {attn} " + " ".join(f"{k}={v}" for k, v in shape.items())
                 + f": {med:.3f} ms (first call {first:.1f} s)")

    def trace_prefill(self, ctx: dict, n: int) -> None:
        """A chrome trace of one prefill of n tokens (batch 1, no cache), replayed from a graph
        where the device has graphs: the input of `npusim calibrate engine --phase prefill`."""
        name = ctx["name"]
        style = "graph" if not self.on_cpu else "eager"
        try:
            os.makedirs(self.args.trace_dir, exist_ok=True)
            path = os.path.join(self.args.trace_dir, f"trace-{name}-{style}-prefill-p{n}.json.gz")
            full = self.step_fn(ctx, style, "sdpa", self.build(ctx, "sdpa", chunk=n))
            fn = capture(full)[0].replay if style == "graph" else full
            res = profile_step(fn, self.dev, path)
        except Exception as e:
            self.skip(f"prefill trace: {type(e).__name__}: {e}", model=name, style=style, phase="prefill", prompt=n)
            return
        self.traces.append({"model": name, "style": style, "phase": "prefill", "file": os.path.basename(path),
                            "bytes": res["trace_bytes"], "prompt": n})
        self.say(f"{name} {style} prefill {n}: {res['kernels_per_step']} kernels ({res['kernels_by_class']})")

    def count(self, ctx: dict, style: str, attn: str, b: int, c: int, trace: bool) -> None:
        name = ctx["name"]
        key = {"model": name, "style": style, "phase": "decode", "attn": attn, "batch": b, "context": c}
        if self.left() < (60 if style.startswith("compile") else 10):
            self.skip("time budget spent (kernel count)", **key)
            return
        try:
            batch = self.build(ctx, attn, batch=b, context=c)
            trace_path = None
            if trace and self.args.trace_dir:
                os.makedirs(self.args.trace_dir, exist_ok=True)
                trace_path = os.path.join(self.args.trace_dir, f"trace-{name}-{style}-decode-b{b}-c{c}.json.gz")
            full = self.step_fn(ctx, style, attn, batch)
            fn = capture(full)[0].replay if style.endswith("graph") else full
            res = profile_step(fn, self.dev, trace_path)
            if trace_path and res.get("trace_bytes", 0) > 2 * 2**20:
                os.remove(trace_path)
                res["trace_dropped"] = f"{res['trace_bytes']} bytes > 2 MiB"
                trace_path = None
            # per layer: truncations of the same step (graph styles: their eager twin's)
            base_style = style.replace("_graph", "") if style != "graph" else "eager"
            k1 = profile_step(self.step_fn(ctx, base_style, attn, batch, num_layers=1), self.dev)["kernels_per_step"]
            k2 = profile_step(self.step_fn(ctx, base_style, attn, batch, num_layers=2), self.dev)["kernels_per_step"]
        except Exception as e:
            self.skip(f"kernel count: {type(e).__name__}: {e}", **key)
            return
        per_layer = k2 - k1
        entry = {**key, "block_size": self.p["block_size"], **res, "kernels_per_layer": per_layer,
                 "kernels_edge": k1 - per_layer, "truncation_style": base_style,
                 "num_layers": ctx["cfg"]["num_layers"],
                 "consistent": k1 - per_layer + per_layer * ctx["cfg"]["num_layers"] == res["kernels_per_step"]}
        self.counts.append(entry)
        if trace_path:
            self.traces.append({"model": name, "style": style, "file": os.path.basename(trace_path),
                                "bytes": res["trace_bytes"], "batch": b, "context": c})
        self.say(f"{name} {style}: {res['kernels_per_step']} kernels/step, {per_layer}/layer, "
                 f"edge {k1 - per_layer} ({res['kernels_by_class']})")


def merge(paths: list[str]) -> dict:
    """One results file from several runs (e.g. one process per model): rows, kernel counts,
    traces and skips concatenated, configs united; each run's args, probes and time under "runs"."""
    runs = [json.load(open(p)) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("args", "plan", "seconds", "host_probe_us")}
    for key in ("rows", "kernel_counts", "traces", "skipped"):
        out[key] = [x for r in runs for x in r[key]]
    out["configs"] = {k: v for r in runs for k, v in r["configs"].items()}
    out["quick"] = any(r["quick"] for r in runs)
    out["runs"] = [{"file": os.path.basename(p), "timestamp": r["timestamp"], "args": r["args"],
                    "models": list(r["configs"]), "host_probe_us": r.get("host_probe_us"),
                    "seconds": r["seconds"]} for p, r in zip(paths, runs)]
    out["plan"] = runs[0]["plan"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="write the results JSON here")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="write one file merging these results files to --out, and run nothing")
    ap.add_argument("--quick", action="store_true", help="few shapes (on the CPU: tiny models)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--models", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--styles", help="comma-separated subset of eager, graph, compile, compile_graph")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this many seconds")
    ap.add_argument("--compile-models", help="comma-separated models the compile styles run (default: llama-3.1-8b, llama-3.2-1b)")
    ap.add_argument("--trace-dir", help="write gzipped chrome traces here")
    ap.add_argument("--trace-prefill", type=int, default=None, metavar="N",
                    help="with --trace-dir: also trace the trace model's prefill of N tokens (graph replay)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the compile styles (default: default)")
    ap.add_argument("--attn", default="gather", choices=["flex", "gather"],
                    help="the decode attention reader of the main rows (default gather; the trace model "
                         "also runs plan['flex_shapes'] with flex)")
    ap.add_argument("--no-flex", action="store_true", help="skip the trace model's FlexAttention rows")
    ap.add_argument("--flex-dynamic", action="store_true", help="compile FlexAttention with dynamic shapes")
    args = ap.parse_args(argv)
    if args.merge:
        merged = merge(args.merge)
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=1)
            f.write("\n")
        print(f"merged {len(args.merge)} runs, {len(merged['rows'])} rows: {args.out}")
        return 0
    if torch is None:
        print("reference_decoder: needs PyTorch", file=sys.stderr)
        return 2
    dev = "cuda:0" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    if args.device == "cuda" and dev == "cpu":
        print("reference_decoder: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if dev != "cpu" else torch.float32
    torch.manual_seed(0)
    cfg = getattr(getattr(torch, "_dynamo", None), "config", None)
    for knob in ("cache_size_limit", "recompile_limit"):
        if cfg is not None and hasattr(cfg, knob):
            setattr(cfg, knob, max(getattr(cfg, knob), 256))
    r = Runner(args, dev, dtype)
    now = _dt.datetime.now(_dt.timezone.utc)
    probe_start = host_probe(dev)
    with torch.inference_mode():
        for name in r.p["models"]:
            if r.left() < 5:
                r.skip("time budget spent", model=name)
                continue
            try:
                r.run_model(name)
            except Exception as e:
                r.skip(f"{type(e).__name__}: {e}", model=name)
                if dev != "cpu":
                    torch.cuda.empty_cache()
    out = {"npusim_reference_decoder": SCHEMA, "date": now.date().isoformat(),
           "timestamp": now.isoformat(timespec="seconds"), "quick": args.quick,
           "args": {k: v for k, v in vars(args).items()}, "device": device_info(dev),
           "dtype": {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
           "plan": {k: v for k, v in r.p.items()}, "configs": r.configs, "rows": r.rows,
           "kernel_counts": r.counts, "traces": r.traces, "skipped": r.skipped,
           "host_probe_us": {"start": round(probe_start, 3), "end": round(host_probe(dev), 3)},
           "seconds": round(time.perf_counter() - r.t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(summary(out))
    print(f"results: {args.out}")
    return 0


def summary(out: dict) -> str:
    lines = [f"{out['device'].get('name')} torch {out['device']['torch']}: {len(out['rows'])} rows, "
             f"{len(out['skipped'])} skipped, {out['seconds']} s"]
    for kc in out["kernel_counts"]:
        lines.append(f"  kernels {kc['model']:<14}{kc['style']:<14}{kc['kernels_per_step']:>6}/step "
                     f"{kc['kernels_per_layer']:>4}/layer  edge {kc['kernels_edge']}")
    for r in out["rows"]:
        shape = (f"B={r['batch']} ctx={r['context']}" if r["phase"] == "decode" else
                 f"P={r['prompt']}" if r["phase"] == "prefill" else
                 f"B={r['batch']} ctx={r['context']} c={r['chunk']} p={r['cached']}")
        lines.append(f"  {r['model']:<14}{r['style']:<14}{r['phase']:<8}{r['attn']:<7}bs={r['block_size']:<4}"
                     f"{shape:<28}{r['median_ms']:>9.3f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
