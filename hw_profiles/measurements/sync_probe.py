"""Does the reference decoder's eager step make the host wait for the device, and where?

Torch only: CUDA (or the CPU: a dry run that finds nothing to wait for).

    python hw_profiles/measurements/sync_probe.py --out FILE [--device cuda|cpu] [--model llama-3.2-1b]

An eager step overlaps the host's launches with the device's kernels unless an op blocks the host
until the device catches up (a device-to-host copy, a data-dependent shape). The eager rows of
hw_profiles/measurements (h200-2026-12-02-decoder-per-process.json) show decode steps overlapping
(max(host, device)) but mixed steps with a cached context and short prefills taking up to host +
device. This probe runs one eager step of each kind under torch.cuda.set_sync_debug_mode("warn")
and records every synchronising call PyTorch reports (with the line of the decoder that made it),
and times each step with the host's wall clock: the whole step, and the host's time until its last
launch returned (the rest is the device catching up).

Output JSON (schema "npusim_sync_probe": 1): date, device, model, steps [{kind, shape, syncs
[{message, where}], wall_ms, launched_ms}].
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_decoder as rd  # noqa: E402


def _where() -> str:
    """The innermost frame of the decoder (or this probe) in the current stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if os.path.basename(frame.filename) in ("reference_decoder.py", "sync_probe.py"):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.line}"
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="llama-3.2-1b")
    args = ap.parse_args()
    dev = args.device
    on_cpu = dev == "cpu"
    model = "tiny" if on_cpu else args.model
    cfg = rd.config(model)
    dtype = torch.float32 if on_cpu else torch.bfloat16
    small = on_cpu
    shapes = ([("decode", dict(num_decodes=4, context=32)), ("prefill", dict(chunk=32)),
               ("mixed", dict(num_decodes=4, context=32, chunk=16, cached=16))] if small else
              [("decode", dict(num_decodes=32, context=2048)), ("prefill", dict(chunk=512)),
               ("prefill", dict(chunk=2048)), ("mixed", dict(num_decodes=32, context=2048, chunk=512)),
               ("mixed", dict(num_decodes=32, context=2048, chunk=512, cached=1536)),
               ("mixed", dict(num_decodes=128, context=1024, chunk=256, cached=3840))])
    num_slots = 16 * 1024 if small else 1 << 19
    steps = []
    with torch.inference_mode():
        params = rd.init_params(cfg, dev, dtype)
        rope = rd.rope_tables(cfg, 16384, dev, dtype)
        pools = rd.kv_pools(cfg, num_slots, 1, dev, dtype)
        for kind, shape in shapes:
            batch = rd.make_batch(cfg, dev, num_slots=num_slots, attn="gather", block_size=16, seed=1, **shape)

            def step():
                return rd.forward(params, rope, cfg, batch, pools, "gather", None).argmax(dim=-1)

            for _ in range(3):
                step()
            rd.sync(dev)
            syncs = []
            if not on_cpu:
                torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                out = step()
                launched = time.perf_counter()
                rd.sync(dev)
                t1 = time.perf_counter()
            if not on_cpu:
                torch.cuda.set_sync_debug_mode(0)
            del out
            for w in caught:
                syncs.append({"message": str(w.message)[:200], "where": f"{os.path.basename(w.filename)}:{w.lineno}"})
            steps.append({"kind": kind, "shape": shape, "syncs": syncs, "wall_ms": (t1 - t0) * 1e3,
                          "launched_ms": (launched - t0) * 1e3})
            print(f"{kind:8s} {shape}: {len(syncs)} sync(s), wall {(t1 - t0) * 1e3:.2f} ms, "
                  f"host launched in {(launched - t0) * 1e3:.2f} ms"
                  + "".join(f"\n    {s['where']}: {s['message'][:120]}" for s in syncs), flush=True)
    name = torch.cuda.get_device_name() if not on_cpu else "cpu"
    with open(args.out, "w") as f:
        json.dump({"npusim_sync_probe": 1, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "device": name, "torch": torch.__version__, "model": model, "steps": steps}, f, indent=1)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
