"""Import kernel timings from Ascend profiler output and calibrate a profile from them.

Reads torch_npu's ``*_ascend_pt/ASCEND_PROFILER_OUTPUT/kernel_details.csv`` and ``op_statistic.csv``
and msprof's ``op_summary_*.csv`` (the same data under older column names; REFERENCE.md §5), with
the standard ``csv`` module. This keeps the NPU path tested without an NPU: a user profiles a real
run, and npusim prices the same GEMM shapes with its roofline and fits ``matmul_efficiency``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from npusim.errors import NpusimError

# canonical field -> header names, newest first (kernel_details.csv, then msprof's op_summary)
KERNEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "name": ("Name", "Op Name"),
    "op_type": ("Type", "OP Type"),
    "core_type": ("Accelerator Core", "Task Type"),
    "start_us": ("Start Time(us)", "Task Start Time(us)"),
    "duration_us": ("Duration(us)", "Task Duration(us)"),
    "wait_us": ("Wait Time(us)", "Task Wait Time(us)"),
    "block_dim": ("Block Num", "Block Dim"),  # renamed in newer torch_npu releases
    "input_shapes": ("Input Shapes",),
    "input_dtypes": ("Input Data Types",),
}
REQUIRED_KERNEL_FIELDS = ("name", "op_type", "start_us", "duration_us")

OP_STATISTIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "op_type": ("OP Type",),
    "core_type": ("Core Type",),
    "count": ("Count",),
    "total_us": ("Total Time(us)",),
    "min_us": ("Min Time(us)",),
    "avg_us": ("Avg Time(us)",),
    "max_us": ("Max Time(us)",),
    "ratio_pct": ("Ratio(%)",),
}

# profilers print dtypes as DT_BF16, FLOAT16, FLOAT, ...
DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
               "float": "fp32", "float32": "fp32", "fp32": "fp32", "int8": "int8", "int32": "int32",
               "int64": "int64", "bool": "bool"}

# Ascend's GEMM kernels (aclnnMm/aclnnMatmul dispatch to MatMulV2/V3; torch.bmm to BatchMatMul*)
MATMUL_TYPES = {"matmul", "matmulv2", "matmulv3", "batchmatmul", "batchmatmulv2", "batchmatmulv3"}
MISSING = ("", "N/A", "NA", "-")


@dataclass(frozen=True)
class KernelRecord:
    name: str
    op_type: str
    core_type: str  # AI_CORE, AI_VECTOR_CORE, MIX_AIC, MIX_AIV, AI_CPU, HCCL, ... ("" if absent)
    start_us: float
    duration_us: float
    wait_us: float | None
    block_dim: int | None
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[str]
    file: str
    line: int


# --------------------------------------------------------------------------- CSV reading

def _rows(path: Path) -> Iterator[tuple[int, dict[str, str], list[str]]]:
    """(line number, row by header, header) of each data row; ragged rows are errors."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # the profiler may write a BOM
    except OSError as e:
        raise NpusimError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise NpusimError(f"{path}: empty file, expected a header line") from None
        except csv.Error as e:
            raise NpusimError(f"{path}:1: malformed CSV: {e}") from None
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise NpusimError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
            if not cells:
                continue
            if len(cells) != len(header):
                raise NpusimError(f"{path}:{reader.line_num}: expected {len(header)} columns, "
                                  f"got {len(cells)}")
            yield reader.line_num, dict(zip(header, cells)), header


def _columns(header: list[str], table: dict[str, tuple[str, ...]], required: tuple[str, ...],
             path: Path) -> dict[str, str]:
    """Canonical field -> the header name this file uses; names a missing required column."""
    found = {}
    for field, names in table.items():
        for n in names:
            if n in header:
                found[field] = n
                break
    for field in required:
        if field not in found:
            raise NpusimError(f"{path}:1: missing column {' or '.join(repr(n) for n in table[field])}")
    return found


def _number(text: str, column: str, where: str) -> float | None:
    # msprof appends a tab to timestamps so spreadsheets keep their digits
    text = text.strip()
    if text in MISSING:
        return None
    try:
        return float(text)
    except ValueError:
        raise NpusimError(f"{where}: {column} is not a number: {text!r}") from None


def parse_shapes(text: str, where: str = "shapes") -> list[tuple[int, ...]]:
    """'16,4096;4096,4096' -> [(16, 4096), (4096, 4096)]; an empty input (scalar or absent
    optional tensor) is (); 'N/A' is no inputs."""
    text = text.strip()
    if text in MISSING:
        return []
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.split(",") if d.strip()]
        try:
            shapes.append(tuple(int(d) for d in dims))
        except ValueError:
            raise NpusimError(f"{where}: malformed shape {part!r} in {text!r}") from None
    return shapes


def parse_dtypes(text: str) -> list[str]:
    """'DT_BF16;FLOAT16;' -> ['bf16', 'fp16', '']."""
    text = text.strip()
    if text in MISSING:
        return []
    out = []
    for part in text.split(";"):
        key = part.strip().lower().removeprefix("dt_")
        out.append(DTYPE_NAMES.get(key, key))
    return out


def _read_kernels(path: str | Path) -> list[KernelRecord]:
    path = Path(path)
    records = []
    cols: dict[str, str] | None = None
    for line, row, header in _rows(path):
        if cols is None:
            cols = _columns(header, KERNEL_COLUMNS, REQUIRED_KERNEL_FIELDS, path)
        where = f"{path}:{line}"

        def get(field: str) -> str:
            return row[cols[field]] if field in cols else ""

        start = _number(get("start_us"), cols["start_us"], where)
        duration = _number(get("duration_us"), cols["duration_us"], where)
        if start is None or duration is None:
            raise NpusimError(f"{where}: {cols['start_us']} and {cols['duration_us']} are required")
        if duration < 0:
            raise NpusimError(f"{where}: {cols['duration_us']} must be >= 0, got {duration:g}")
        block = _number(get("block_dim"), cols.get("block_dim", "Block Dim"), where)
        records.append(KernelRecord(
            name=get("name").strip(), op_type=get("op_type").strip(), core_type=get("core_type").strip(),
            start_us=start, duration_us=duration,
            wait_us=_number(get("wait_us"), cols.get("wait_us", "Wait Time(us)"), where),
            block_dim=None if block is None else int(block),
            input_shapes=parse_shapes(get("input_shapes"), where),
            input_dtypes=parse_dtypes(get("input_dtypes")),
            file=str(path), line=line))
    if cols is None:  # a header and no rows: still check it is the right kind of file
        _columns(_header(path), KERNEL_COLUMNS, REQUIRED_KERNEL_FIELDS, path)
    return records


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [h.strip() for h in next(csv.reader(f), [])]


def read_kernel_details(path: str | Path) -> list[KernelRecord]:
    """torch_npu's ASCEND_PROFILER_OUTPUT/kernel_details.csv (`Block Dim` or `Block Num`)."""
    return _read_kernels(path)


def read_op_summary(path: str | Path) -> list[KernelRecord]:
    """msprof's op_summary_*.csv: the same records under the older column names."""
    return _read_kernels(path)


def read_op_statistic(path: str | Path) -> list[dict[str, Any]]:
    """op_statistic.csv: one dict per (op type, core type) with count and times in µs."""
    path = Path(path)
    out = []
    cols: dict[str, str] | None = None
    for line, row, header in _rows(path):
        if cols is None:
            cols = _columns(header, OP_STATISTIC_COLUMNS, tuple(OP_STATISTIC_COLUMNS), path)
        where = f"{path}:{line}"
        rec: dict[str, Any] = {"op_type": row[cols["op_type"]].strip(),
                               "core_type": row[cols["core_type"]].strip()}
        for field in ("count", "total_us", "min_us", "avg_us", "max_us", "ratio_pct"):
            rec[field] = _number(row[cols[field]], cols[field], where)
        if rec["count"] is not None:
            rec["count"] = int(rec["count"])
        out.append(rec)
    return out


def find_profile_files(directory: str | Path) -> dict[str, list[Path]]:
    """Profiler CSVs under `directory`: torch_npu's `*_ascend_pt/ASCEND_PROFILER_OUTPUT/` files
    (`directory` may be the run folder, one `*_ascend_pt` folder or its output folder) and msprof's
    `op_summary_*.csv`."""
    d = Path(directory)
    if not d.is_dir():
        raise NpusimError(f"profile folder not found: {d}")
    found: dict[str, list[Path]] = {"kernel_details": [], "op_statistic": [], "op_summary": []}
    for p in sorted(d.rglob("*.csv")):
        if p.name == "kernel_details.csv":
            found["kernel_details"].append(p)
        elif p.name == "op_statistic.csv":
            found["op_statistic"].append(p)
        elif p.name.startswith("op_summary_"):
            found["op_summary"].append(p)
    return found


def load_kernels(path: str | Path) -> tuple[list[KernelRecord], list[Path]]:
    """Kernel records from one CSV or from every profile under a folder, and the files read.
    Folders: kernel_details.csv files win; msprof's op_summary files are read only without them
    (torch_npu leaves msprof's copy of the same kernels beside its own)."""
    p = Path(path)
    if p.is_file():
        reader = read_op_summary if p.name.startswith("op_summary") else read_kernel_details
        return reader(p), [p]
    if not p.exists():
        raise NpusimError(f"profile not found: {p}")
    found = find_profile_files(p)
    files = found["kernel_details"] or found["op_summary"]
    if not files:
        raise NpusimError(f"no kernel_details.csv or op_summary_*.csv under {p}")
    records: list[KernelRecord] = []
    for f in files:
        records.extend(_read_kernels(f))
    return records, files


# --------------------------------------------------------------------------- GEMMs

def gemm_dims(shapes: list[tuple[int, ...]]) -> tuple[int, int, int] | None:
    """(M, K, N) of a 2-D GEMM from its first two input shapes. Profilers print the stored
    layouts, and Linear layers keep weights as (N, K) and transpose in the kernel, so the shared
    dimension K is found by matching, trying the untransposed layout first."""
    if len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return None
    (a0, a1), (b0, b1) = shapes[0], shapes[1]
    if a1 == b0:
        return a0, a1, b1
    if a1 == b1:  # B transposed
        return a0, a1, b0
    if a0 == b0:  # A transposed
        return a1, a0, b1
    if a0 == b1:  # both transposed
        return a1, a0, b0
    return None


def _cost_models(hw) -> dict[str, Any]:
    """One CostModel per 16-bit compute dtype. `_gemm` prices from the hardware alone; the model
    is only there because CostModel needs one."""
    from npusim.costmodel import CostModel
    from npusim.specs import load_model

    model = load_model("llama-3.2-1b")
    return {dt: CostModel(hw, model, weight_dtype=dt) for dt in ("bf16", "fp16")}


def gemm_kernels(records: list[KernelRecord], hw) -> tuple[list[dict], dict[str, int]]:
    """Per-kernel measured vs predicted for the fp16/bf16 2-D GEMMs, and counts of those skipped."""
    models = _cost_models(hw)
    peak_bw = hw.memory_bandwidth_gbs * 1e9
    rows: list[dict] = []
    skipped = {"not 2-D": 0, "not fp16/bf16": 0, "zero duration": 0}
    for r in records:
        if r.op_type.lower() not in MATMUL_TYPES:
            continue
        dims = gemm_dims(r.input_shapes)
        if dims is None:
            skipped["not 2-D"] += 1
            continue
        dtype = r.input_dtypes[0] if r.input_dtypes else ""
        if dtype not in ("bf16", "fp16"):
            skipped["not fp16/bf16"] += 1
            continue
        if r.duration_us <= 0:
            skipped["zero duration"] += 1
            continue
        m, k, n = dims
        op = models[dtype]._gemm(r.op_type, m, k, n, 2.0)
        peak = hw.matmul_tflops(dtype) * 1e12
        tflops = op.flops / (r.duration_us * 1e-6) / 1e12
        rows.append({
            "op_type": r.op_type, "m": m, "k": k, "n": n, "dtype": dtype, "flops": op.flops,
            "bytes": op.bytes, "measured_us": r.duration_us, "predicted_us": op.time_s * 1e6,
            "ratio": r.duration_us / (op.time_s * 1e6), "tflops": tflops,
            "efficiency": tflops * 1e12 / peak, "bound": op.bound,
            # compute-bound on the bare roofline (peak flops vs peak bandwidth)
            "compute_bound": op.flops / op.bytes >= peak / peak_bw,
            "where": f"{r.file}:{r.line}",
        })
    return rows, skipped


def by_shape(rows: list[dict]) -> list[dict]:
    """Kernels of the same (type, dtype, M, K, N) merged: count, median measured, predicted,
    ratio; largest total time first."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op_type"], r["dtype"], r["m"], r["k"], r["n"]), []).append(r)
    out = []
    for (op_type, dtype, m, k, n), rs in groups.items():
        measured = statistics.median(r["measured_us"] for r in rs)
        out.append({"op_type": op_type, "dtype": dtype, "m": m, "k": k, "n": n, "count": len(rs),
                    "total_us": sum(r["measured_us"] for r in rs), "measured_us": measured,
                    "predicted_us": rs[0]["predicted_us"], "ratio": measured / rs[0]["predicted_us"],
                    "tflops": rs[0]["flops"] / (measured * 1e-6) / 1e12, "bound": rs[0]["bound"]})
    return sorted(out, key=lambda g: -g["total_us"])


def matmul_efficiency_from_kernels(records: list[KernelRecord], hw) -> dict[str, Any]:
    """Achieved TFLOP/s of each fp16/bf16 2-D GEMM and a fitted matmul efficiency: the median
    efficiency of the largest compute-bound GEMMs (FLOPs at least a quarter of the largest's).
    Memory-bound GEMMs (small M) say nothing about the matrix units, so they do not count.
    Returns {"efficiency" (None without compute-bound GEMMs), "fit_kernels", "kernels",
    "by_shape", "skipped", "note"}."""
    rows, skipped = gemm_kernels(records, hw)
    compute = [r for r in rows if r["compute_bound"]]
    result: dict[str, Any] = {"kernels": rows, "by_shape": by_shape(rows), "skipped": skipped,
                              "efficiency": None, "fit_kernels": []}
    if not compute:
        result["note"] = (f"no compute-bound fp16/bf16 2-D GEMMs among {len(rows)} GEMM kernels: "
                          "profile a prefill (large M) to fit matmul_efficiency")
        return result
    biggest = max(r["flops"] for r in compute)
    fit = [r for r in compute if r["flops"] >= biggest / 4]
    result["efficiency"] = statistics.median(r["efficiency"] for r in fit)
    result["fit_kernels"] = fit
    result["note"] = (f"median efficiency of {len(fit)} largest compute-bound GEMMs "
                      f"(of {len(compute)} compute-bound, {len(rows)} GEMMs)")
    return result


def calibrate_from_kernels(hw, records: list[KernelRecord], source: str | None = None,
                           name: str | None = None) -> dict:
    """A new profile mapping with matmul_efficiency fitted to imported kernels (kind calibrated,
    source naming the file). Refuses an efficiency above 1: the profile's peak is then wrong."""
    from npusim.calibrate import profile_mapping
    from npusim.specs import hardware_from_mapping

    fit = matmul_efficiency_from_kernels(records, hw)
    eff = fit["efficiency"]
    if eff is None:
        raise NpusimError(f"cannot fit matmul_efficiency: {fit['note']}")
    files = sorted({r.file for r in records})
    src = source or (files[0] + (f" and {len(files) - 1} more" if len(files) > 1 else ""))
    kernels = fit["fit_kernels"]
    dtypes = "/".join(sorted({r["dtype"] for r in kernels}))
    tflops = statistics.median(r["tflops"] for r in kernels)
    peak = hw.matmul_tflops(kernels[0]["dtype"])
    if eff > 1:
        raise NpusimError(f"{hw.name} is wrong for this device: the largest {dtypes} GEMMs in {src} ran at "
                          f"{tflops:.1f} TFLOP/s, above the profile's peak of {peak:g} "
                          f"(matmul efficiency {eff:.2f} > 1); fix matmul_tflops_{kernels[0]['dtype']} "
                          f"or import against the profile of the device profiled")
    if not math.isfinite(eff) or eff <= 0:
        raise NpusimError(f"cannot fit matmul_efficiency from {src}: got {eff!r}")
    biggest = max(kernels, key=lambda r: r["flops"])
    today = _dt.date.today().isoformat()
    data = profile_mapping(hw)
    data["name"] = name or f"{hw.name}-calibrated"
    data["description"] = f"{hw.description}; matmul efficiency from profiler output {src}".lstrip("; ")
    data["matmul_efficiency"] = {
        "value": round(eff, 4), "kind": "calibrated",
        "source": (f"npusim calibrate import, {today}, of {src}: median of {len(kernels)} largest "
                   f"compute-bound {dtypes} GEMMs (up to {biggest['m']}x{biggest['k']}x{biggest['n']}) "
                   f"{tflops:.1f} TFLOP/s of {peak:g} peak"),
    }
    hardware_from_mapping(data, "fitted profile")  # the fit must load, or it is a bug here
    return data
