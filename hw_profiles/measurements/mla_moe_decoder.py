"""Measure whole steps of a DeepSeek-style model (MLA attention, MoE MLP) on one device, to check
npusim's MLA and MoE pricing on shapes and kernels it was not fitted to.

The model is DeepSeek-V2-Lite's shape (27 layers, the first dense, 26 of 64 routed experts, top 6,
plus 2 shared; MLA with a 512-value latent and a 64-dim RoPE key), random bf16 weights, written in
plain PyTorch as vLLM's MLA path runs it:
- one GEMM from the hidden state to q and the latent with the RoPE key (q_proj fused with
  kv_a_proj_with_mqa), an RMSNorm of the latent, RoPE on each head's rotary part and on the key;
- the latent and the key written to a paged cache (576 values a token a layer, blocks handed out
  at random);
- decode with the up-projections absorbed: q_nope @ W_UK per head (one bmm), scores of every head
  against the gathered latent + key (bmm), softmax in fp32, P @ latent (bmm), @ W_UV per head (bmm);
- prefill (batch 1, no cached context) with the latent up-projected (kv_b_proj) to each head's K and
  V, then causal scaled_dot_product_attention;
- the MoE MLP: router GEMM, softmax, top-k, tokens sorted by expert, two grouped GEMMs
  (torch._grouped_mm on CUDA; a loop of torch.mm elsewhere), weighted index_add back, plus the
  shared experts as one dense SwiGLU.

Decode steps (batch x context) and prefill steps (prompt length) are captured in a CUDA graph and
replayed (style "graph"), timed between CUDA events, medians of repeats. Kernels of one step are
counted by torch.profiler on the eager step, and per layer kind by truncating the model.
Device-agnostic: CUDA when present, else the CPU (a smoke run with a tiny config, eager).

Run: python hw_profiles/measurements/mla_moe_decoder.py --out FILE.json [--quick] [--budget-s S]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the CLI says so
    torch = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "deepseek-v2-lite": dict(num_layers=27, hidden=2048, heads=16, q_lora_rank=0, kv_lora_rank=512,
                             rope_dim=64, nope_dim=128, v_dim=128, intermediate=10944, experts=64, top_k=6,
                             expert_size=1408, shared=2, dense_layers=1, vocab=102400),
    "tiny-mla": dict(num_layers=3, hidden=64, heads=4, q_lora_rank=32, kv_lora_rank=32, rope_dim=16,
                     nope_dim=16, v_dim=16, intermediate=128, experts=8, top_k=2, expert_size=32, shared=1,
                     dense_layers=1, vocab=256),
}
EPS = 1e-6


def init_params(cfg: dict, dev, dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=dev).manual_seed(seed)
    h, H, c, dr, dn, dv = (cfg[k] for k in ("hidden", "heads", "kv_lora_rank", "rope_dim", "nope_dim", "v_dim"))
    ql = cfg["q_lora_rank"]

    def w(*shape):
        return torch.empty(*shape, device=dev, dtype=dtype).normal_(0.0, 1.0 / math.sqrt(shape[-2 if len(shape) == 3 else -1]),
                                                                    generator=g)

    def ones(n):
        return torch.ones(n, device=dev, dtype=dtype)

    layers = []
    for i in range(cfg["num_layers"]):
        q_out = ql if ql else H * (dn + dr)
        kv_b = w(H * (dn + dv), c)  # K's no-RoPE part and V of every head out of the latent
        per_head = kv_b.view(H, dn + dv, c)
        lp = {"attn_norm": ones(h), "w_a": w(q_out + c + dr, h), "kv_norm": ones(c), "kv_b": kv_b,
              "w_uk": per_head[:, :dn, :].contiguous(),                 # [H, dn, c]: q_nope -> latent
              "w_uv": per_head[:, dn:, :].transpose(1, 2).contiguous(),  # [H, c, dv]: latent -> v
              "wo": w(h, H * dv), "mlp_norm": ones(h)}
        if ql:
            lp["q_norm"], lp["w_qb"] = ones(ql), w(H * (dn + dr), ql)
        if i < cfg["dense_layers"]:
            lp["w_gate_up"], lp["w_down"] = w(2 * cfg["intermediate"], h), w(h, cfg["intermediate"])
        else:
            E, fe, fs = cfg["experts"], cfg["expert_size"], cfg["expert_size"] * cfg["shared"]
            lp.update(router=w(E, h), w1=w(E, h, 2 * fe), w2=w(E, fe, h),
                      ws_gate_up=w(2 * fs, h), ws_down=w(h, fs))
        layers.append(lp)
    return {"embed": w(cfg["vocab"], h), "layers": layers, "final_norm": ones(h), "lm_head": w(cfg["vocab"], h)}


def weight_bytes(params: dict) -> int:
    """Bytes of the weights as the model stores them (the absorbed copies of kv_b left out)."""
    total = 0
    for k, v in params.items():
        if k == "layers":
            total += sum(t.numel() * t.element_size() for lp in v for n, t in lp.items() if n not in ("w_uk", "w_uv"))
        else:
            total += v.numel() * v.element_size()
    return total


def rope(x, cos, sin):
    """Rotate-half RoPE on x [T, n, d] with cos, sin [T, 1, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def swiglu(x, gate_up, down):
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)


def moe(x, lp: dict, cfg: dict):
    """Routed experts (grouped GEMMs over the tokens sorted by expert) plus the shared experts."""
    k, E = cfg["top_k"], cfg["experts"]
    probs = F.linear(x, lp["router"]).softmax(dim=-1, dtype=torch.float32)
    weight, expert = probs.topk(k, dim=-1)  # [T, k]
    flat = expert.flatten()
    order = flat.argsort()
    token = order // k
    xs = x[token]
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        g, u = torch._grouped_mm(xs, lp["w1"], offs=offs).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(g) * u, lp["w2"], offs=offs)
    else:  # one torch.mm per expert that got tokens (needs the counts on the host)
        counts = torch.bincount(flat, minlength=E).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                g, u = (xs[start:start + n] @ lp["w1"][e]).chunk(2, dim=-1)
                outs.append((F.silu(g) * u) @ lp["w2"][e])
            start += n
        ys = torch.cat(outs)
    ys = ys * weight.flatten()[order].unsqueeze(1).to(ys.dtype)
    y = torch.zeros_like(x).index_add_(0, token, ys)
    return y + swiglu(x, lp["ws_gate_up"], lp["ws_down"])


def layer_forward(lp: dict, x, cos, sin, pool, batch: dict, cfg: dict, i: int):
    T = x.shape[0]
    H, c, dr, dn, dv, ql = (cfg[k] for k in ("heads", "kv_lora_rank", "rope_dim", "nope_dim", "v_dim", "q_lora_rank"))
    hn = F.rms_norm(x, (x.shape[-1],), lp["attn_norm"], EPS)
    a = F.linear(hn, lp["w_a"])
    q, lat, k_pe = a.split([a.shape[-1] - c - dr, c, dr], dim=-1)
    if ql:
        q = F.linear(F.rms_norm(q, (ql,), lp["q_norm"], EPS), lp["w_qb"])
    lat = F.rms_norm(lat, (c,), lp["kv_norm"], EPS)
    q_nope, q_pe = q.view(T, H, dn + dr).split([dn, dr], dim=-1)
    q_pe = rope(q_pe, cos, sin)
    k_pe = rope(k_pe.view(T, 1, dr), cos, sin).view(T, dr)
    pool[batch["slot_mapping"]] = torch.cat([lat, k_pe], dim=-1)
    outs = []
    B = batch["num_decodes"]
    if B:  # absorbed: every head scores the one latent
        q_lat = torch.bmm(q_nope[:B].transpose(0, 1), lp["w_uk"]).transpose(0, 1)  # [B, H, c]
        qc = torch.cat([q_lat, q_pe[:B]], dim=-1)  # [B, H, c + dr]
        kv = pool[batch["decode_slots"]]  # [B, ctx, c + dr]
        scores = torch.bmm(qc, kv.transpose(1, 2)) * (1.0 / math.sqrt(dn + dr))
        p = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
        o_lat = torch.bmm(p, kv[..., :c])  # [B, H, c]
        outs.append(torch.bmm(o_lat.transpose(0, 1), lp["w_uv"]).transpose(0, 1).reshape(B, H * dv))
    if batch["chunk"]:  # up-projected: ordinary attention over every head's K and V
        n = batch["chunk"]
        kvb = F.linear(lat[B:], lp["kv_b"]).view(n, H, dn + dv)
        k_nope, v = kvb.split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_pe[B:].unsqueeze(1).expand(n, H, dr)], dim=-1)
        qq = torch.cat([q_nope[B:], q_pe[B:]], dim=-1)
        o = F.scaled_dot_product_attention(qq.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                           v.transpose(0, 1).unsqueeze(0), is_causal=True)
        outs.append(o[0].transpose(0, 1).reshape(n, H * dv))
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    x = x + F.linear(o, lp["wo"])
    hn = F.rms_norm(x, (x.shape[-1],), lp["mlp_norm"], EPS)
    if i < cfg["dense_layers"]:
        return x + swiglu(hn, lp["w_gate_up"], lp["w_down"])
    return x + moe(hn, lp, cfg)


def forward(params: dict, rope_tab: tuple, cfg: dict, batch: dict, pools: list, num_layers: int | None = None):
    """fp32 logits [S, vocab] of the sampled rows of one iteration."""
    x = F.embedding(batch["input_ids"], params["embed"])
    cos = rope_tab[0][batch["positions"]].unsqueeze(1)
    sin = rope_tab[1][batch["positions"]].unsqueeze(1)
    for i, lp in enumerate(params["layers"][:num_layers]):
        x = layer_forward(lp, x, cos, sin, pools[i % len(pools)], batch, cfg, i)
    x = F.rms_norm(x[batch["sample_rows"]], (x.shape[-1],), params["final_norm"], EPS)
    return F.linear(x, params["lm_head"]).float()


def rope_tables(cfg: dict, max_pos: int, dev, dtype):
    d = cfg["rope_dim"]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    emb = torch.outer(torch.arange(max_pos, device=dev, dtype=torch.float32), inv)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_batch(cfg: dict, dev, *, num_decodes: int = 0, context: int = 0, prompt: int = 0,
               block_size: int, num_slots: int, seed: int) -> dict:
    """Decodes (each attending `context` tokens, its new one last) or one prompt (no cache)."""
    from reference_decoder import BlockAllocator, table_slots

    alloc = BlockAllocator(num_slots // block_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b: dict = {"num_decodes": num_decodes, "chunk": prompt, "decode_slots": None}
    if num_decodes:
        nb = -(-context // block_size)
        table = torch.tensor([alloc.take(nb) for _ in range(num_decodes)], dtype=torch.int32, device=dev)
        slots = table_slots(table, block_size, context)
        b.update(input_ids=torch.randint(cfg["vocab"], (num_decodes,), generator=g).to(dev),
                 positions=torch.full((num_decodes,), context - 1, dtype=torch.int64, device=dev),
                 slot_mapping=slots[:, context - 1].contiguous(), decode_slots=slots,
                 sample_rows=torch.arange(num_decodes, device=dev))
    else:
        table = torch.tensor([alloc.take(-(-prompt // block_size))], dtype=torch.int32, device=dev)
        b.update(input_ids=torch.randint(cfg["vocab"], (prompt,), generator=g).to(dev),
                 positions=torch.arange(prompt, dtype=torch.int64, device=dev),
                 slot_mapping=table_slots(table, block_size, prompt)[0].contiguous(),
                 sample_rows=torch.tensor([prompt - 1], device=dev))
    return b


def plan(quick: bool, on_cpu: bool) -> dict:
    if on_cpu:
        return dict(model="tiny-mla", batches=[1, 4], contexts=[32, 64], prompts=[32], block_size=16,
                    count_shape=(4, 32), min_samples=3, max_samples=3, max_s=0.2)
    if quick:
        return dict(model="deepseek-v2-lite", batches=[1, 32], contexts=[2048], prompts=[2048], block_size=16,
                    count_shape=(8, 2048), min_samples=3, max_samples=5, max_s=0.3)
    return dict(model="deepseek-v2-lite", batches=[1, 8, 32, 64, 128], contexts=[512, 2048, 8192],
                prompts=[512, 2048, 4096, 8192], block_size=16, count_shape=(8, 2048),
                min_samples=5, max_samples=15, max_s=0.4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="write the results JSON here")
    ap.add_argument("--quick", action="store_true", help="few shapes (on the CPU: a tiny model)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this many seconds")
    ap.add_argument("--trace", help="write a gzipped chrome trace of the whole counted step here")
    ap.add_argument("--counts-only", action="store_true", help="count kernels (and trace), time nothing")
    ap.add_argument("--count-prefill", type=int, default=None, metavar="N",
                    help="count (and trace) a prefill of N tokens instead of the plan's decode shape")
    args = ap.parse_args(argv)
    if args.count_prefill is not None and args.count_prefill < 1:
        print(f"mla_moe_decoder: --count-prefill must be a number of tokens >= 1, got {args.count_prefill}",
              file=sys.stderr)
        return 2
    if torch is None:
        print("mla_moe_decoder: needs PyTorch", file=sys.stderr)
        return 2
    from reference_decoder import capture, device_info, profile_step, sync, time_steps

    dev = "cuda:0" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    if args.device == "cuda" and dev == "cpu":
        print("mla_moe_decoder: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    on_cpu = dev == "cpu"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    p = plan(args.quick, on_cpu)
    cfg = CONFIGS[p["model"]]
    t0 = time.perf_counter()
    now = _dt.datetime.now(_dt.timezone.utc)
    rows, skipped, counts = [], [], []
    with torch.inference_mode():
        params = init_params(cfg, dev, dtype)
        max_ctx = max(p["contexts"] + p["prompts"])
        rope_tab = rope_tables(cfg, max_ctx + 1, dev, dtype)
        bs = p["block_size"]
        width = cfg["kv_lora_rank"] + cfg["rope_dim"]
        need = max(max(p["batches"]) * max(p["contexts"]), max(p["prompts"]))
        num_slots = -(-int(need * 1.1) // bs) * bs
        pool_bytes = num_slots * width * 2
        free = torch.cuda.mem_get_info()[0] if not on_cpu else 8 << 30
        physical = max(1, min(cfg["num_layers"], int((free * 0.5) // pool_bytes)))
        pools = [torch.empty(num_slots, width, device=dev, dtype=dtype).normal_() for _ in range(physical)]
        info = {"weight_bytes": weight_bytes(params), "kv_layers_physical": physical, "num_slots": num_slots}
        print(f"{p['model']}: {info['weight_bytes'] / 1e9:.2f} GB of weights, {physical} physical KV layers",
              flush=True)

        def step_fn(batch, num_layers=None):
            return lambda: forward(params, rope_tab, cfg, batch, pools, num_layers).argmax(dim=-1)

        # kernels of one eager step, of the whole model and truncated to 1, 2, 3 layers (dense, +MoE, +MoE)
        B, C = p["count_shape"]
        if args.count_prefill is not None:
            B, C = 0, 0
            batch = make_batch(cfg, dev, prompt=args.count_prefill, block_size=bs, num_slots=num_slots, seed=1)
        else:
            batch = make_batch(cfg, dev, num_decodes=B, context=C, block_size=bs, num_slots=num_slots, seed=1)
        phase = "prefill" if args.count_prefill else "decode"
        for n in (None, 1, 2, 3):
            pr = profile_step(step_fn(batch, n), dev, args.trace if n is None else None)
            counts.append({"phase": phase, "batch": B, "context": C, "prompt": args.count_prefill or 0,
                           "layers": n or cfg["num_layers"], **pr})
        shapes = [] if args.counts_only else \
            [("decode", b, c, 0) for c in p["contexts"] for b in p["batches"]] + [("prefill", 0, 0, n) for n in p["prompts"]]
        for phase, b, c, n in shapes:
            key = {"phase": phase, "batch": b, "context": c, "prompt": n}
            if time.perf_counter() - t0 > args.budget_s:
                skipped.append({**key, "reason": "time budget spent"})
                continue
            try:
                batch = make_batch(cfg, dev, num_decodes=b, context=c, prompt=n, block_size=bs,
                                   num_slots=num_slots, seed=b * 7919 + c + n)
                fn = step_fn(batch)
                style = "eager"
                if not on_cpu:
                    g, _ = capture(fn)
                    fn, style = g.replay, "graph"
                fn()
                sync(dev)
                med, samples = time_steps(fn, dev, 2, p["min_samples"], p["max_samples"], p["max_s"])
            except Exception as e:  # one failed shape must not lose the run
                skipped.append({**key, "reason": f"{type(e).__name__}: {e}"[:300]})
                if not on_cpu:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                continue
            rows.append({"model": p["model"], "style": style, **key, "block_size": bs,
                         "tokens": b + n, "sampled": b + (1 if n else 0), "median_ms": med, "samples_ms": samples})
            print(f"{p['model']} {style} {phase} B={b} ctx={c} P={n}: {med:.3f} ms", flush=True)
    out = {"npusim_mla_moe_decoder": 1, "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"),
           "device": device_info(dev), "dtype": "fp32" if on_cpu else "bf16", "plan": p, "config": cfg,
           **info, "grouped_mm": bool(not on_cpu and hasattr(torch, "_grouped_mm")), "rows": rows,
           "kernel_counts": counts, "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for kc in counts:
        print(f"kernels, {kc['layers']} layers: {kc['kernels_per_step']} ({kc['kernels_by_class']})")
    print(f"{len(rows)} rows, {len(skipped)} skipped, {out['seconds']} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
