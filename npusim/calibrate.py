"""Calibrate a hardware profile against the machine in front of you.

Two halves:

* the harness (``detect_device``, ``run_calibration``) times a GEMM sweep, a device copy, an
  elementwise op and back-to-back tiny kernels with PyTorch on an Ascend NPU (torch_npu), a GPU or
  the CPU. It needs only torch and the standard library, so that ``python -m npusim.calibrate``
  runs on a machine that has torch but none of npusim's other dependencies;
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
SCHEMA_VERSION = 1
GIB = 2**30
DTYPE_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


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


def run_calibration(device: str = "auto", quick: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Every microbenchmark on one device; a JSON-ready dict with device, date and raw samples."""
    torch = _import_torch()
    dev = detect_device(device)
    plan = _plan(quick, dev.kind == "cpu")
    say = progress or (lambda _msg: None)
    torch.manual_seed(0)
    dtype = pick_dtype(torch, dev)
    now = _dt.datetime.now(_dt.timezone.utc)
    # the large square GEMM first: a sustained sweep heats the device, and at its power limit
    # the clocks drop (seen on an H200: a 4096x4096x14336 GEMM went from 611 to 655 us in ten runs)
    shapes = [(plan["square"],) * 3]
    shapes += [(m, n, k) for n, k in plan["gemm_nk"] for m in plan["gemm_m"]]
    gemms = []
    for m, n, k in shapes:
        say(f"gemm {m}x{n}x{k} {dtype}")
        gemms.append(bench_gemm(torch, dev, m, n, k, dtype, plan))
    say("copy")
    copy = bench_copy(torch, dev, plan)
    say("elementwise")
    elementwise = bench_elementwise(torch, dev, dtype, plan)
    say("kernel latency")
    latency = bench_latency(torch, dev, plan)
    return {
        "npusim_calibration": SCHEMA_VERSION,
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": asdict(dev),
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "quick": quick,
        "gemm": gemms,
        "copy": copy,
        "elementwise": elementwise,
        "latency": latency,
    }


def format_measurements(meas: dict) -> str:
    """A short plain-text summary (no rich/typer: this runs where only torch is installed)."""
    d = meas["device"]
    lines = [f"{d['name']} ({d['device']}, torch {d['torch_version']}), {meas['date']}"
             + (" [quick]" if meas.get("quick") else "")]
    lines.append(f"{'GEMM m x n x k':<24}{'dtype':<7}{'us':>12}{'TFLOP/s':>10}")
    for g in meas["gemm"]:
        shape = f"{g['m']} x {g['n']} x {g['k']}"
        lines.append(f"{shape:<24}{g['dtype']:<7}{g['seconds'] * 1e6:>12.1f}{g['tflops']:>10.2f}")
    c, e, lat = meas["copy"], meas["elementwise"], meas["latency"]
    lines.append(f"copy {c['bytes'] / 2**20:.0f} MiB: {c['gbs']:.1f} GB/s (read + write)")
    lines.append(f"elementwise {e['op']}, {e['elements']} x {e['dtype']}: {e['gbs']:.1f} GB/s, "
                 f"{e['gflops']:.1f} GFLOP/s")
    text = f"kernel latency: {lat['us_per_op']:.2f} us/op (host view {lat['host_us_per_op']:.2f} us/op)"
    if "graph_us_per_op" in lat:
        text += f", graph replay {lat['graph_us_per_op']:.2f} us/op"
    lines.append(text)
    return "\n".join(lines)


# --------------------------------------------------------------------------- fit

def profile_mapping(hw) -> dict[str, Any]:
    """A HardwareSpec back in the YAML layout: each number as {value, kind, source}."""
    from npusim.specs import NUMBER_FIELDS

    data: dict[str, Any] = {}
    for field in type(hw).model_fields:
        if field == "provenance":
            continue
        value = getattr(hw, field)
        if field in NUMBER_FIELDS:
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
    eff = gbs / hw.memory_bandwidth_gbs
    size = f"{c.get('bytes', 0) / GIB:g} GiB device copy"
    if eff > 1:
        problems.append(f"{size} measured {gbs:.0f} GB/s, above {hw.name}'s bandwidth of "
                        f"{hw.memory_bandwidth_gbs:g} GB/s (memory efficiency {eff:.2f} > 1)")
    fitted["memory_efficiency"] = (eff, f"{where}: {size} {gbs:.0f} GB/s (read + write) of "
                                        f"{hw.memory_bandwidth_gbs:g} peak")

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
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise NpusimError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise NpusimError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict) or "npusim_calibration" not in data:
        raise NpusimError(f"{path}: not an npusim calibration file (no 'npusim_calibration' key)")
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
                                description="Time GEMMs, copies, elementwise ops and kernel launches.")
    p.add_argument("--device", default="auto", help="auto | npu | cuda | cpu | another torch accelerator")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds on a CPU)")
    p.add_argument("--out", help="write the measurements JSON here")
    args = p.parse_args(argv)
    try:
        meas = run_calibration(args.device, args.quick,
                               progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        print(format_measurements(meas))
        if args.out:
            print(f"measurements: {save_measurements(meas, args.out)}")
    except NpusimError as e:
        print(f"npusim: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
