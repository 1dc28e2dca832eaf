"""Probe: compiled gather+SDPA decode attention, static vs dynamic shapes, at head dims 128 and 64."""
import torch, json, os
import torch.nn.functional as F
torch._dynamo.config.cache_size_limit = 256
dev = "cuda"
def attend(q, kp, vp, slots):
    k = kp[slots].transpose(1, 2); v = vp[slots].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
def timeit(fn, *a):
    for _ in range(3): fn(*a)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10): fn(*a)
    ts = []
    for _ in range(7):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 10 * 1e3)
    return sorted(ts)[3]
out = []
for hkv_d in [(8, 128), (8, 64)]:
    hkv, d = hkv_d
    slots_total = 128 * 8192 + 64
    kp = torch.randn(slots_total, hkv, d, device=dev, dtype=torch.bfloat16); vp = torch.randn_like(kp)
    modes = {"eager": attend, "static": torch.compile(attend, dynamic=False),
             "dynamic": torch.compile(attend, dynamic=True), "auto": torch.compile(attend)}
    for B, C in [(8, 2048), (32, 2048), (128, 2048), (32, 8192)]:
        q = torch.randn(B, 32, 1, d, device=dev, dtype=torch.bfloat16)
        perm = torch.randperm(slots_total // 16)[: B * C // 16].to(dev)
        slots = (perm.view(B, C // 16, 1) * 16 + torch.arange(16, device=dev)).view(B, C)
        row = {"hkv": hkv, "d": d, "B": B, "C": C}
        for name, fn in modes.items():
            try: row[name] = round(timeit(fn, q, kp, vp, slots), 1)
            except Exception as ex: row[name] = str(ex)[:100]
        print(row, flush=True); out.append(row)
    del kp, vp; torch.cuda.empty_cache()
json.dump(out, open(os.environ["OUT"] + "/probe.json", "w"), indent=1)
