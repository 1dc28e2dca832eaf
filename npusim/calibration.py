"""Shape-aware device costs from a calibration file (`npusim calibrate run` on the device).

A hardware profile may name the measurements that calibrated it (`calibration_files`); the cost
model then prices GEMMs, decode attention and prefill attention from those measured times instead
of the datasheet roofline, interpolating between measured shapes:

* a GEMM by its M (tokens) on the measured (N, K) nearest in log space, its time carried to the
  queried (N, K) in proportion to their rooflines: the measured efficiency at that M, with the
  small-M weight-streaming ramp and the large-M compute plateau both in it;
* decode attention by batch and context (log-log, bilinear) for the kernel the engine uses, on the
  nearest measured head layout, in proportion to the KV bytes read;
* prefill attention by the rate flash attention reached at that many query-key pairs.

Nothing here is fitted to a result npusim is asked to predict: the tables are microbenchmarks of
single kernels, and every time comes back from one of them.
"""

from __future__ import annotations

import bisect
import math
from functools import lru_cache
from pathlib import Path

from scipy.optimize import isotonic_regression

from npusim.errors import NpusimError
from npusim.specs import DTYPE_BYTES, read_json_file


def _interp_loglog(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear interpolation of log y over log x; below the smallest x, the smallest
    measured y (a kernel does not get cheaper than its least time); beyond the largest, y scales
    as x (the cost of more of the same work)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect.bisect_right(xs, x) - 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))


class GemmTable:
    """Measured GEMM times over M for each measured (N, K)."""

    def __init__(self, rows: list[dict]):
        by_nk: dict[tuple[int, int], dict[int, float]] = {}
        for r in rows:
            by_nk.setdefault((r["n"], r["k"]), {})[r["m"]] = r["seconds"]
        self.curves = {nk: (sorted(c), [c[m] for m in sorted(c)]) for nk, c in by_nk.items()}

    def nearest(self, n: int, k: int) -> tuple[int, int]:
        if (n, k) in self.curves:
            return n, k
        return min(self.curves, key=lambda nk: (math.log(nk[0] / n)) ** 2 + (math.log(nk[1] / k)) ** 2)

    def time(self, m: int, n: int, k: int, roofline) -> float:
        """Seconds of an (m x k) @ (k x n) GEMM; `roofline(m, n, k)` carries a measured shape's
        time to an unmeasured one."""
        nk = self.nearest(n, k)
        ms, ts = self.curves[nk]
        if m < ms[0] or m > ms[-1]:
            # beyond the measured Ms: the nearest measured time, carried by the roofline (flat
            # while the weight read dominates, growing with M once the flops do)
            edge, t_edge = (ms[0], ts[0]) if m < ms[0] else (ms[-1], ts[-1])
            t = t_edge * roofline(m, *nk) / roofline(edge, *nk)
        else:
            t = _interp_loglog(ms, ts, m)
        if nk != (n, k):
            t *= roofline(m, n, k) / roofline(m, *nk)
        return t


class DecodeAttentionTable:
    """Measured decode attention (one query per sequence) by kernel, head layout and page size."""

    def __init__(self, rows: list[dict]):
        groups: dict[tuple, dict[tuple[int, int], float]] = {}
        for r in rows:
            key = (r["impl"], r["heads"], r["kv_heads"], r["head_dim"], r.get("block_size"))
            groups.setdefault(key, {})[(r["batch"], r["context"])] = r["seconds"]
        self.groups = groups

    def impls(self) -> set[str]:
        return {g[0] for g in self.groups}

    def time(self, impl: str, heads: int, kv_heads: int, head_dim: int, block_size: int | None,
             batch: int, context: float) -> float | None:
        keys = [g for g in self.groups if g[0] == impl]
        if not keys:
            return None
        # the same layout if measured, else the nearest, carried by the KV bytes (kv heads x dim)
        def distance(g):  # the head layout first, then the page size (both squared log ratios)
            page = 0.0 if g[4] is None or block_size is None else math.log(g[4] / block_size) ** 2
            return (math.log(g[2] * g[3] / (kv_heads * head_dim)) ** 2 + math.log(g[1] / heads) ** 2,
                    page)
        key = min(keys, key=distance)
        grid = self.groups[key]
        bs = sorted({b for b, _ in grid})
        cs = sorted({c for _, c in grid})
        t = _bilinear_loglog(bs, cs, grid, batch, context)
        return t * (kv_heads * head_dim) / (key[2] * key[3])


def _bilinear_loglog(xs: list[int], ys: list[int], grid: dict, x: float, y: float) -> float:
    """log t interpolated in log y along each measured x, then in log x across them; beyond the
    measured range t scales with x and y. Grid points that were not measured are skipped."""
    along = []
    for xv in xs:
        pts = sorted((yv, grid[(xv, yv)]) for yv in ys if (xv, yv) in grid)
        if pts:
            along.append((xv, _interp_loglog([p[0] for p in pts], [p[1] for p in pts], y)))
    return _interp_loglog([a[0] for a in along], [a[1] for a in along], x)


class PrefillAttentionTable:
    """The rate causal flash attention reached, by head layout, over the query-key pairs it did."""

    def __init__(self, rows: list[dict]):
        groups: dict[tuple[int, int, int], dict[float, float]] = {}
        for r in rows:
            groups.setdefault((r["heads"], r["kv_heads"], r["head_dim"]), {})[r["flops"]] = r["flops"] / r["seconds"]
        self.curves = {g: (sorted(c), [c[f] for f in sorted(c)]) for g, c in groups.items()}

    def time(self, heads: int, kv_heads: int, head_dim: int, flops: float) -> float:
        key = min(self.curves, key=lambda g: (math.log(g[2] / head_dim)) ** 2 + (math.log(g[0] / heads)) ** 2
                  + (math.log(g[1] / kv_heads)) ** 2)
        fs, rates = self.curves[key]
        if flops <= fs[0]:
            return fs[0] / rates[0]  # below the smallest measured: the kernel's least time
        if flops >= fs[-1]:
            rate = rates[-1]  # past the largest: its plateau
        else:
            rate = _interp_loglog(fs, rates, flops)
        return flops / rate


class GroupedGemmTable:
    """Measured grouped expert GEMMs (one kernel over every expert that got tokens) by expert
    layout (experts, top-k, hidden, expert size) and op, over the number of tokens routed."""

    def __init__(self, rows: list[dict]):
        by_shape: dict[tuple, dict[int, float]] = {}
        for r in rows:
            for op, key in (("gate_up_proj", "gate_up_seconds"), ("down_proj", "down_seconds")):
                if key in r:
                    shape = (r["experts"], r["top_k"], r["hidden"], r["expert_size"], op)
                    by_shape.setdefault(shape, {})[r["tokens"]] = r[key]
        # More tokens over the same experts is at least the same work: a measured curve is made
        # non-decreasing (pool-adjacent-violators), its dips being the repeats' noise (h200: <= 3 %)
        self.curves = {s: (sorted(c), [float(x) for x in isotonic_regression([c[t] for t in sorted(c)]).x])
                       for s, c in by_shape.items()}

    def time(self, op: str, experts: int, top_k: int, hidden: int, expert_size: int, tokens: int,
             roofline) -> float | None:
        """Seconds of the op at `tokens`: the measured layout's curve (or the nearest layout's,
        carried by `roofline(experts, top_k, hidden, expert_size, tokens)`), log-log interpolated;
        beyond the measured tokens, the edge carried by the roofline."""
        keys = [s for s in self.curves if s[4] == op]
        if not keys:
            return None
        want = (experts, top_k, hidden, expert_size)
        key = min(keys, key=lambda s: sum(math.log(a / b) ** 2 for a, b in zip(s[:4], want)))
        ts_tok, ts = self.curves[key]
        if tokens < ts_tok[0] or tokens > ts_tok[-1]:
            edge, t_edge = (ts_tok[0], ts[0]) if tokens < ts_tok[0] else (ts_tok[-1], ts[-1])
            t = t_edge * roofline(*key[:4], tokens) / roofline(*key[:4], edge)
        else:
            t = _interp_loglog(ts_tok, ts, tokens)
        if key[:4] != want:
            t *= roofline(*want, tokens) / roofline(*key[:4], tokens)
        return t


class ChainTable:
    """Least time of one small dependent kernel of an op (a chain replayed from a graph), by the
    tensor's rows and columns: a normalisation, for one, takes longer the wider its rows are."""

    def __init__(self, rows: list[dict]):
        self.curves: dict[str, dict[int, tuple[list[int], list[float]]]] = {}
        by_op: dict[str, dict[int, dict[int, float]]] = {}
        for r in rows:
            g = r.get("graph") or {}
            if "us_per_kernel" in g:
                rr, cc = r["shape"]
                by_op.setdefault(r["op"], {}).setdefault(rr, {})[cc] = g["us_per_kernel"] * 1e-6
        for op, by_rows in by_op.items():
            self.curves[op] = {rr: (sorted(c), [c[k] for k in sorted(c)]) for rr, c in by_rows.items()}

    def time(self, op: str, rows: int, cols: int) -> float | None:
        curves = self.curves.get(op)
        if not curves:
            return None
        rr = min(curves, key=lambda x: abs(math.log(x / max(rows, 1))))
        cs, ts = curves[rr]
        if cols <= cs[0]:
            return ts[0]  # a narrower tensor cannot make the kernel cheaper than its least time
        if len(cs) == 1:
            return ts[0]
        return _interp_loglog(cs, ts, cols)


class DeviceTables:
    """Every table of a device's calibration files (later files add rows to earlier ones)."""

    def __init__(self, data: dict, where: str):
        self.where = where
        try:
            # rows that carry an error instead of a time (a kernel that did not run) are left out
            def timed(key):
                return [r for r in data.get(key, []) if "seconds" in r and r.get("dtype", "bf16") == "bf16"]

            def timed_any(key):  # (rows with several times, e.g. a grouped GEMM's two ops)
                return [r for r in data.get(key, []) if r.get("dtype", "bf16") == "bf16"]
            self.gemm = GemmTable(timed("gemm_sweep"))
            # W8A8 FP8 GEMMs, where the device's were timed (python -m npusim.calibrate --gemm-dtype fp8)
            fp8 = [r for r in data.get("gemm_sweep", []) if "seconds" in r and r.get("dtype") == "fp8"]
            self.gemm_fp8 = GemmTable(fp8) if fp8 else None
            # int8 x int8 GEMMs, where timed (--gemm-dtype int8): what w8a8 weights are priced by
            int8 = [r for r in data.get("gemm_sweep", []) if "seconds" in r and r.get("dtype") == "int8"]
            self.gemm_int8 = GemmTable(int8) if int8 else None
            self.decode_attention = DecodeAttentionTable(timed("decode_attention"))
            self.prefill_attention = PrefillAttentionTable(timed("prefill_attention"))
            self.chains = ChainTable(data.get("kernel_chain", []))
            self.grouped_gemm = GroupedGemmTable(timed_any("moe_grouped_gemm"))
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise NpusimError(f"{where}: malformed calibration table ({e!r})") from None
        if not self.gemm.curves:
            raise NpusimError(f"{where}: no bf16 gemm_sweep rows: not a calibration file of `npusim calibrate run`")
        self.has_prefill = bool(self.prefill_attention.curves)


SECTIONS = ("gemm_sweep", "decode_attention", "prefill_attention", "kernel_chain", "moe_grouped_gemm")

# a transfer: the source device's and this device's (memory GB/s, bf16, fp8, int8 TFLOP/s) and the
# share of its memory bandwidth the source's kernels reach
Transfer = tuple[tuple[float, float, float, float], tuple[float, float, float, float], float]
_PEAK = {"bf16": 1, "fp16": 1, "fp8": 2, "int8": 3}


def _carried(t: float, flops: float, nbytes: float, tr: Transfer, peak: int = 1) -> float:
    """A time measured on the source carried to this device: what the kernel took beyond its
    datasheet roofline (launch, tails) stays as measured, and the roofline's own change is added at
    the rate the binding resource is used: memory at the source's streaming share, compute at the
    share of the peak this kernel reached (`peak`: 1 bf16, 2 fp8, 3 int8 units). Between devices of
    one die and one compute peak, a compute-bound kernel keeps its time and a bandwidth-bound one
    grows by its bytes over the slower memory; never below its time x the rooflines' ratio."""
    (bw0, *f0), (bw1, *f1), mem_eff = tr
    roof0 = max(flops / (f0[peak - 1] * 1e12), nbytes / (bw0 * 1e9))
    c1, m1 = flops / (f1[peak - 1] * 1e12), nbytes / (bw1 * 1e9)
    roof1 = max(c1, m1)
    if roof0 <= 0.0:
        return t  # (no work to scale: a launch)
    eff = mem_eff if m1 >= c1 else min(1.0, roof0 / t)
    return max(t + (roof1 - roof0) / eff, t * min(1.0, roof1 / roof0))


def transfer_rows(merged: dict[str, list], tr: Transfer) -> dict[str, list]:
    """Every measured time of another device's tables carried to this one (see _carried): GEMMs by
    their flops and the bytes of their operands; decode attention by the KV it reads (the row's
    own count where it has one: an MLA kernel reads one latent) and its flops; prefill attention
    by its flops and KV; grouped expert GEMMs by the experts' weights they read and their flops.
    Small-kernel chains are left as measured (launch-bound: the same die)."""
    out = dict(merged)
    rows = []
    for r in merged["gemm_sweep"]:
        if "seconds" not in r:
            rows.append(r)
            continue
        m, n, k, dt = r["m"], r["n"], r["k"], r.get("dtype", "bf16")
        ab = DTYPE_BYTES.get(dt, 2.0)
        out_bytes = 4.0 if dt == "int8" else 2.0  # (torch._int_mm writes int32; the others 16-bit)
        nbytes = (n * k + m * k) * ab + m * n * out_bytes
        rows.append({**r, "seconds": _carried(r["seconds"], 2.0 * m * n * k, nbytes, tr, _PEAK.get(dt, 1))})
    out["gemm_sweep"] = rows
    rows = []
    for r in merged["decode_attention"]:
        if "seconds" not in r:
            rows.append(r)
            continue
        tokens = r["batch"] * r["context"]
        nbytes = r.get("kv_bytes") or tokens * r["kv_heads"] * r["head_dim"] * 2 * 2.0  # K and V, 16-bit
        if str(r.get("impl", "")).startswith("mla"):
            # absorbed MLA: each head scores the latent and RoPE key (head_dim) and sums the latent
            flops = 2.0 * tokens * r["heads"] * (r["head_dim"] + r.get("kv_lora_rank", 512))
        else:
            flops = 4.0 * tokens * r["heads"] * r["head_dim"]
        rows.append({**r, "seconds": _carried(r["seconds"], flops, nbytes, tr)})
    out["decode_attention"] = rows
    out["prefill_attention"] = [{**r, "seconds": _carried(r["seconds"], r["flops"], r.get("kv_bytes", 0.0), tr)}
                                if "seconds" in r else r for r in merged["prefill_attention"]]
    rows = []
    for r in merged["moe_grouped_gemm"]:
        e, top, h, x, tok = r["experts"], r["top_k"], r["hidden"], r["expert_size"], r["tokens"]
        touched = r.get("active_experts", min(e, tok * top))
        new = dict(r)
        for key, (nn, kk) in (("gate_up_seconds", (2 * x, h)), ("down_seconds", (h, x))):
            if key in r:
                nbytes = touched * nn * kk * 2.0 + tok * top * (nn + kk) * 2.0
                new[key] = _carried(r[key], 2.0 * tok * top * nn * kk, nbytes, tr)
        rows.append(new)
    out["moe_grouped_gemm"] = rows
    return out


@lru_cache(maxsize=16)
def load_tables(paths: tuple[str, ...], transfer: Transfer | None = None) -> DeviceTables:
    """The tables of one or more calibration files of one device, their rows merged; with
    `transfer`, another device's, carried to this one (transfer_rows)."""
    merged: dict[str, list] = {k: [] for k in SECTIONS}
    for path in paths:
        p = Path(path)
        data = read_json_file(p)
        if not isinstance(data, dict):
            raise NpusimError(f"{p}: not a calibration file of `npusim calibrate run`")
        check_measured_times(p, data)
        for k in SECTIONS:
            merged[k] += data.get(k, [])
    if transfer is not None:
        try:
            merged = transfer_rows(merged, transfer)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise NpusimError(f"{', '.join(paths)}: malformed calibration table ({e!r})") from None
    return DeviceTables(merged, ", ".join(paths))


def transfer_of(hw) -> Transfer | None:
    """The transfer a hardware profile's tables need (None: its own measurements, or none)."""
    src = hw.transfer_from
    if src is None:
        return None
    keys = ("memory_bandwidth_gbs", "matmul_tflops_bf16", "matmul_tflops_fp8", "matmul_tflops_int8")
    this = hw.peaks()
    return tuple(src[k] for k in keys), tuple(this[k] for k in keys), src["memory_efficiency"]


def check_measured_times(p, data: dict) -> None:
    """Every measured time in a calibration file is a finite time > 0 (one line naming the row)."""
    for k, rows in data.items():
        if not isinstance(rows, list):
            continue
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                continue
            for key in [key for key in r if key == "seconds" or key.endswith("_seconds")]:
                t = r[key]
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
                    raise NpusimError(f"{p}: {k}[{i}].{key} must be a time > 0, got {t!r}")
