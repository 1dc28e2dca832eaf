"""Calibrate a hardware profile against the machine in front of you.

Two halves:

* the harness (``detect_device``, ``run_calibration``) times, with PyTorch on an Ascend NPU
  (torch_npu), a GPU or the CPU: the basic set the fit reads (a few GEMMs, a device copy, an
  elementwise op, back-to-back tiny kernels) and the shape-aware sweeps (GEMMs over M for the zoo
  models' linear layers, read and copy bandwidth over sizes, chains of dependent small kernels in
  a graph and eagerly, paged and dense decode attention over batch x context x block size, causal
  and chunked prefill attention). It needs only torch and the standard library, so that
  ``python -m npusim.calibrate`` runs on a machine that has torch but none of npusim's other
  dependencies;
* the fit (``fit_profile``, ``write_profile``) turns those measurements into a new profile in the
  YAML layout of ``hw_profiles/``, each fitted number marked ``kind: calibrated`` with a source
  naming what was measured, where and when. It imports pydantic/yaml lazily, inside the functions.

Measurements are plain dicts (JSON-ready); every timing keeps its raw samples in seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from npusim.errors import NpusimError

INSTALL_HINT = "pip install -e '.[calibrate]'"
SCHEMA_VERSION = 2  # 2 adds the shape-aware sections; every key of version 1 is kept
GIB = 2**30
DTYPE_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1, "int8": 1}
INT_MM_MIN_M = 17  # torch._int_mm on CUDA takes more than 16 rows


# --------------------------------------------------------------------------- device

@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "npu" | "cuda" | "cpu" | another torch accelerator type ("xpu", "mps", ...)
    device: str  # torch device string, e.g. "cuda:0"
    name: str
    torch_version: str


def _import_torch():
    try:
        import torch
    except ImportError:
        raise NpusimError(f"calibration needs PyTorch, which is not installed: {INSTALL_HINT}") from None
    return torch


def _npu_present(torch) -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and the "npu" device)
    except Exception:  # a torch_npu without a working CANN install raises more than ImportError
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _current_accelerator(torch) -> str | None:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    if acc is None or not hasattr(acc, "current_accelerator"):
        return None
    dev = acc.current_accelerator()
    return dev.type if dev is not None else None


def _present_kinds(torch) -> list[str]:
    """Device kinds on this machine, most preferred first; the CPU is always last."""
    kinds: list[str] = []
    if _npu_present(torch):
        kinds.append("npu")
    acc = _current_accelerator(torch)
    if acc and acc not in kinds:
        kinds.append(acc)
    if "cuda" not in kinds and torch.cuda.is_available():
        kinds.append("cuda")
    kinds.append("cpu")
    return kinds


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _device_name(torch, kind: str, index: int) -> str:
    if kind == "cpu":
        return f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    backend = getattr(torch, kind, None)
    get_name = getattr(backend, "get_device_name", None)
    if get_name is None:
        return kind
    try:
        return str(get_name(index))
    except Exception:  # some backends only name the current device
        return kind


def detect_device(requested: str = "auto") -> DeviceInfo:
    """The device to calibrate: torch_npu's NPU, else torch's current accelerator, else CUDA, else
    the CPU. A requested kind that is not present is an error rather than a silent CPU run."""
    torch = _import_torch()
    kinds = _present_kinds(torch)
    kind = kinds[0] if requested == "auto" else requested
    if kind not in kinds:
        raise NpusimError(f"device {requested!r} requested but not present on this machine; "
                          f"found: {', '.join(kinds)} (or use --device auto)")
    index = 0
    if kind != "cpu":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and _current_accelerator(torch) == kind and hasattr(acc, "current_device_index"):
            index = acc.current_device_index()
        else:
            index = getattr(torch, kind).current_device()
    device = "cpu" if kind == "cpu" else f"{kind}:{index}"
    return DeviceInfo(kind, device, _device_name(torch, kind, index), torch.__version__)


# --------------------------------------------------------------------------- timing

def _synchronize(torch, dev: DeviceInfo) -> None:
    if dev.kind == "cpu":
        return  # CPU ops run synchronously
    # torch.accelerator.synchronize() waits for the *current* accelerator; use it only when that
    # is the device we time, else the backend's own (torch.cuda / torch.npu / torch.xpu).
    if _current_accelerator(torch) == dev.kind and hasattr(torch.accelerator, "synchronize"):
        torch.accelerator.synchronize()
    else:
        getattr(torch, dev.kind).synchronize()


def _event(torch, dev: DeviceInfo):
    if hasattr(torch, "Event"):  # device-generic events, torch >= 2.4
        try:
            return torch.Event(device=dev.kind, enable_timing=True)
        except (TypeError, RuntimeError, ValueError):
            pass
    return getattr(torch, dev.kind).Event(enable_timing=True)  # torch.cuda.Event / torch.npu.Event


def _time_once(torch, dev: DeviceInfo, fn: Callable[[], Any], inner: int) -> float:
    """Seconds per call of `fn`, over `inner` back-to-back calls. Device events measure device
    time, so the host's Python and launch costs hide behind the queue of earlier launches."""
    if dev.kind == "cpu":
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner
    start, end = _event(torch, dev), _event(torch, dev)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / inner


def time_op(torch, dev: DeviceInfo, fn: Callable[[], Any], warmup: int, repeats: int,
            target_s: float, max_inner: int = 1000) -> tuple[float, list[float], int]:
    """(median seconds per call, samples, calls per sample). Each sample runs `fn` enough times to
    last about `target_s`, so short kernels are not drowned by timer resolution."""
    for _ in range(warmup):
        fn()
    _synchronize(torch, dev)
    probe = _time_once(torch, dev, fn, 1)
    inner = max(1, min(max_inner, int(target_s / max(probe, 1e-9))))
    samples = [_time_once(torch, dev, fn, inner) for _ in range(repeats)]
    return statistics.median(samples), samples, inner


# --------------------------------------------------------------------------- microbenchmarks

def _plan(quick: bool, on_cpu: bool) -> dict[str, Any]:
    """Sizes and repeat counts. GEMM shapes are those of an 8B-class layer (hidden 4096, FFN
    14336) at decode (small M) and prefill (large M) token counts, plus one large square GEMM."""
    if quick:
        nk = [(512, 512)] if on_cpu else [(4096, 4096)]
        return dict(gemm_m=[1, 64, 256], gemm_nk=nk, square=512 if on_cpu else 4096,
                    copy_bytes=(16 if on_cpu else 256) * 2**20,
                    elementwise=2**20 if on_cpu else 2**24, launches=200,
                    warmup=1, repeats=3, target_s=0.005, rotate_bytes=0 if on_cpu else 2**28)
    if on_cpu:  # a full sweep at accelerator sizes would take minutes on a CPU
        return dict(gemm_m=[1, 16, 64, 256, 1024], gemm_nk=[(4096, 4096)], square=2048,
                    copy_bytes=256 * 2**20, elementwise=2**24, launches=2000,
                    warmup=2, repeats=5, target_s=0.05, rotate_bytes=0)
    return dict(gemm_m=[1, 16, 64, 256, 1024, 4096],
                gemm_nk=[(4096, 4096), (14336, 4096), (4096, 14336)], square=8192,
                copy_bytes=GIB, elementwise=2**26, launches=2000,
                warmup=3, repeats=10, target_s=0.002, rotate_bytes=2**28)


def pick_dtype(torch, dev: DeviceInfo) -> str:
    """bf16 where the device runs it natively, else fp16; fp32 on the CPU."""
    if dev.kind == "cpu":
        return "fp32"
    check = getattr(getattr(torch, dev.kind, None), "is_bf16_supported", None)
    if check is not None:
        try:
            ok = check(including_emulation=False)  # emulated bf16 (e.g. V100) would mislead
        except TypeError:
            ok = check()
        if not ok:
            return "fp16"
    try:
        a = torch.ones(16, 16, device=dev.device, dtype=torch.bfloat16)
        (a @ a).sum().item()
    except Exception:  # e.g. Ascend 310P has no bf16 matmul
        return "fp16"
    return "bf16"


def _torch_dtype(torch, dtype: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def bench_gemm(torch, dev: DeviceInfo, m: int, n: int, k: int, dtype: str, plan: dict) -> dict:
    """C[m,n] = A[m,k] @ B[k,n]. B rotates over enough copies to overflow the L2 cache, as the
    weights of successive layers would; otherwise small-M GEMMs time the cache, not the memory."""
    td = _torch_dtype(torch, dtype)
    a = torch.randn(m, k, device=dev.device, dtype=td)
    b_bytes = k * n * DTYPE_SIZE[dtype]
    copies = max(1, min(16, math.ceil(plan["rotate_bytes"] / b_bytes)))
    bs = [torch.randn(k, n, device=dev.device, dtype=td) for _ in range(copies)]
    c = torch.empty(m, n, device=dev.device, dtype=td)
    next_b = itertools.cycle(bs).__next__
    sec, samples, inner = time_op(torch, dev, lambda: torch.mm(a, next_b(), out=c),
                                  plan["warmup"], plan["repeats"], plan["target_s"])
    flops = 2.0 * m * n * k
    nbytes = (m * k + k * n + m * n) * DTYPE_SIZE[dtype]
    return {"m": m, "n": n, "k": k, "dtype": dtype, "flops": flops, "bytes": nbytes,
            "seconds": sec, "tflops": flops / sec / 1e12, "weight_copies": copies,
            "calls_per_sample": inner, "samples": samples}


def bench_copy(torch, dev: DeviceInfo, plan: dict) -> dict:
    """dst.copy_(src) of one large buffer; bytes counted as read + write."""
    n = plan["copy_bytes"]
    src = torch.empty(n, device=dev.device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    sec, samples, inner = time_op(torch, dev, lambda: dst.copy_(src), plan["warmup"],
                                  plan["repeats"], plan["target_s"])
    return {"bytes": n, "bytes_moved": 2 * n, "seconds": sec, "gbs": 2 * n / sec / 1e9,
            "calls_per_sample": inner, "samples": samples}


def bench_elementwise(torch, dev: DeviceInfo, dtype: str, plan: dict) -> dict:
    """d = c + a * b as one fused kernel (addcmul): 2 flops and 4 memory accesses per element."""
    n = plan["elementwise"]
    td = _torch_dtype(torch, dtype)
    a, b, c = (torch.randn(n, device=dev.device, dtype=td) for _ in range(3))
    d = torch.empty_like(a)
    sec, samples, inner = time_op(torch, dev, lambda: torch.addcmul(c, a, b, out=d), plan["warmup"],
                                  plan["repeats"], plan["target_s"])
    flops = 2.0 * n
    nbytes = 4.0 * n * DTYPE_SIZE[dtype]
    return {"op": "addcmul (d = c + a*b)", "elements": n, "dtype": dtype, "flops": flops,
            "bytes": nbytes, "seconds": sec, "gbs": nbytes / sec / 1e9, "gflops": flops / sec / 1e9,
            "calls_per_sample": inner, "samples": samples}


def _graph_api(torch, kind: str):
    """(graph class, capture context) of the backend (CUDA graphs, torch_npu's NPU graphs), or None."""
    backend = getattr(torch, kind, None)
    cls = getattr(backend, "CUDAGraph", None) or getattr(backend, "NPUGraph", None)
    ctx = getattr(backend, "graph", None)
    return (cls, ctx) if cls is not None and ctx is not None else None


def bench_latency(torch, dev: DeviceInfo, plan: dict) -> dict:
    """Time per kernel of many back-to-back in-place adds on a one-element tensor. Eager launches
    are bound by the host's launch cost; replaying them from a captured graph (where the backend
    has one) leaves the device-side cost per kernel, which is what serving engines with graphs see."""
    n = plan["launches"]
    x = torch.zeros(1, device=dev.device)

    def launches():
        for _ in range(n):
            x.add_(1.0)

    out: dict[str, Any] = {"op": "x.add_(1) on a 1-element tensor", "launches": n}
    sec, samples, _ = time_op(torch, dev, launches, 1, plan["repeats"], 0.0, max_inner=1)
    out.update(us_per_op=sec / n * 1e6, samples=samples)
    # the host's view: wall time of the launches until the device has finished them
    t0 = time.perf_counter()
    launches()
    _synchronize(torch, dev)
    out["host_us_per_op"] = (time.perf_counter() - t0) / n * 1e6
    api = None if dev.kind == "cpu" else _graph_api(torch, dev.kind)
    if api is not None:
        cls, capture = api
        try:
            graph = cls()
            with capture(graph):
                launches()
            gsec, gsamples, _ = time_op(torch, dev, graph.replay, 1, plan["repeats"], 0.0, max_inner=1)
            out.update(graph_us_per_op=gsec / n * 1e6, graph_samples=gsamples)
        except Exception as e:  # graph capture is optional: record why it failed and go on
            out["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


# --------------------------------------------------------------------------- shape-aware sweeps
#
# The primitives below feed engine profiles and shape-aware device costs: every result keeps raw
# samples (seconds per call), the timing mode ("graph" replay or "eager" launches) and the shape.

# The zoo models whose linear layers the GEMM sweep covers, as in npusim.specs.MODEL_ZOO (copied,
# not imported: specs needs pydantic and this harness must run with torch alone; a test keeps
# the two equal).
SWEEP_MODELS: dict[str, dict[str, int]] = {
    "llama-3.2-1b": dict(hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256),
    "llama-3.1-8b": dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=128256),
    "llama-2-13b": dict(hidden_size=5120, num_heads=40, num_kv_heads=40, head_dim=128,
                        intermediate_size=13824, vocab_size=32000),
    "qwen2.5-7b": dict(hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                       intermediate_size=18944, vocab_size=152064),
}
SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
LINEAR_LAYERS = ("qkv", "o", "gate_up", "down", "lm_head")


def linear_shapes(shape: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear layer of a model, y[M, N] = x[M, K] @ W[N, K]^T, with QKV and
    gate/up fused as serving engines run them."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_heads"] * shape["head_dim"]
    kv = shape["num_kv_heads"] * shape["head_dim"]
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * f, h), "down": (h, f),
            "lm_head": (shape["vocab_size"], h)}


def zoo_gemm_pairs(models: list[str] | tuple[str, ...] = tuple(SWEEP_MODELS)) -> list[dict]:
    """The distinct (N, K) pairs of the models' linear layers, in first-seen order, each with the
    "model:layer" labels that use it."""
    pairs: dict[tuple[int, int], list[str]] = {}
    for name in models:
        for layer, nk in linear_shapes(SWEEP_MODELS[name]).items():
            pairs.setdefault(nk, []).append(f"{name}:{layer}")
    return [{"n": n, "k": k, "layers": labels} for (n, k), labels in pairs.items()]


def _backend(torch, dev: DeviceInfo):
    return getattr(torch, dev.kind)


def _capture_graph(torch, dev: DeviceInfo, fn: Callable[[], Any]):
    """A captured device graph of `fn` (CUDA graphs, NPU graphs), after a warm-up on a side stream
    as the graph APIs require. Raises where the backend has none."""
    api = None if dev.kind == "cpu" else _graph_api(torch, dev.kind)
    if api is None:
        raise RuntimeError(f"no graph API on {dev.kind}")
    cls, capture = api
    backend = _backend(torch, dev)
    side = backend.Stream()
    side.wait_stream(backend.current_stream())
    with backend.stream(side):
        fn()
    backend.current_stream().wait_stream(side)
    _synchronize(torch, dev)
    graph = cls()
    with capture(graph):
        fn()
    _synchronize(torch, dev)
    return graph


def time_calls(torch, dev: DeviceInfo, calls: list[Callable[[], Any]], plan: dict,
               use_graph: bool = True) -> dict:
    """Median seconds per call of `calls` run round-robin (the rotation defeats the L2 cache).

    With `use_graph` and a backend graph API, the round-robin is captured into one graph, repeated
    so that the graph lasts about plan["target_s"], and replayed: the samples are device time per
    call without launch gaps. Otherwise (or if the capture fails, recorded as graph_error) the
    calls are launched eagerly back to back and timed with device events."""
    n = len(calls)

    def rounds(k: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(k):
                for c in calls:
                    c()
        return run

    once = rounds(1)
    for _ in range(max(1, plan["warmup"])):
        once()
    _synchronize(torch, dev)
    probe = max(_time_once(torch, dev, once, 1) / n, 1e-9)
    out: dict[str, Any] = {}
    if use_graph and dev.kind != "cpu" and _graph_api(torch, dev.kind) is not None:
        k = max(1, min(plan.get("max_graph_calls", 2000) // n, int(plan["target_s"] / (probe * n))))
        try:
            graph = _capture_graph(torch, dev, rounds(k))
            sec, samples, inner = time_op(torch, dev, graph.replay, 1, plan["repeats"],
                                          plan["target_s"], max_inner=50)
            per = k * n
            out.update(timing="graph", seconds=sec / per, samples=[s / per for s in samples],
                       calls_per_sample=inner * per)
            del graph
            return out
        except Exception as e:  # capture is optional: record why and time eagerly
            out["graph_error"] = f"{type(e).__name__}: {e}"[:200]
            _synchronize(torch, dev)
    k = max(1, min(plan.get("max_inner", 1000), int(plan["target_s"] / (probe * n))))
    samples = [_time_once(torch, dev, rounds(k), 1) / (k * n) for _ in range(plan["repeats"])]
    out.update(timing="eager", seconds=statistics.median(samples), samples=samples,
               calls_per_sample=k * n)
    return out


def _copies(plan: dict, nbytes: float) -> int:
    """How many copies of an `nbytes` operand to rotate through so that they overflow the L2."""
    return max(1, min(plan.get("max_copies", 32), math.ceil(plan["rotate_bytes"] / max(nbytes, 1))))


def bench_linear(torch, dev: DeviceInfo, m: int, n: int, k: int, dtype: str, plan: dict,
                 layers: list[str] | None = None) -> dict:
    """y[m, n] = x[m, k] @ W[n, k]^T, the linear layer of a model (torch.mm on the transposed
    weight view, as F.linear does). W rotates over copies past the L2, as successive layers'
    weights would; small M is replayed from a graph so launch gaps don't count. dtype "fp8": x
    and W in float8 e4m3 with per-tensor scales, y in bf16, through torch._scaled_mm (W8A8 FP8,
    as vLLM runs FP8 checkpoints on FP8 tensor cores)."""
    size = DTYPE_SIZE[dtype]
    copies = _copies(plan, n * k * size)
    if dtype == "fp8":
        f8 = torch.float8_e4m3fn
        x = torch.randn(m, k, device=dev.device, dtype=torch.bfloat16).to(f8)
        ws = [torch.randn(n, k, device=dev.device, dtype=torch.bfloat16).to(f8) for _ in range(copies)]
        one = torch.ones((), device=dev.device, dtype=torch.float32)
        calls = [lambda w=w: torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                 for w in ws]
        op = "x @ W^T (torch._scaled_mm, float8 e4m3, per-tensor scales, bf16 out)"
        nbytes = float(m * k + n * k + m * n * 2)
    elif dtype == "int8":
        # W8A8 int8 (vLLM's int8 W8A8, Ascend-style): int8 x int8 -> int32 on the int8 tensor cores,
        # through torch._int_mm, which takes more than 16 rows: fewer are timed at 17 (a GEMM of
        # that few rows is one tile row either way)
        rows = max(m, INT_MM_MIN_M) if dev.kind == "cuda" else m
        x = torch.randint(-8, 8, (rows, k), device=dev.device, dtype=torch.int8)
        ws = [torch.randint(-8, 8, (n, k), device=dev.device, dtype=torch.int8) for _ in range(copies)]
        calls = [lambda w=w: torch._int_mm(x, w.t()) for w in ws]
        op = "x @ W^T (torch._int_mm, int8 x int8, int32 out)" + (f", timed at {rows} rows" if rows != m else "")
        nbytes = float(m * k + n * k + m * n * 4)
    else:
        td = _torch_dtype(torch, dtype)
        x = torch.randn(m, k, device=dev.device, dtype=td)
        ws = [torch.randn(n, k, device=dev.device, dtype=td) for _ in range(copies)]
        y = torch.empty(m, n, device=dev.device, dtype=td)
        calls = [lambda w=w: torch.mm(x, w.t(), out=y) for w in ws]
        op = "x @ W^T (torch.mm, transposed weight)"
        nbytes = float((m * k + n * k + m * n) * size)
    t = time_calls(torch, dev, calls, plan, use_graph=m <= plan["graph_max_m"])
    flops = 2.0 * m * n * k
    row = {"m": m, "n": n, "k": k, "dtype": dtype, "op": op,
           "layers": layers or [], "flops": flops, "bytes": nbytes, "weight_copies": copies, **t}
    row["tflops"] = flops / row["seconds"] / 1e12
    row["gbs"] = nbytes / row["seconds"] / 1e9
    return row


def bench_gemm_sweep(torch, dev: DeviceInfo, dtype: str, plan: dict,
                     say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Every M of plan["sweep_m"] over every (N, K) of plan["sweep_pairs"]."""
    rows = []
    for pair in plan["sweep_pairs"]:
        if time.perf_counter() > plan.get("deadline", math.inf):
            say("gemm sweep: time budget spent, remaining shapes skipped")
            break
        say(f"gemm sweep N={pair['n']} K={pair['k']} ({', '.join(pair['layers'])})")
        for m in plan["sweep_m"]:
            rows.append(bench_linear(torch, dev, m, pair["n"], pair["k"], dtype, plan, pair["layers"]))
    return rows


def bench_read_bandwidth(torch, dev: DeviceInfo, dtype: str, nbytes: int, plan: dict) -> dict:
    """torch.sum over a buffer into one fp32 scalar: a pure read, as a GEMV's weight stream is.
    Buffers smaller than the L2 rotation rotate over copies."""
    td = _torch_dtype(torch, dtype)
    numel = nbytes // DTYPE_SIZE[dtype]
    nbytes = numel * DTYPE_SIZE[dtype]
    copies = _copies(plan, nbytes)
    xs = [torch.empty(numel, device=dev.device, dtype=td).uniform_() for _ in range(copies)]
    out = torch.empty((), device=dev.device, dtype=torch.float32)
    calls = [lambda x=x: torch.sum(x, 0, dtype=torch.float32, out=out) for x in xs]
    t = time_calls(torch, dev, calls, plan, use_graph=True)
    return {"op": "sum (read only)", "dtype": dtype, "bytes": nbytes, "bytes_read": nbytes,
            "copies": copies, **t, "gbs": nbytes / t["seconds"] / 1e9}


def bench_copy_bandwidth(torch, dev: DeviceInfo, nbytes: int, plan: dict) -> dict:
    """dst.copy_(src): bytes counted as read + write."""
    copies = _copies(plan, 2 * nbytes)
    pairs = [(torch.empty(nbytes, device=dev.device, dtype=torch.uint8).fill_(1),
              torch.empty(nbytes, device=dev.device, dtype=torch.uint8)) for _ in range(copies)]
    calls = [lambda s=s, d=d: d.copy_(s) for s, d in pairs]
    # eager: a captured copy_ becomes a graph memcpy node, which ran at 2.7 TB/s on an H200
    # where the same copy launched eagerly ran at 4.1 TB/s; the graph timing is kept beside it
    t = time_calls(torch, dev, calls, plan, use_graph=False)
    row = {"op": "copy_", "bytes": nbytes, "bytes_moved": 2 * nbytes, "copies": copies, **t,
           "gbs": 2 * nbytes / t["seconds"] / 1e9}
    if dev.kind != "cpu":
        g = time_calls(torch, dev, calls, plan, use_graph=True)
        row["graph"] = {**g, "gbs": 2 * nbytes / g["seconds"] / 1e9}
    return row


def bench_kernel_chain(torch, dev: DeviceInfo, op: str, shape: tuple[int, int], dtype: str,
                       kernels: int, plan: dict) -> dict:
    """`kernels` dependent kernels, each reading what the one before wrote, on a small tensor.

    op "add": x.add_(1) on `shape`; op "mm": y = x @ W with x `shape` = (rows, k) and W (k, k),
    ping-ponging two buffers. Replayed from a graph the time per kernel is the device's real
    minimum cost of a small dependent kernel; launched eagerly it is the dispatch cost (the host
    cannot launch faster), and the host's own view (wall clock until done) is kept too."""
    td = _torch_dtype(torch, dtype)
    rows, cols = shape
    if op == "add":
        x = torch.zeros(rows, cols, device=dev.device, dtype=td)

        def chain() -> None:
            for _ in range(kernels):
                x.add_(1.0)
        desc, flops, nbytes = "x.add_(1)", float(rows * cols), 2.0 * rows * cols * DTYPE_SIZE[dtype]
    elif op == "rms_norm":
        state = {"x": torch.randn(rows, cols, device=dev.device, dtype=td)}
        w = torch.ones(cols, device=dev.device, dtype=td)
        F = torch.nn.functional

        def chain() -> None:
            x = state["x"]
            for _ in range(kernels):
                x = F.rms_norm(x, (cols,), w, 1e-6)  # each reads the one before (one kernel each)
        desc = "x = F.rms_norm(x)"
        flops = 4.0 * rows * cols
        nbytes = 2.0 * rows * cols * DTYPE_SIZE[dtype]
    elif op == "mm":
        a = torch.randn(rows, cols, device=dev.device, dtype=td) / cols
        b = torch.empty_like(a)
        w = torch.randn(cols, cols, device=dev.device, dtype=td) / math.sqrt(cols)

        def chain() -> None:
            for i in range(kernels):
                src, dst = (a, b) if i % 2 == 0 else (b, a)
                torch.mm(src, w, out=dst)
        desc = "y = x @ W (ping-pong)"
        flops = 2.0 * rows * cols * cols
        nbytes = float((2 * rows * cols + cols * cols) * DTYPE_SIZE[dtype])
    else:
        raise ValueError(f"unknown chain op {op!r}")
    row: dict[str, Any] = {"op": op, "desc": desc, "shape": [rows, cols], "dtype": dtype,
                           "kernels": kernels, "flops_per_kernel": flops, "bytes_per_kernel": nbytes}
    chain()
    sec, samples, _ = time_op(torch, dev, chain, 1, plan["repeats"], 0.0, max_inner=1)
    hosts = []
    for _ in range(plan["repeats"]):
        _synchronize(torch, dev)
        t0 = time.perf_counter()
        chain()
        _synchronize(torch, dev)
        hosts.append(time.perf_counter() - t0)
    host = statistics.median(hosts)
    row["eager"] = {"seconds": sec, "us_per_kernel": sec / kernels * 1e6, "samples": samples,
                    "host_seconds": host, "host_us_per_kernel": host / kernels * 1e6,
                    "host_samples": hosts}
    if dev.kind != "cpu" and _graph_api(torch, dev.kind) is not None:
        try:
            graph = _capture_graph(torch, dev, chain)
            gsec, gsamples, _ = time_op(torch, dev, graph.replay, 2, plan["repeats"], 0.0, max_inner=1)
            row["graph"] = {"seconds": gsec, "us_per_kernel": gsec / kernels * 1e6, "samples": gsamples}
            del graph
        except Exception as e:
            row["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


# -- attention -----------------------------------------------------------------------------------

def _sdpa_backends(torch):
    """(context manager factory, backend enum) for pinning SDPA to a backend, or (None, None)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None, None
    return sdpa_kernel, SDPBackend


def sdpa(torch, q, k, v, backend: str = "flash", **kw):
    """F.scaled_dot_product_attention pinned to `backend` ("flash", "efficient", "cudnn",
    "math"), or torch's own choice for "default"."""
    F = torch.nn.functional
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    ctx, enum = _sdpa_backends(torch)
    if backend == "default" or ctx is None:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    with ctx(getattr(enum, names[backend])):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def pick_sdpa_backend(torch, fn: Callable[[str], Any], prefer=("flash", "efficient", "default")) -> str:
    """The first SDPA backend in `prefer` under which `fn(backend)` runs."""
    last = None
    for b in prefer:
        try:
            fn(b)
            return b
        except (RuntimeError, ValueError, TypeError) as e:
            last = e
    raise RuntimeError(f"no SDPA backend ran: {last}")


def random_block_tables(torch, batch: int, blocks_per_seq: int, total_blocks: int, copies: int,
                        seed: int = 0) -> list:
    """`copies` block tables [batch, blocks_per_seq] (int32) drawn without replacement from one
    random permutation of the pool's blocks: fragmented, as a long-running paged cache is."""
    g = torch.Generator().manual_seed(seed)
    need = batch * blocks_per_seq * copies
    if need > total_blocks:
        raise ValueError(f"{need} blocks needed, pool has {total_blocks}")
    perm = torch.randperm(total_blocks, generator=g)[:need].to(torch.int32)
    return [t.view(batch, blocks_per_seq).clone() for t in perm.chunk(copies)]


def block_slots(torch, table, block_size: int):
    """Slot index [batch, blocks * block_size] (int64) of every token of each sequence."""
    offs = torch.arange(block_size, device=table.device, dtype=torch.int64)
    return (table.to(torch.int64)[:, :, None] * block_size + offs).reshape(table.shape[0], -1)


def paged_decode_gather(torch, q, k_pool, v_pool, slots, backend: str = "flash"):
    """Decode attention over a paged cache by gathering each sequence's blocks, then dense SDPA.
    q [B, Hq, 1, D]; pools [slots, Hkv, D] (vLLM's [blocks, block_size, Hkv, D] flattened);
    slots [B, S]."""
    k = k_pool[slots].transpose(1, 2)  # [B, Hkv, S, D]
    v = v_pool[slots].transpose(1, 2)
    return sdpa(torch, q, k, v, backend)


def mla_decode_gather(torch, q, pool, slots, latent: int):
    """MLA decode attention with the up-projections absorbed, in plain PyTorch (what
    hw_profiles/measurements/mla_moe_decoder.py runs): every head of q [B, H, latent + rope]
    scores the gathered latent and RoPE key of its sequence (pool [slots, latent + rope], slots
    [B, S]), softmax in fp32, and sums the latent: out [B, H, latent]."""
    kv = pool[slots]  # [B, S, latent + rope]
    scores = torch.bmm(q, kv.transpose(1, 2)) * (1.0 / math.sqrt(q.shape[-1]))
    p = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
    return torch.bmm(p, kv[..., :latent])


def bench_mla_decode_attention(torch, dev: DeviceInfo, dtype: str, plan: dict,
                               say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """One layer's MLA decode attention (impl "mla_gather_bmm", see mla_decode_gather) over
    batch x context for each head count of plan["mla_heads"], one latent of plan["mla_latent"]
    values and a RoPE key of plan["mla_rope"] per token (DeepSeek: 512 + 64), pages of
    plan["mla_block_size"] handed out at random. Rows as bench_decode_attention's: kv_heads 1,
    head_dim the cached values per token, kv_bytes the latent read once."""
    td = _torch_dtype(torch, dtype)
    size = DTYPE_SIZE[dtype]
    c, dr, bs = plan["mla_latent"], plan["mla_rope"], plan["mla_block_size"]
    width = c + dr
    rows: list[dict] = []
    cases = [(b, n) for b in plan["mla_batch"] for n in plan["mla_context"]
             if b * n * width * size <= plan["attn_max_gather_bytes"] and n % bs == 0]
    if not cases:
        return rows
    copies = {case: _copies(plan, case[0] * case[1] * width * size) for case in cases}
    total_blocks = max(b * (n // bs) * copies[(b, n)] for b, n in cases) + 1
    pool = torch.randn(total_blocks * bs, width, device=dev.device, dtype=td)
    for heads in plan["mla_heads"]:
        for batch, ctx_len in cases:
            n = copies[(batch, ctx_len)]
            say(f"MLA decode attention H={heads} latent={c}+{dr} B={batch} ctx={ctx_len} bs={bs}")
            row = {"impl": "mla_gather_bmm", "heads": heads, "kv_heads": 1, "head_dim": width, "batch": batch,
                   "context": ctx_len, "block_size": bs, "dtype": dtype, "kv_bytes": batch * ctx_len * width * size,
                   "copies": n, "pool_slots": total_blocks * bs, "backend": "torch.bmm"}
            try:
                qs = [torch.randn(batch, heads, width, device=dev.device, dtype=td) for _ in range(n)]
                tables = [t.to(dev.device) for t in
                          random_block_tables(torch, batch, ctx_len // bs, total_blocks, n, seed=batch + ctx_len)]
                slots = [block_slots(torch, t, bs) for t in tables]
                calls = [lambda i=i: mla_decode_gather(torch, qs[i], pool, slots[i], c) for i in range(n)]
                row.update(time_calls(torch, dev, calls, plan))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                if dev.kind != "cpu":
                    _synchronize(torch, dev)
            qs = tables = slots = None
            rows.append(row)
    for r in rows:
        if "seconds" in r:
            r["gbs"] = r["kv_bytes"] / r["seconds"] / 1e9
    return rows


def flex_paged_mask(torch, tables: list, block_size: int, num_slots: int):
    """A FlexAttention BlockMask (one per table) that reads each sequence's pages straight from
    the pool: every page a full block, so the compiled kernel skips the mask function; the mask
    function (owner of the page) keeps the eager fallback exact. The owner tensor is OR-ed over
    the tables (the rotation copies): exact for one table, and unused by the compiled kernel."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, nb = tables[0].shape
    device = tables[0].device
    total_blocks = num_slots // block_size
    owner = torch.zeros(batch, total_blocks, dtype=torch.bool, device=device)
    for t in tables:
        owner.scatter_(1, t.to(torch.int64), True)

    def mask_mod(b, h, q_idx, kv_idx):
        return owner[b, kv_idx // block_size]

    masks = []
    for t in tables:
        idx = torch.zeros(batch, 1, 1, total_blocks, dtype=torch.int32, device=device)
        idx[:, 0, 0, :nb] = t
        zero = torch.zeros(batch, 1, 1, dtype=torch.int32, device=device)
        full = torch.full((batch, 1, 1), nb, dtype=torch.int32, device=device)
        masks.append(BlockMask.from_kv_blocks(zero, idx, full, idx, BLOCK_SIZE=(128, block_size),
                                              mask_mod=mask_mod, seq_lengths=(1, num_slots),
                                              compute_q_blocks=False))
    return masks


_FLEX: dict[str, Any] = {}


def flex_attention_fn(torch, compiled: bool):
    """flex_attention, compiled once per process (its eager form is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _FLEX:
        # static shapes: with a symbolic batch, torch 2.11 leaves its decode kernel for the
        # general one, which refuses pages smaller than its KV tile (seen on an H200)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def paged_decode_flex(flex, q, k_pool, v_pool, mask):
    """Decode attention read straight from the paged pool by FlexAttention. pools [slots, Hkv, D]."""
    kp = k_pool.permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, slots, D], a view
    vp = v_pool.permute(1, 0, 2).unsqueeze(0)
    return flex(q, kp, vp, block_mask=mask, enable_gqa=q.shape[1] != kp.shape[1])


def bench_decode_attention(torch, dev: DeviceInfo, dtype: str, plan: dict,
                           say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """One layer's decode attention (one query token per sequence, every sequence `context` tokens)
    over batch x context x block size, for each head layout of plan["attn_heads"]:

    * "sdpa_dense": SDPA over a contiguous [B, Hkv, context, D] cache (block size None), the
      floor a paged kernel aims at;
    * "gather_sdpa": gather the pages into a dense copy, then SDPA (plain PyTorch paging);
    * "flex_paged": FlexAttention reading the pages in place (compiled with static shapes, except
      on the CPU; one compile per batch size, the pool being fixed per head layout and block size);
    * "gather_sdpa_compiled": the gather and SDPA through torch.compile (Inductor writes the
      gather; torch's default compile settings, so shapes turn dynamic after the first recompile).

    The KV bytes of one call (batch x context x Hkv x D x 2 x dtype) rotate over copies past the L2;
    the paged pool's blocks are handed out at random (a fragmented cache)."""
    td = _torch_dtype(torch, dtype)
    size = DTYPE_SIZE[dtype]
    rows: list[dict] = []
    compiled_flex = dev.kind != "cpu"
    flex_state = {"compile_s": 0.0, "errors": 0}
    compile_state = {"s": 0.0, "fn": None}  # gather_sdpa_compiled: one compiled function, its compile time
    t_start = time.perf_counter()

    def over_budget() -> bool:
        return time.perf_counter() - t_start > plan.get("attn_budget_s", 1e9)

    def cases(hkv: int, d: int):
        for batch in plan["attn_batch"]:
            for ctx_len in plan["attn_context"]:
                kv_bytes = 2.0 * batch * ctx_len * hkv * d * size
                if kv_bytes <= plan["attn_max_kv_bytes"]:
                    yield batch, ctx_len, kv_bytes, _copies(plan, kv_bytes)

    # SDPA's backend: the first of flash, efficient, default that runs, or the one asked for
    # (then named in the impl, e.g. gather_sdpa_default: torch's own choice, cuDNN on Hopper)
    chosen = plan.get("sdpa_backend")
    prefer = (chosen,) if chosen else ("flash", "efficient", "default")
    suffix = f"_{chosen}" if chosen and chosen != "flash" else ""
    for hq, hkv, d in plan["attn_heads"]:
        def base(batch, ctx_len, kv_bytes, copies):
            return {"heads": hq, "kv_heads": hkv, "head_dim": d, "batch": batch, "context": ctx_len,
                    "dtype": dtype, "kv_bytes": kv_bytes, "copies": copies}

        for batch, ctx_len, kv_bytes, copies in cases(hkv, d):  # the dense floor
            if over_budget():
                say("decode attention: time budget spent, rest skipped")
                return rows
            say(f"decode attention sdpa_dense Hq={hq} Hkv={hkv} D={d} B={batch} ctx={ctx_len}")
            row = {**base(batch, ctx_len, kv_bytes, copies), "impl": "sdpa_dense" + suffix, "block_size": None}
            try:
                qs = [torch.randn(batch, hq, 1, d, device=dev.device, dtype=td) for _ in range(copies)]
                ks = [torch.randn(batch, hkv, ctx_len, d, device=dev.device, dtype=td) for _ in range(copies)]
                vs = [torch.randn_like(k) for k in ks]
                backend = pick_sdpa_backend(torch, lambda b: sdpa(torch, qs[0], ks[0], vs[0], b), prefer)
                calls = [lambda i=i: sdpa(torch, qs[i], ks[i], vs[i], backend) for i in range(copies)]
                row.update(backend=backend, **time_calls(torch, dev, calls, plan))
                qs = ks = vs = None  # free the device memory before the next case
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        for bs in plan["attn_block_sizes"]:
            todo = [c for c in cases(hkv, d) if c[1] % bs == 0]
            if not todo:
                continue
            # one pool for every case of this layout and block size: FlexAttention's compiled
            # kernel then varies with the batch size only
            total_blocks = max(b * (c // bs) * n for b, c, _, n in todo) + 1
            num_slots = total_blocks * bs
            k_pool = torch.randn(num_slots, hkv, d, device=dev.device, dtype=td)
            v_pool = torch.randn_like(k_pool)
            for batch, ctx_len, kv_bytes, copies in todo:
                if over_budget():
                    say("decode attention: time budget spent, rest skipped")
                    return rows
                nb = ctx_len // bs
                say(f"decode attention paged Hq={hq} Hkv={hkv} D={d} B={batch} ctx={ctx_len} bs={bs}")
                qs = [torch.randn(batch, hq, 1, d, device=dev.device, dtype=td) for _ in range(copies)]
                tables = [t.to(dev.device) for t in
                          random_block_tables(torch, batch, nb, total_blocks, copies, seed=batch + ctx_len)]
                slots = [block_slots(torch, t, bs) for t in tables]
                for impl in plan["attn_impls"]:
                    if impl == "mla_gather_bmm":  # (its own bench: bench_mla_decode_attention)
                        continue
                    row = {**base(batch, ctx_len, kv_bytes, copies),
                           "impl": impl + (suffix if impl == "gather_sdpa" else ""), "block_size": bs,
                           "pool_slots": num_slots}
                    try:
                        if impl == "gather_sdpa":
                            if 2 * kv_bytes > plan["attn_max_gather_bytes"]:
                                continue
                            backend = pick_sdpa_backend(
                                torch, lambda b: paged_decode_gather(torch, qs[0], k_pool, v_pool, slots[0], b),
                                prefer)
                            row["backend"] = backend
                            calls = [lambda i=i: paged_decode_gather(torch, qs[i], k_pool, v_pool, slots[i], backend)
                                     for i in range(copies)]
                        elif impl == "gather_sdpa_compiled":
                            # the same gather + SDPA through torch.compile (Inductor), as a
                            # compiled decoder layer runs it: SDPA on torch's own backend choice,
                            # shapes static at first, then dynamic after the first recompile
                            if 2 * kv_bytes > plan["attn_max_gather_bytes"]:
                                continue
                            if compile_state["s"] > plan.get("flex_compile_budget_s", 1e9):
                                row["error"] = "skipped: compile budget spent"
                                rows.append(row)
                                continue
                            if compile_state["fn"] is None:
                                compile_state["fn"] = torch.compile(
                                    lambda q, kp, vp, s: paged_decode_gather(torch, q, kp, vp, s, "default"))
                            fn = compile_state["fn"]
                            t0 = time.perf_counter()
                            fn(qs[0], k_pool, v_pool, slots[0])
                            _synchronize(torch, dev)
                            row["first_call_s"] = time.perf_counter() - t0
                            compile_state["s"] += row["first_call_s"]
                            row["backend"] = "torch.compile (inductor), default SDPA backend"
                            calls = [lambda i=i: fn(qs[i], k_pool, v_pool, slots[i]) for i in range(copies)]
                        elif impl == "flex_paged":
                            if flex_state["errors"] >= plan.get("flex_max_errors", 6) or \
                                    flex_state["compile_s"] > plan.get("flex_compile_budget_s", 1e9):
                                row["error"] = "skipped: flex errors or compile budget spent"
                                rows.append(row)
                                continue
                            flex = flex_attention_fn(torch, compiled_flex)
                            masks = flex_paged_mask(torch, tables, bs, num_slots)
                            t0 = time.perf_counter()
                            paged_decode_flex(flex, qs[0], k_pool, v_pool, masks[0])
                            _synchronize(torch, dev)
                            row["first_call_s"] = time.perf_counter() - t0
                            flex_state["compile_s"] += row["first_call_s"]
                            row["backend"] = ("flex_attention (compiled, static shapes)" if compiled_flex
                                              else "flex_attention (eager)")
                            calls = [lambda i=i: paged_decode_flex(flex, qs[i], k_pool, v_pool, masks[i])
                                     for i in range(copies)]
                        else:
                            raise ValueError(f"unknown attention impl {impl!r}")
                        row.update(time_calls(torch, dev, calls, plan))
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                        if impl == "flex_paged":
                            flex_state["errors"] += 1
                        if dev.kind != "cpu":
                            _synchronize(torch, dev)
                    rows.append(row)
                qs = tables = slots = None
            k_pool = v_pool = None
    for r in rows:
        if "seconds" in r:
            r["gbs"] = r["kv_bytes"] / r["seconds"] / 1e9
    return rows


def attention_pairs(chunk: int, cached: int) -> float:
    """(query, key) pairs of causal attention of `chunk` new tokens over `cached` earlier ones."""
    return chunk * cached + chunk * (chunk + 1) / 2.0


def bench_prefill_attention(torch, dev: DeviceInfo, dtype: str, plan: dict,
                            say: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """One layer's causal prefill attention (batch 1), SDPA on a flash-class kernel where one runs
    (its flash backend, else cuDNN's, which SDPA itself picks on Hopper where flash cannot take the
    head dims, as MLA's q/k 192 and v 128: 4x the memory-efficient kernel there, see
    hw_profiles/measurements/mla_prefill_probe.py), else the efficient one:
    full prompts of plan["prefill_lengths"] (cached 0), and chunks of c new tokens over p cached
    ones (plan["prefill_chunks"]), the chunk's mask aligned to the bottom right (each new token
    sees all p cached tokens). flops = 4 * Hq * D * causal pairs."""
    td = _torch_dtype(torch, dtype)
    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:  # pragma: no cover - old torch
        causal_lower_right = None
    rows = []
    cases = [(n, 0) for n in plan["prefill_lengths"]] + [tuple(c) for c in plan["prefill_chunks"]]
    for layout in plan["prefill_heads"]:
        # (Hq, Hkv, D) or (Hq, Hkv, D, Dv): V narrower than Q and K, as MLA's up-projected prefill
        hq, hkv, d = layout[:3]
        dv = layout[3] if len(layout) > 3 else d
        for chunk, cached in cases:
            say(f"prefill attention Hq={hq} Hkv={hkv} D={d} Dv={dv} chunk={chunk} cached={cached}")
            total = chunk + cached
            kv_bytes = total * hkv * (d + dv) * DTYPE_SIZE[dtype]
            copies = _copies(plan, kv_bytes)
            qs = [torch.randn(1, hq, chunk, d, device=dev.device, dtype=td) for _ in range(copies)]
            ks = [torch.randn(1, hkv, total, d, device=dev.device, dtype=td) for _ in range(copies)]
            vs = [torch.randn(1, hkv, total, dv, device=dev.device, dtype=td) for _ in range(copies)]
            if cached == 0:
                kw: dict[str, Any] = {"is_causal": True}
                mask = "causal (top-left = bottom-right, square)"
            elif causal_lower_right is not None:
                kw = {"attn_mask": causal_lower_right(chunk, total)}
                mask = "causal_lower_right"
            else:
                continue
            pairs = attention_pairs(chunk, cached)
            row: dict[str, Any] = {"heads": hq, "kv_heads": hkv, "head_dim": d, "chunk": chunk,
                                   "cached": cached, "dtype": dtype, "mask": mask, "pairs": pairs,
                                   "flops": 2.0 * hq * (d + dv) * pairs, "kv_bytes": kv_bytes, "copies": copies}
            if dv != d:
                row["v_head_dim"] = dv
            try:
                backend = pick_sdpa_backend(torch, lambda b: sdpa(torch, qs[0], ks[0], vs[0], b, **kw),
                                            ("flash", "cudnn", "efficient", "default"))
                row["backend"] = backend
                calls = [lambda i=i: sdpa(torch, qs[i], ks[i], vs[i], backend, **kw) for i in range(copies)]
                row.update(time_calls(torch, dev, calls, plan))
                row["tflops"] = row["flops"] / row["seconds"] / 1e12
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            qs = ks = vs = None
    return rows


def device_details(torch, dev: DeviceInfo) -> dict:
    """What else identifies the run: driver, CUDA/CANN runtime, multiprocessors, L2, memory."""
    info: dict[str, Any] = {"torch": torch.__version__}
    version = getattr(torch, "version", None)
    for key in ("cuda", "hip", "cann"):
        v = getattr(version, key, None)
        if v:
            info[key] = v
    if dev.kind == "cpu":
        info["threads"] = torch.get_num_threads()
        return info
    try:
        props = _backend(torch, dev).get_device_properties(dev.device)
        for attr in ("multi_processor_count", "L2_cache_size", "total_memory", "major", "minor"):
            if hasattr(props, attr):
                info[attr] = getattr(props, attr)
    except Exception:
        pass
    if dev.kind == "cuda":
        import shutil
        import subprocess
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run([smi, "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                parts = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")]
                info.update(driver=parts[0], smi_name=parts[1], max_sm_clock=parts[2], power_limit=parts[3])
            except Exception:
                pass
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:
            pass
    return info


SECTIONS = ("basic", "gemm_sweep", "bandwidth", "kernel_chain", "decode_attention", "prefill_attention")
MIB = 2**20


def _sweep_plan(quick: bool, on_cpu: bool, l2_bytes: int | None) -> dict[str, Any]:
    """Sizes of the shape-aware sweeps (see _plan for the basic ones)."""
    rotate = max(2 * (l2_bytes or 50 * MIB), 128 * MIB)
    if on_cpu:  # tiny shapes: the CPU path exists to test the harness, not to calibrate a CPU
        tiny = {"n": 256, "k": 128, "layers": ["tiny:qkv"]}
        return dict(
            sweep_m=[1, 4, 32] if quick else [1, 16, 64, 256], graph_max_m=1024,
            sweep_pairs=[tiny] if quick else [tiny, {"n": 1024, "k": 1024, "layers": ["small:o"]}],
            read_sizes=[MIB, 4 * MIB], copy_sizes=[MIB, 4 * MIB],
            chains=[("add", (1, 64)), ("add", (8, 64)), ("mm", (1, 32))], chain_kernels=50,
            attn_groups=[{"heads": (4, 2, 16), "batch": [1, 2], "context": [32, 64],
                          "block_sizes": [16, 32]}],
            attn_impls=["gather_sdpa", "flex_paged", "mla_gather_bmm"], attn_max_kv_bytes=64 * MIB,
            attn_max_gather_bytes=64 * MIB, mla_heads=[4], mla_batch=[1, 2], mla_context=[32, 64],
            mla_latent=32, mla_rope=16, mla_block_size=16,
            prefill_heads=[(4, 2, 16), (4, 4, 24, 16)], prefill_lengths=[32, 64], prefill_chunks=[(16, 48)],
            rotate_bytes=0, max_copies=2, warmup=1, repeats=3, target_s=0.002, max_graph_calls=200)
    if quick:
        return dict(
            sweep_m=[1, 16, 256, 4096], graph_max_m=1024,
            sweep_pairs=[{"n": 6144, "k": 4096, "layers": ["llama-3.1-8b:qkv"]}],
            read_sizes=[32 * MIB, 1024 * MIB], copy_sizes=[1024 * MIB],
            chains=[("add", (1, 4096)), ("mm", (1, 512))], chain_kernels=200,
            attn_groups=[{"heads": (32, 8, 128), "batch": [1, 32], "context": [2048],
                          "block_sizes": [16, 128]}],
            attn_impls=["gather_sdpa", "flex_paged"], attn_max_kv_bytes=8 * GIB,
            attn_max_gather_bytes=8 * GIB, mla_heads=[16], mla_batch=[1, 32], mla_context=[2048],
            mla_latent=512, mla_rope=64, mla_block_size=16,
            prefill_heads=[(32, 8, 128)], prefill_lengths=[1024], prefill_chunks=[(512, 1536)],
            rotate_bytes=rotate, max_copies=64, warmup=1, repeats=3, target_s=0.002)
    big = [1, 4, 16, 32, 64, 128]
    ctxs = [512, 1024, 2048, 4096, 8192]
    return dict(
        sweep_m=list(SWEEP_M), graph_max_m=1024, sweep_pairs=zoo_gemm_pairs(),
        read_sizes=[8 * MIB, 32 * MIB, 128 * MIB, 512 * MIB, 2048 * MIB, 4096 * MIB],
        copy_sizes=[8 * MIB, 32 * MIB, 128 * MIB, 512 * MIB, 2048 * MIB],
        chains=[("add", (1, 1)), ("add", (1, 4096)), ("add", (128, 4096)), ("add", (1024, 4096)),
                ("mm", (1, 512)), ("mm", (16, 1024))], chain_kernels=1000,
        attn_groups=[
            {"heads": (32, 8, 128), "batch": big, "context": ctxs, "block_sizes": [16, 128]},
            {"heads": (32, 8, 64), "batch": [1, 16, 64], "context": [512, 2048, 8192], "block_sizes": [16, 128]},
            {"heads": (40, 40, 128), "batch": [1, 16, 64], "context": [512, 2048, 8192], "block_sizes": [16]},
            {"heads": (28, 4, 128), "batch": [1, 16, 64], "context": [512, 2048, 8192], "block_sizes": [16]},
        ],
        attn_impls=["gather_sdpa", "flex_paged", "mla_gather_bmm"], attn_max_kv_bytes=8 * GIB,
        attn_max_gather_bytes=8 * GIB, attn_budget_s=150.0, flex_compile_budget_s=100.0,
        # MLA (DeepSeek-V2-Lite's 16 heads, V3's 128 over 8 devices = 16, and V3's 128 whole)
        mla_heads=[16, 128], mla_batch=[1, 4, 16, 64, 128], mla_context=[512, 2048, 8192],
        mla_latent=512, mla_rope=64, mla_block_size=16,
        # the last: MLA prefill (DeepSeek-V2-Lite's 16 heads of 192 for q and k, 128 for v)
        prefill_heads=[(32, 8, 128), (32, 8, 64), (40, 40, 128), (28, 4, 128), (16, 16, 192, 128)],
        prefill_lengths=[256, 512, 1024, 2048, 4096, 8192],
        prefill_chunks=[(128, 3968), (256, 1792), (512, 1536), (512, 3584), (512, 7680),
                        (1024, 3072), (2048, 2048), (2048, 6144)],
        rotate_bytes=rotate, max_copies=64, warmup=2, repeats=7, target_s=0.002)


def run_calibration(device: str = "auto", quick: bool = False,
                    progress: Callable[[str], None] | None = None,
                    sections: list[str] | tuple[str, ...] | None = None,
                    budget_s: float | None = None, overrides: dict | None = None) -> dict:
    """Microbenchmarks on one device; a JSON-ready dict with device, date and raw samples.

    Sections (all by default): "basic" (the keys gemm, copy, elementwise, latency that `fit`
    reads), "gemm_sweep", "bandwidth" (read_bandwidth, copy_bandwidth), "kernel_chain",
    "decode_attention", "prefill_attention". With `budget_s`, sections not started by then are
    skipped (listed under "skipped_sections"), as are the GEMM sweep's remaining shapes."""
    torch = _import_torch()
    dev = detect_device(device)
    sections = tuple(sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise NpusimError(f"unknown calibration section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    on_cpu = dev.kind == "cpu"
    plan = _plan(quick, on_cpu)
    say = progress or (lambda _msg: None)
    torch.manual_seed(0)
    dtype = pick_dtype(torch, dev)
    details = device_details(torch, dev)
    sweep = _sweep_plan(quick, on_cpu, details.get("L2_cache_size"))
    sweep.update(overrides or {})  # e.g. other chains, another SDPA backend
    sweep_dtype = dtype
    gemm_dtype = sweep.get("gemm_dtype") or dtype  # the GEMM sweep may time another format (fp8)
    _raise_recompile_limits(torch)
    now = _dt.datetime.now(_dt.timezone.utc)
    t_all = time.perf_counter()
    out: dict[str, Any] = {
        "npusim_calibration": SCHEMA_VERSION,
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": asdict(dev),
        "device_details": details,
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "quick": quick,
        "dtype": dtype,
        "sections": list(sections),
        "plan": {k: v for k, v in sweep.items() if k != "sweep_pairs"},
        "section_seconds": {},
        "skipped_sections": [],
    }
    if budget_s is not None:
        sweep["deadline"] = t_all + budget_s

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        if budget_s is not None and time.perf_counter() - t_all > budget_s:
            out["skipped_sections"].append(name)
            say(f"{name}: skipped, time budget spent")
            return []
        t0 = time.perf_counter()
        result = fn()
        out["section_seconds"][name] = round(time.perf_counter() - t0, 2)
        say(f"{name}: {out['section_seconds'][name]:.1f} s")
        return result

    if "basic" in sections:
        def basic() -> None:
            # the large square GEMM first: a sustained sweep heats the device, and at its power limit
            # the clocks drop (seen on an H200: a 4096x4096x14336 GEMM went from 611 to 655 us in ten runs)
            shapes = [(plan["square"],) * 3]
            shapes += [(m, n, k) for n, k in plan["gemm_nk"] for m in plan["gemm_m"]]
            gemms = []
            for m, n, k in shapes:
                say(f"gemm {m}x{n}x{k} {dtype}")
                gemms.append(bench_gemm(torch, dev, m, n, k, dtype, plan))
            out["gemm"] = gemms
            say("copy")
            out["copy"] = bench_copy(torch, dev, plan)
            say("elementwise")
            out["elementwise"] = bench_elementwise(torch, dev, dtype, plan)
            say("kernel latency")
            out["latency"] = bench_latency(torch, dev, plan)
        timed("basic", basic)
    if "gemm_sweep" in sections:
        out["gemm_sweep"] = timed("gemm_sweep", lambda: bench_gemm_sweep(torch, dev, gemm_dtype, sweep, say))
    if "bandwidth" in sections:
        def bandwidth() -> None:
            reads, copies = [], []
            for nbytes in sweep["read_sizes"]:
                say(f"read bandwidth {nbytes / MIB:g} MiB")
                reads.append(bench_read_bandwidth(torch, dev, sweep_dtype, nbytes, sweep))
            for nbytes in sweep["copy_sizes"]:
                say(f"copy bandwidth {nbytes / MIB:g} MiB")
                copies.append(bench_copy_bandwidth(torch, dev, nbytes, sweep))
            out["read_bandwidth"], out["copy_bandwidth"] = reads, copies
        timed("bandwidth", bandwidth)
    if "kernel_chain" in sections:
        def chains() -> list[dict]:
            rows = []
            for op, shape in sweep["chains"]:
                say(f"kernel chain {op} {shape[0]}x{shape[1]}")
                rows.append(bench_kernel_chain(torch, dev, op, shape, sweep_dtype, sweep["chain_kernels"], sweep))
            return rows
        out["kernel_chain"] = timed("kernel_chain", chains)
    if "decode_attention" in sections:
        def decode() -> list[dict]:
            rows: list[dict] = []
            t0 = time.perf_counter()
            for g in sweep["attn_groups"]:
                # the time and compile budgets hold for the whole section, not per group
                compiled = sum(r.get("first_call_s", 0.0) for r in rows)
                p = {**sweep, "attn_heads": [g["heads"]], "attn_batch": g["batch"],
                     "attn_context": g["context"], "attn_block_sizes": g["block_sizes"],
                     "attn_budget_s": sweep.get("attn_budget_s", 1e9) - (time.perf_counter() - t0),
                     "flex_compile_budget_s": sweep.get("flex_compile_budget_s", 1e9) - compiled}
                rows += bench_decode_attention(torch, dev, sweep_dtype, p, say)
            if "mla_gather_bmm" in sweep["attn_impls"]:
                rows += bench_mla_decode_attention(torch, dev, sweep_dtype, sweep, say)
            return rows
        out["decode_attention"] = timed("decode_attention", decode)
    if "prefill_attention" in sections:
        out["prefill_attention"] = timed("prefill_attention",
                                         lambda: bench_prefill_attention(torch, dev, sweep_dtype, sweep, say))
    out["total_seconds"] = round(time.perf_counter() - t_all, 2)
    return out


def _raise_recompile_limits(torch) -> None:
    """FlexAttention recompiles per shape until dynamic shapes kick in; past dynamo's default limit
    (8) it would silently fall back to its slow eager form."""
    cfg = getattr(getattr(torch, "_dynamo", None), "config", None)
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if cfg is not None and hasattr(cfg, name):
            try:
                setattr(cfg, name, max(getattr(cfg, name), 256))
            except Exception:
                pass


def _fmt_us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:.1f}"


def format_measurements(meas: dict) -> str:
    """A short plain-text summary (no rich/typer: this runs where only torch is installed)."""
    d = meas["device"]
    lines = [f"{d['name']} ({d['device']}, torch {d['torch_version']}), {meas['date']}"
             + (" [quick]" if meas.get("quick") else "")]
    det = meas.get("device_details") or {}
    if det.get("driver"):
        lines.append(f"driver {det['driver']}, CUDA {det.get('cuda', '?')}, "
                     f"{det.get('multi_processor_count', '?')} SMs, L2 {det.get('L2_cache_size', 0) / MIB:g} MiB")
    if "gemm" in meas:
        lines.append(f"{'GEMM m x n x k':<24}{'dtype':<7}{'us':>12}{'TFLOP/s':>10}")
        for g in meas["gemm"]:
            shape = f"{g['m']} x {g['n']} x {g['k']}"
            lines.append(f"{shape:<24}{g['dtype']:<7}{g['seconds'] * 1e6:>12.1f}{g['tflops']:>10.2f}")
    if "copy" in meas:
        c, e, lat = meas["copy"], meas["elementwise"], meas["latency"]
        lines.append(f"copy {c['bytes'] / 2**20:.0f} MiB: {c['gbs']:.1f} GB/s (read + write)")
        lines.append(f"elementwise {e['op']}, {e['elements']} x {e['dtype']}: {e['gbs']:.1f} GB/s, "
                     f"{e['gflops']:.1f} GFLOP/s")
        text = f"kernel latency: {lat['us_per_op']:.2f} us/op (host view {lat['host_us_per_op']:.2f} us/op)"
        if "graph_us_per_op" in lat:
            text += f", graph replay {lat['graph_us_per_op']:.2f} us/op"
        lines.append(text)
    sweep = meas.get("gemm_sweep") or []
    if sweep:
        ms = sorted({g["m"] for g in sweep})
        lines.append("GEMM sweep, TFLOP/s by M (x @ W^T; " + ", ".join(sorted({g["timing"] for g in sweep})) + ")")
        lines.append(f"{'N x K':<16}" + "".join(f"{m:>7}" for m in ms))
        by = {(g["n"], g["k"], g["m"]): g for g in sweep}
        for n, k in dict.fromkeys((g["n"], g["k"]) for g in sweep):
            cells = "".join(f"{by[(n, k, m)]['tflops']:>7.1f}" if (n, k, m) in by else f"{'-':>7}" for m in ms)
            lines.append(f"{f'{n} x {k}':<16}" + cells)
    for key, label in (("read_bandwidth", "read (sum)"), ("copy_bandwidth", "copy (r+w)")):
        rows = meas.get(key) or []
        if rows:
            lines.append(f"{label} GB/s: " + ", ".join(f"{r['bytes'] / MIB:g} MiB {r['gbs']:.0f}" for r in rows))
    for r in meas.get("kernel_chain") or []:
        text = (f"chain {r['kernels']} x {r['desc']} {r['shape'][0]}x{r['shape'][1]}: eager "
                f"{r['eager']['us_per_kernel']:.2f} us/kernel (host {r['eager']['host_us_per_kernel']:.2f})")
        if "graph" in r:
            text += f", graph {r['graph']['us_per_kernel']:.2f} us/kernel"
        lines.append(text)
    att = [r for r in meas.get("decode_attention") or [] if "seconds" in r]
    if att:
        lines.append(f"{'decode attention':<20}{'B':>5}{'ctx':>6}{'bs':>5}  {'impl':<12}{'us':>10}{'GB/s':>8}")
        for r in att:
            heads = f"{r['heads']}/{r['kv_heads']}x{r['head_dim']}"
            lines.append(f"{heads:<20}{r['batch']:>5}{r['context']:>6}{str(r['block_size'] or '-'):>5}  "
                         f"{r['impl']:<12}{_fmt_us(r['seconds']):>10}{r['gbs']:>8.0f}")
    errs = [r for r in meas.get("decode_attention") or [] if "error" in r]
    if errs:
        lines.append(f"decode attention: {len(errs)} case(s) failed, first: {errs[0]['impl']}: {errs[0]['error']}")
    pre = [r for r in meas.get("prefill_attention") or [] if "seconds" in r]
    if pre:
        lines.append(f"{'prefill attention':<20}{'chunk':>6}{'cached':>7}  {'backend':<10}{'us':>10}{'TFLOP/s':>9}")
        for r in pre:
            heads = f"{r['heads']}/{r['kv_heads']}x{r['head_dim']}"
            lines.append(f"{heads:<20}{r['chunk']:>6}{r['cached']:>7}  {r['backend']:<10}"
                         f"{_fmt_us(r['seconds']):>10}{r['tflops']:>9.1f}")
    if meas.get("section_seconds"):
        lines.append("seconds per section: " + ", ".join(f"{k} {v:g}" for k, v in meas["section_seconds"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- fit

def profile_mapping(hw) -> dict[str, Any]:
    """A HardwareSpec back in the YAML layout: each number as {value, kind, source}."""
    from npusim.specs import NUMBER_FIELDS

    data: dict[str, Any] = {}
    for field in type(hw).model_fields:
        if field in ("provenance", "transfer_from"):  # (transfer_from: filled in on loading)
            continue
        value = getattr(hw, field)
        if field == "calibration_transfer":
            if value is not None:
                data[field] = value.model_dump(by_alias=True)
            continue
        if field == "calibration_files" and hw.calibration_transfer is not None:
            continue  # (the other device's, named by calibration_transfer)
        if field in NUMBER_FIELDS:
            if field not in hw.provenance:  # an optional number the profile leaves out
                continue
            prov = hw.provenance[field]
            data[field] = {"value": value, "kind": prov.kind, "source": prov.source}
        elif field == "kv_block_sizes":
            data[field] = value.model_dump(exclude_none=True)
        else:
            data[field] = value
    return data


def _need(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise NpusimError(f"{where}: missing {key!r}")
    return d[key]


def _positive(x: Any, where: str) -> float:
    if not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise NpusimError(f"{where} must be a positive number, got {x!r}")
    return float(x)


def _best_gemm(meas: dict) -> dict:
    """The GEMM with the highest TFLOP/s: the large compute-bound shapes win, and they are what
    matmul_efficiency stands for (small-M GEMMs are memory-bound and priced by bandwidth)."""
    gemms = _need(meas, "gemm", "measurements")
    if not isinstance(gemms, list) or not gemms:
        raise NpusimError("measurements: 'gemm' must be a non-empty list")
    for i, g in enumerate(gemms):
        for key in ("m", "n", "k", "dtype"):
            _need(g, key, f"measurements: gemm[{i}]")
        _positive(_need(g, "tflops", f"measurements: gemm[{i}]"), f"measurements: gemm[{i}].tflops")
    return max(gemms, key=lambda g: g["tflops"])


def _fits(hw, meas: dict) -> tuple[dict[str, tuple[float, str]], list[str]]:
    """(field -> (value, source)) for every number the measurements determine, and notes on what
    was not fitted. Refuses efficiencies above 1: a measurement beyond the profile's peak means
    the profile's peak is wrong for this device, and clamping would hide that."""
    dev = _need(meas, "device", "measurements")
    date = _need(meas, "date", "measurements")
    where = f"npusim calibrate on {_need(dev, 'name', 'measurements: device')} ({dev.get('kind', '?')}), {date}"
    fitted: dict[str, tuple[float, str]] = {}
    notes: list[str] = []
    problems: list[str] = []

    g = _best_gemm(meas)
    if g["dtype"] not in ("bf16", "fp16"):
        raise NpusimError(f"measurements: GEMMs ran in {g['dtype']} but {hw.name}'s matmul peaks are "
                          f"bf16/fp16; calibrate on the device the profile describes")
    peak = hw.matmul_tflops(g["dtype"])
    eff = g["tflops"] / peak
    shape = f"{g['m']}x{g['n']}x{g['k']} {g['dtype']} GEMM"
    if eff > 1:
        problems.append(f"{shape} measured {g['tflops']:.1f} TFLOP/s, above {hw.name}'s peak of "
                        f"{peak:g} (matmul efficiency {eff:.2f} > 1)")
    fitted["matmul_efficiency"] = (eff, f"{where}: {shape} {g['tflops']:.1f} TFLOP/s of {peak:g} peak")

    c = _need(meas, "copy", "measurements")
    gbs = _positive(_need(c, "gbs", "measurements: copy"), "measurements: copy.gbs")
    ceiling = hw.streaming_gbs  # (HBM, or what the cores can pull where that is less)
    eff = gbs / ceiling
    size = f"{c.get('bytes', 0) / GIB:g} GiB device copy"
    if eff > 1:
        problems.append(f"{size} measured {gbs:.0f} GB/s, above {hw.name}'s bandwidth of "
                        f"{ceiling:g} GB/s (memory efficiency {eff:.2f} > 1)")
    fitted["memory_efficiency"] = (eff, f"{where}: {size} {gbs:.0f} GB/s (read + write) of "
                                        f"{ceiling:g} peak")

    lat = _need(meas, "latency", "measurements")
    eager = _positive(_need(lat, "us_per_op", "measurements: latency"), "measurements: latency.us_per_op")
    n = lat.get("launches", "many")
    if "graph_us_per_op" in lat:
        us = _positive(lat["graph_us_per_op"], "measurements: latency.graph_us_per_op")
        fitted["kernel_latency_us"] = (us, f"{where}: {n} tiny kernels replayed from a graph, "
                                           f"{us:.2f} us each (eager launches {eager:.2f} us each)")
    else:
        fitted["kernel_latency_us"] = (eager, f"{where}: {n} tiny kernels launched eagerly, {eager:.2f} us "
                                              f"each; launch-bound, so an upper bound of the device-side cost")

    e = meas.get("elementwise")
    if e:
        flops = _positive(_need(e, "flops", "measurements: elementwise"), "measurements: elementwise.flops")
        nbytes = _positive(_need(e, "bytes", "measurements: elementwise"), "measurements: elementwise.bytes")
        gflops = _positive(_need(e, "gflops", "measurements: elementwise"), "measurements: elementwise.gflops")
        intensity = flops / nbytes
        ridge = hw.vector_tflops * 1e3 / hw.memory_bandwidth_gbs
        if intensity >= ridge:  # compute-bound: the op measures the vector units
            eff = gflops / 1e3 / hw.vector_tflops
            if eff > 1:
                problems.append(f"elementwise {e.get('op', 'op')} measured {gflops:.0f} GFLOP/s, above "
                                f"{hw.name}'s vector peak of {hw.vector_tflops:g} TFLOP/s "
                                f"(vector efficiency {eff:.2f} > 1)")
            fitted["vector_efficiency"] = (eff, f"{where}: elementwise {e.get('op', 'op')} "
                                                f"{gflops:.0f} GFLOP/s of {hw.vector_tflops:g} TFLOP/s peak")
        else:
            share = e.get("gbs", 0) / hw.memory_bandwidth_gbs
            notes.append(f"vector_efficiency not fitted: elementwise {e.get('op', 'op')} has "
                         f"{intensity:.2f} flop/B, below {hw.name}'s vector ridge of {ridge:.1f} flop/B, "
                         f"so it measured memory ({e.get('gbs', 0):.0f} GB/s = {share:.2f} of peak "
                         f"bandwidth), not the vector units")
    if problems:
        raise NpusimError(f"{hw.name} is wrong for this device: " + "; ".join(problems)
                          + "; fix the profile's peaks or calibrate against the profile of the device measured")
    return fitted, notes


def fit_profile(hw, measurements: dict, name: str | None = None) -> dict:
    """A new profile mapping (the hw_profiles YAML layout): `hw` with matmul/memory/(vector)
    efficiencies and kernel latency fitted to `measurements`, each marked kind calibrated."""
    from npusim.specs import hardware_from_mapping

    fitted, _ = _fits(hw, measurements)
    data = profile_mapping(hw)
    data["name"] = name or f"{hw.name}-calibrated"
    dev = measurements["device"]
    data["description"] = (f"{hw.description}; calibrated by npusim on {dev['name']}, "
                           f"{measurements['date']}").lstrip("; ")
    for field, (value, source) in fitted.items():
        digits = 2 if field == "kernel_latency_us" else 4
        data[field] = {"value": round(value, digits), "kind": "calibrated", "source": source}
    hardware_from_mapping(data, "fitted profile")  # the fit must load, or it is a bug here
    return data


def fit_notes(hw, measurements: dict) -> list[str]:
    """What the measurements could not fit, and why."""
    return _fits(hw, measurements)[1]


def write_profile(mapping: dict, path: str | Path) -> Path:
    """Write a profile mapping as YAML that `load_hardware(path)` loads, one line per number."""
    import yaml

    path = Path(path)
    header = (f"# {mapping.get('name', 'profile')}: written by npusim calibrate.\n"
              "# Every number: value, kind (datasheet | derived | third-party | calibrated | assumed), source.\n\n")
    # default_flow_style=None puts each {value, kind, source} on one line, as in hw_profiles/
    body = yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None, width=10**9,
                          allow_unicode=True)
    try:
        path.write_text(header + body)
    except OSError as e:
        raise NpusimError(f"{path}: cannot write ({e.strerror})") from None
    return path


def load_measurements(path: str | Path) -> dict:
    """A measurements JSON written by `run_calibration` (or `npusim calibrate run --out`)."""
    path = Path(path)
    try:  # (this module needs only the standard library: it runs on bare device machines)
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise NpusimError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise NpusimError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise NpusimError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict) or "npusim_calibration" not in data:
        raise NpusimError(f"{path}: not an npusim calibration file (no 'npusim_calibration' key)")
    version = data["npusim_calibration"]
    if isinstance(version, bool) or version not in range(1, SCHEMA_VERSION + 1):
        raise NpusimError(f"{path}: npusim_calibration {version!r} is not a version this npusim reads "
                          f"(1 to {SCHEMA_VERSION})")
    if data.get("dtype", "bf16") not in ("bf16", "fp16"):
        raise NpusimError(f"{path}: dtype {data['dtype']!r}: the tables are read for bf16/fp16 weights only")
    return data


def save_measurements(meas: dict, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meas, indent=1) + "\n")
    except OSError as e:
        raise NpusimError(f"{path}: cannot write ({e.strerror})") from None
    return path


# --------------------------------------------------------------------------- torch-only entry point

def main(argv: list[str] | None = None) -> int:
    """`python -m npusim.calibrate`: the harness alone, for machines with torch and nothing else."""
    p = argparse.ArgumentParser(prog="python -m npusim.calibrate",
                                description="Time GEMMs, bandwidth, kernel chains and attention on this device.")
    p.add_argument("--device", default="auto", help="auto | npu | cuda | cpu | another torch accelerator")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds on a CPU)")
    p.add_argument("--out", help="write the measurements JSON here")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the sections not started after this many seconds")
    p.add_argument("--sdpa-backend", default=None,
                   help="decode attention: time SDPA under this backend (flash | efficient | cudnn | "
                        "default, torch's own choice) instead of the first of flash, efficient, default "
                        "that runs; rows record impl NAME_BACKEND")
    p.add_argument("--chains", default=None,
                   help="kernel chains to time instead of the default ones: OP:ROWSxCOLS,... with OP "
                        "add, mm or rms_norm")
    p.add_argument("--gemm-dtype", default=None, choices=["bf16", "fp16", "fp8", "int8"],
                   help="the gemm_sweep's format (default: the device's 16-bit type); fp8 times W8A8 "
                        "GEMMs through torch._scaled_mm, rows of dtype fp8 that FP8 weights are priced by; "
                        "int8 times int8 x int8 GEMMs (torch._int_mm), rows that w8a8 weights are priced by")
    p.add_argument("--attn-impls", default=None,
                   help="decode attention impls: gather_sdpa, flex_paged, gather_sdpa_compiled")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"  [{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    try:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        overrides: dict[str, Any] = {}
        if args.sdpa_backend:
            overrides["sdpa_backend"] = args.sdpa_backend
        if args.chains:
            chains = []
            for item in args.chains.split(","):
                op, _, shape = item.partition(":")
                r, _, c = shape.partition("x")
                chains.append((op.strip(), (int(r), int(c))))
            overrides["chains"] = chains
        if args.gemm_dtype:
            overrides["gemm_dtype"] = args.gemm_dtype
        if args.attn_impls:
            overrides["attn_impls"] = [i.strip() for i in args.attn_impls.split(",") if i.strip()]
        meas = run_calibration(args.device, args.quick, progress=progress, sections=sections,
                               budget_s=args.budget_s, overrides=overrides)
        print(format_measurements(meas))
        if args.out:
            print(f"measurements: {save_measurements(meas, args.out)}")
    except NpusimError as e:
        print(f"npusim: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
