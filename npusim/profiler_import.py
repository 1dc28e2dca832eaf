"""Import kernel timings from profiler output, classify the kernels, and calibrate a profile.

Readers (standard library only), for what real profilers write (../shared/data/profiles holds
genuine files; the tests read them):

* torch_npu's ``*_ascend_pt/ASCEND_PROFILER_OUTPUT/kernel_details.csv`` and msprof's
  ``op_summary_*.csv``: one row per device task with op type, start, duration and, when shapes
  were recorded, input/output shapes and dtypes. Shape cells come wrapped in three quote
  characters each side (csv reads them as one quoted string), timestamps may end in a tab, absent
  values read ``N/A``, and the columns vary with the profiler level and release (``Block Dim`` or
  ``Block Num``, optional ``Step Id`` and ``Device_id``, PMU counter columns).
* ``op_statistic.csv``: counts and times per (op type, core type) of the compute kernels (HCCL's
  are not in it); no shapes.
* vllm-ascend per-op-type aggregates (``*_compute_ops.csv``, ``*_comm_ops.csv``); no shapes.
* chrome traces (``.json`` or ``.json.gz``): torch_npu's ``trace_view.json`` carries the device
  tasks on its "Ascend Hardware" lanes with names and times only (no op type, no shapes), and the
  collectives on the "HCCL" process's "Group N Communication" lanes; torch.profiler's CUDA trace
  carries ``kernel``/``gpu_memcpy``/``gpu_memset`` events and, with ``record_shapes``, shapes on
  the ``cpu_op`` that launched each kernel (joined by ``External id``).

Timestamps are µs since the epoch held in a float: about 0.25 µs resolution at today's values.
Durations keep their printed precision. Bad input raises NpusimError naming the file and line (CSV) or the event
(``traceEvents[i]``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
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
    "output_shapes": ("Output Shapes",),
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

# vllm-ascend profiling_analysis_eager reports (msModeling): per op type over a whole run
AGGREGATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "op_type": ("OP Type",),
    "category": ("category",),
    "count": ("n_invocations",),
    "total_us": ("total_duration_us",),
    "mean_us": ("mean_duration_us",),
    "std_us": ("std_duration_us",),
}
REQUIRED_AGGREGATE_FIELDS = ("op_type", "count", "total_us", "mean_us")

# profilers print dtypes as DT_BF16, FLOAT16, FLOAT, DT_UNDEFINED, ...; torch as c10::BFloat16
DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
               "float": "fp32", "float32": "fp32", "fp32": "fp32", "double": "fp64", "int8": "int8",
               "int32": "int32", "int64": "int64", "bool": "bool", "undefined": ""}

# Ascend's GEMM kernels (aclnnMm/aclnnMatmul dispatch to MatMulV2/V3; torch.bmm to BatchMatMul*)
MATMUL_TYPES = {"matmul", "matmulv2", "matmulv3", "batchmatmul", "batchmatmulv2", "batchmatmulv3"}
# torch ops whose kernels are one GEMM on CUDA -> index of the first matrix (addmm: bias first)
TORCH_GEMM_OPS = {"aten::mm": 0, "aten::addmm": 1}
MISSING = ("", "N/A", "NA", "-")


@dataclass(frozen=True)
class KernelRecord:
    name: str
    op_type: str  # the CANN op type (MatMulV2, ...); "" where the format does not say (traces)
    core_type: str  # AI_CORE, AI_VECTOR_CORE, MIX_AIC, HCCL, ...; Ascend traces: the task type;
    #                 CUDA traces: the event category (kernel, gpu_memcpy, gpu_memset)
    start_us: float
    duration_us: float
    wait_us: float | None
    block_dim: int | None
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[str]
    file: str
    line: int  # CSV line; chrome traces: the event's index in traceEvents
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    op: str = ""  # CUDA traces: the torch op that launched the kernel (cpu_op by "External id")
    op_id: int | None = None  # ... and that op call's External id (its kernels share it)


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
        except (csv.Error, UnicodeDecodeError) as e:
            raise NpusimError(f"{path}:1: malformed CSV: {e}") from None
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise NpusimError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
            if not cells:
                continue
            if len(cells) != len(header):
                raise NpusimError(f"{path}:{reader.line_num}: expected {len(header)} columns, "
                                  f"got {len(cells)}")
            yield reader.line_num, dict(zip(header, cells)), header


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [h.strip() for h in next(csv.reader(f), [])]


def _columns(header: list[str], table: dict[str, tuple[str, ...]], required: tuple[str, ...],
             path: Path) -> dict[str, str]:
    """Canonical field -> the header name this file uses; names a missing required column."""
    found = {}
    for fld, names in table.items():
        for n in names:
            if n in header:
                found[fld] = n
                break
    for fld in required:
        if fld not in found:
            raise NpusimError(f"{path}:1: missing column {' or '.join(repr(n) for n in table[fld])}")
    return found


def _number(text: str, column: str, where: str) -> float | None:
    # msprof appends a tab to timestamps so spreadsheets keep their digits
    text = text.strip()
    if text in MISSING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise NpusimError(f"{where}: {column} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise NpusimError(f"{where}: {column} is not finite: {text!r}")
    return value


def _unquote(text: str) -> str:
    # shape cells are written """8192,4096;4096,4096""": csv leaves one quote on each side
    return text.strip().strip('"').strip()


def parse_shapes(text: str, where: str = "shapes") -> list[tuple[int, ...]]:
    """'16,4096;4096,4096' (quoted or not) -> [(16, 4096), (4096, 4096)]; an empty input
    (scalar or absent optional tensor) is (); 'N/A' or nothing is no inputs."""
    text = _unquote(text)
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
    """'DT_BF16;FLOAT16;' -> ['bf16', 'fp16', '']; unknown names pass through in lower case."""
    text = _unquote(text)
    if text in MISSING:
        return []
    return [_dtype(part) for part in text.split(";")]


def _dtype(name: str) -> str:
    key = name.strip().lower().removeprefix("dt_").removeprefix("c10::")
    return DTYPE_NAMES.get(key, key)


def _refuse_totals(header: list[str], path: Path) -> None:
    """A per-op-type totals file passed where kernel rows are expected: say what it is."""
    names = {"Name", "Op Name"} & set(header)
    if not names and "OP Type" in header and ({"Count", "n_invocations"} & set(header)):
        raise NpusimError(f"{path}:1: per-op-type totals (op_statistic or aggregate CSV), not one "
                          f"row per kernel: no kernels or shapes to import; pass the "
                          f"kernel_details.csv of the same run")


def _read_kernels(path: str | Path) -> list[KernelRecord]:
    path = Path(path)
    records = []
    cols: dict[str, str] | None = None
    for line, row, header in _rows(path):
        if cols is None:
            _refuse_totals(header, path)
            cols = _columns(header, KERNEL_COLUMNS, REQUIRED_KERNEL_FIELDS, path)
        where = f"{path}:{line}"

        def get(fld: str) -> str:
            return row[cols[fld]] if fld in cols else ""

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
            file=str(path), line=line,
            output_shapes=parse_shapes(get("output_shapes"), where)))
    if cols is None:  # a header and no rows: still check it is the right kind of file
        header = _header(path)
        _refuse_totals(header, path)
        _columns(header, KERNEL_COLUMNS, REQUIRED_KERNEL_FIELDS, path)
    return records


def read_kernel_details(path: str | Path) -> list[KernelRecord]:
    """torch_npu's ASCEND_PROFILER_OUTPUT/kernel_details.csv, of any profiler level or release."""
    return _read_kernels(path)


def read_op_summary(path: str | Path) -> list[KernelRecord]:
    """msprof's op_summary_*.csv: the same records under the older column names."""
    return _read_kernels(path)


def _count(text: str, column: str, where: str) -> int | None:
    value = _number(text, column, where)
    if value is None:
        return None
    if value < 0 or value != int(value):
        raise NpusimError(f"{where}: {column} must be a whole number >= 0, got {text.strip()!r}")
    return int(value)


def read_op_statistic(path: str | Path) -> list[dict[str, Any]]:
    """op_statistic.csv: one dict per (op type, core type) with count and times in µs
    (``Device_id`` is present in some releases and not others; it is not needed)."""
    path = Path(path)
    out = []
    cols: dict[str, str] | None = None
    for line, row, header in _rows(path):
        if cols is None:
            cols = _columns(header, OP_STATISTIC_COLUMNS, tuple(OP_STATISTIC_COLUMNS), path)
        where = f"{path}:{line}"
        rec: dict[str, Any] = {"op_type": row[cols["op_type"]].strip(),
                               "core_type": row[cols["core_type"]].strip(),
                               "count": _count(row[cols["count"]], cols["count"], where)}
        for fld in ("total_us", "min_us", "avg_us", "max_us", "ratio_pct"):
            rec[fld] = _number(row[cols[fld]], cols[fld], where)
        rec["file"], rec["line"] = str(path), line
        out.append(rec)
    return out


def read_kernel_aggregates(path: str | Path) -> list[dict[str, Any]]:
    """vllm-ascend per-op-type aggregates (``qwen332b_compute_ops.csv``, ``dsv3_comm_ops.csv``,
    ...): one dict per op type with op_type, their own category label ("compute"/"comm"; "" if
    absent), count, total_us, mean_us and std_us (None if absent), file and line."""
    path = Path(path)
    out = []
    cols: dict[str, str] | None = None
    for line, row, header in _rows(path):
        if cols is None:
            cols = _columns(header, AGGREGATE_COLUMNS, REQUIRED_AGGREGATE_FIELDS, path)
        where = f"{path}:{line}"
        rec: dict[str, Any] = {"op_type": row[cols["op_type"]].strip(),
                               "category": row[cols["category"]].strip() if "category" in cols else "",
                               "count": _count(row[cols["count"]], cols["count"], where)}
        for fld in ("total_us", "mean_us", "std_us"):
            rec[fld] = _number(row[cols[fld]], cols[fld], where) if fld in cols else None
        for fld in ("count", "total_us", "mean_us"):
            if rec[fld] is None or rec[fld] < 0:
                raise NpusimError(f"{where}: {cols[fld]} must be a number >= 0, got {row[cols[fld]]!r}")
        if not rec["op_type"]:
            raise NpusimError(f"{where}: empty {cols['op_type']}")
        rec["file"], rec["line"] = str(path), line
        out.append(rec)
    if cols is None:
        _columns(_header(path), AGGREGATE_COLUMNS, REQUIRED_AGGREGATE_FIELDS, path)
    return out


# --------------------------------------------------------------------------- chrome traces

ASCEND_DEVICE_PROCESS = "Ascend Hardware"  # torch_npu trace_view.json / msprof timeline lanes
ASCEND_HCCL_PROCESS = "HCCL"
# Tasks on the Ascend Hardware lanes that run no kernel: stream events, profiler markers, and the
# steps HCCL splits a collective into (on the comm stream; the HCCL process's "Group N
# Communication" lane has the collective once, as kernel_details.csv has it)
ASCEND_NON_KERNEL_TASK = re.compile(
    r"^(EVENT_RECORD|EVENT_WAIT|PROFILING_ENABLE|PROFILING_DISABLE|Notify[ _]Wait|Notify[ _]Record|"
    r"Write Value|SDMA)$")
CUDA_DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _load_json(path: Path) -> Any:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise NpusimError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise NpusimError(f"{path}: cannot read ({e})") from None


def _event_number(ev: dict, key: str, where: str) -> float:
    value = ev.get(key)
    try:
        x = float(value)  # torch_npu writes ts as a string, kineto as a number
    except (TypeError, ValueError):
        raise NpusimError(f"{where}: {key!r} is not a number: {value!r}") from None
    if not math.isfinite(x) or (key == "dur" and x < 0):
        raise NpusimError(f"{where}: {key!r} must be finite{' and >= 0' if key == 'dur' else ''}, "
                          f"got {value!r}")
    return x


def _torch_shapes(dims: Any) -> list[tuple[int, ...]]:
    # kineto's "Input Dims": [[16, 4096], [4096, 4096], []] (a list per input, [] for scalars)
    if not isinstance(dims, list):
        return []
    return [tuple(d) if isinstance(d, list) and all(isinstance(x, int) for x in d) else () for d in dims]


def chrome_trace_tasks(path: str | Path) -> tuple[list[KernelRecord], dict[str, int]]:
    """The device tasks of a chrome trace as KernelRecords (sorted by start), and how many
    device-lane events were left out, by reason. Ascend (trace_view.json): every task on the
    "Ascend Hardware" lanes but stream events and HCCL's steps, core_type its Task Type, plus
    each collective of the HCCL "Group N Communication" lanes (core_type HCCL, op_type the
    collective, e.g. hcom_allReduce_); no shapes. CUDA (torch.profiler): the kernel, gpu_memcpy
    and gpu_memset events, core_type their category, with the launching cpu_op's name, External
    id, Input Dims and Input type when the trace has them."""
    path = Path(path)
    data = _load_json(path)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise NpusimError(f"{path}: not a chrome trace (expected a list of events or a 'traceEvents' list)")
    procs: dict[Any, str] = {}
    threads: dict[tuple[Any, Any], str] = {}
    cpu_ops: dict[Any, dict] = {}
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise NpusimError(f"{path}: traceEvents[{i}] is not an event object: {str(ev)[:60]!r}")
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            procs[ev.get("pid")] = str(args.get("name", ""))
        elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
            threads[(ev.get("pid"), ev.get("tid"))] = str(args.get("name", ""))
        elif ev.get("cat") == "cpu_op" and "External id" in args:
            cpu_ops.setdefault(args["External id"], ev)
    ascend = {pid for pid, n in procs.items() if n == ASCEND_DEVICE_PROCESS}
    hccl = {pid for pid, n in procs.items() if n == ASCEND_HCCL_PROCESS}
    records: list[KernelRecord] = []
    skipped: Counter = Counter()
    for i, ev in enumerate(events):
        if ev.get("ph") != "X":
            continue
        pid, cat, name = ev.get("pid"), ev.get("cat"), str(ev.get("name", ""))
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        where = f"{path}: traceEvents[{i}] ({name[:60]!r})"
        fields: dict[str, Any] = {}
        if pid in ascend:
            if ASCEND_NON_KERNEL_TASK.match(name):
                skipped["stream events and HCCL steps (Ascend Hardware)"] += 1
                continue
            fields["core_type"] = str(args.get("Task Type", ""))
        elif pid in hccl:
            if "Communication" not in threads.get((pid, ev.get("tid")), ""):
                skipped["HCCL plane tasks (steps of the collectives counted)"] += 1
                continue
            m = re.match(r"(hcom_[A-Za-z]+_)_", name)  # hcom_allReduce__586_0_1 -> hcom_allReduce_
            fields.update(core_type="HCCL", op_type=m.group(1) if m else "")
        elif cat in CUDA_DEVICE_CATEGORIES:
            fields["core_type"] = cat
            op = cpu_ops.get(args.get("External id"))
            if op is not None:
                op_args = op.get("args") or {}
                types = op_args.get("Input type")
                fields.update(op=str(op.get("name", "")), op_id=args.get("External id"),
                              input_shapes=_torch_shapes(op_args.get("Input Dims")),
                              input_dtypes=[_dtype(str(t)) for t in types] if isinstance(types, list) else [])
        elif cat == "gpu_user_annotation":
            skipped["gpu_user_annotation (GPU-lane ranges, not kernels)"] += 1
            continue
        else:
            continue  # host side: python, cpu_op, runtime, CANN, overlap analysis, counters
        records.append(KernelRecord(
            name=name, op_type=fields.get("op_type", ""), core_type=fields["core_type"],
            start_us=_event_number(ev, "ts", where), duration_us=_event_number(ev, "dur", where),
            wait_us=None, block_dim=None, input_shapes=fields.get("input_shapes", []),
            input_dtypes=fields.get("input_dtypes", []), file=str(path), line=i,
            op=fields.get("op", ""), op_id=fields.get("op_id")))
    if not records:
        raise NpusimError(f"{path}: no device kernels: neither CUDA kernel events (cat 'kernel') nor "
                          f"tasks on an '{ASCEND_DEVICE_PROCESS}' lane")
    records.sort(key=lambda r: r.start_us)
    return records, dict(skipped)


def read_chrome_trace(path: str | Path) -> list[KernelRecord]:
    """Device kernels of a chrome trace (.json or .json.gz): torch_npu's trace_view.json or
    torch.profiler's export_chrome_trace on CUDA. See chrome_trace_tasks for what is kept."""
    return chrome_trace_tasks(path)[0]


# --------------------------------------------------------------------------- kernel categories

CATEGORIES = ("gemm", "attention", "norm", "rope", "activation", "elementwise", "kv_write", "copy",
              "communication", "sampling", "other")

# (category, pattern), first match wins. Each pattern is tried on the op type, then on the last
# word of an Ascend kernel name (aclnnMm_MatMulCommon_MemSet is a MemSet), then on the full name;
# anchored alternatives (^...$) are for exact Ascend op types.
_TABLE = [
    # first: HCCL's AI-CPU kernels (allgatherAicpuKernel) and fused matmul+collective ops communicate
    ("communication", r"(?i)hcom_|hccl|nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|"
                      r"send_?recv|cross_device_reduce"),
    # MoE routing (MoeGatingTopK, MoeInitRouting, vLLM's topkGatingSoftmax) has no category in npusim's dense cost model;
    # it must not read as sampling because of its TopK
    ("other", r"(?i)moe_?(gating|align|sum|permute|unpermute|init_?routing|finalize_?routing)|"
              r"topk_?gating|gating_?topk"),
    # before attention: vLLM's reshape_and_cache_flash is a cache write, not flash attention, and
    # KvRmsNormRopeCache (DeepSeek MLA) norms and ropes the latent on its way into the cache
    ("kv_write", r"(?i)reshape_?and_?cache|concat_and_cache|ScatterPaKvCache|KvRmsNormRopeCache|"
                 r"index_put|IndexPut|^Scatter(Nd)?Update$|scatter\w*cache|cache_write"),
    # before gemm: FlashAttention kernels on CUDA carry "cutlass" in their names; before sampling:
    # Megatron's ScaledMaskedSoftmax is the softmax of unfused attention
    ("attention", r"(?i)flash|fmha|attention|attn|sdpa|mla_?(prefill|decode)|ringmla|"
                  r"BatchPrefillWith|BatchDecodeWith|ScaledMaskedSoftmax"),
    # convolutions run on the matrix unit too (implicit GEMM; cuDNN's fprop/dgrad/wgrad engines)
    ("gemm", r"(?i)gemm|gemv|matmul|fused_moe|cublas|cutlass|nvjet|xmma|wgmma|splitKreduce|^Conv\dD|"
             r"conv2d|convolution|winograd|scudnn|dgrad_engine|wgrad_alg"),
    ("norm", r"(?i)norm(?!al)|bn_fw|bn_bw"),  # RmsNorm, AddRmsNormBias, LayerNormV3, LpNorm, ...
    ("rope", r"Rope|(?<![A-Za-z])rope|(?i:rotary)"),  # not "property"
    ("activation", r"(?i)silu|gelu|swiglu|geglu|act_and_mul|relu|sigmoid|swish|softplus"),
    # softmax outside attention runs on the logits; a serving step draws random numbers
    # (DSARandomUniform, exponential_) only for the sampler; MaxPoolWithArgmax is no sampling
    ("sampling", r"(?i)(?<!with)argmax|arg_max|topk|top_k|top_p|sort|softmax|multinomial|RandomUniform|"
                 r"exponential|sampler"),
    # data movement: copies, layout changes, slices, fills, gathers (embedding lookup is GatherV2)
    ("copy", r"(?i)memcpy|memset|TensorMove|transpose|TransData|permute|copy_kernel|CatArray|"
             r"nchwToNhwc|nhwcToNchw|PagedCacheLoad|index_?select|gpu_index_kernel|gather|^(Slice|StridedSlice\w*|"
             r"AsStrided|Concat\w*|BroadcastTo|Fill|ZerosLike|OnesLike|Index|Tile|Expand\w*|"
             r"Pad\w*|Split\w*|Pack|Unpack|Identity|Reshape|MEMCPY_ASYNC)$"),
    # vector-unit arithmetic, reductions, casts, activation quantisation, optimizer updates
    ("elementwise", r"(?i)elementwise|reduce_kernel|multi_tensor_apply|dropout|^(Adds?|AddV2|Subs?|"
                    r"Muls?|Divs?|RealDiv|Neg|Abs|Exp|Log|Sqrt|Rsqrt|Pows?|Square|Reciprocal|Cast|"
                    r"Cos|Sin|Maximum|Minimum|Equal|NotEqual|Greater|GreaterEqual|Less|LessEqual|"
                    r"Logical\w+|Select\w*|Where|MaskedFill|Tril|Triu|Axpy|Addcmul|Addcdiv|"
                    r"Reduce\w+|Range|ApplyAdamW\w*|Foreach\w*|DropOutDoMask|DSA\w*GenBitMask|"
                    r"\w*Quant\w*)$"),
]
KERNEL_CATEGORIES: list[tuple[str, re.Pattern]] = [(c, re.compile(p)) for c, p in _TABLE]

# torch.compile names kernels after the aten ops fused in: triton_red_fused__to_copy_add_mean_...
_TRITON = re.compile(r"^triton_(poi|red|per|tem)_fused_(\w*?)(_\d+)?$")
_TRITON_RULES: list[tuple[str, Any]] = [
    ("gemm", lambda w: w & {"mm", "bmm", "addmm"}),
    ("norm", lambda w: ("rsqrt" in w and w & {"mean", "var"}) or {"rms", "norm"} <= w),  # rms_norm: pow, mean, rsqrt, mul; or aten's _fused_rms_norm
    ("rope", lambda w: w & {"cos", "sin", "rotary"}),
    ("activation", lambda w: w & {"silu", "gelu", "sigmoid", "relu", "tanh"}),
    ("sampling", lambda w: w & {"softmax", "argmax", "sort", "topk"}),
    ("copy", lambda w: w <= {"clone", "cat", "view", "slice", "transpose", "permute", "index",
                             "select", "constant", "pad", "embedding", "scatter", "copy", "unsqueeze"}
                       and "to" not in w),  # _to_copy is a cast
    ("elementwise", lambda w: True),
]


def _match(text: str) -> str | None:
    for category, pattern in KERNEL_CATEGORIES:
        if pattern.search(text):
            return category
    return None


def _last_word(name: str) -> str:
    # aclnnInplaceCopy_TensorMoveAiCore_TensorMove -> TensorMove; hcom_allReduce__586_0_1 ->
    # allReduce; CUDA names (spaces, templates) have no such structure
    if "_" not in name or not re.fullmatch(r"[\w\-.]+", name):
        return ""
    words = [w for w in name.split("_") if re.search(r"[A-Za-z]", w)]
    return words[-1] if words else ""


def classify_kernel(name: str, op_type: str = "") -> str:
    """The npusim op category of a device kernel (one of CATEGORIES) from its op type and name:
    Ascend op types and kernel names, CUDA kernel names (cuBLAS/CUTLASS/nvjet GEMMs, FlashAttention,
    vLLM's kernels, ATen's elementwise kernels) and torch.compile's triton_* kernels."""
    m = _TRITON.match(name)
    if not op_type and m:
        words = set(w for w in m.group(2).split("_") if w)
        return next(c for c, rule in _TRITON_RULES if rule(words))
    word = _last_word(name)
    for text in (op_type, word, re.sub(r"\d+$", "", word), name, re.sub(r"\d+$", "", name)):
        if text and (category := _match(text)):
            return category
    return "other"


def _short_name(name: str) -> str:
    # "void at::native::vectorized_elementwise_kernel<4, ...>(...)" -> at::native::vectorized_elementwise_kernel
    return re.split(r"[<(]", name.removeprefix("void ").strip(), maxsplit=1)[0].strip() or name


def kernel_summary(records: list[KernelRecord], steps: int = 1,
                   num_layers: int | None = None) -> dict[str, dict[str, Any]]:
    """Per category (largest total time first): kernel count, total_us, mean_us, per_step_count,
    per_step_us, types (kernels per op type, or per short name where the op type is unknown)
    and, with num_layers, per_layer: kernels per step per layer (fractional for kernels run once
    a step, such as sampling). `steps` is how many steps (iterations) the records span."""
    if steps < 1:
        raise NpusimError(f"steps must be >= 1, got {steps}")
    if num_layers is not None and num_layers < 1:
        raise NpusimError(f"num_layers must be >= 1, got {num_layers}")
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        s = out.setdefault(classify_kernel(r.name, r.op_type), {"count": 0, "total_us": 0.0, "types": Counter()})
        s["count"] += 1
        s["total_us"] += r.duration_us
        s["types"][r.op_type or _short_name(r.name)] += 1
    for s in out.values():
        s["mean_us"] = s["total_us"] / s["count"]
        s["per_step_count"] = s["count"] / steps
        s["per_step_us"] = s["total_us"] / steps
        if num_layers is not None:
            s["per_layer"] = s["count"] / steps / num_layers
        s["types"] = dict(s["types"].most_common())
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_us"]))


# --------------------------------------------------------------------------- finding profiles

def _is_chrome_trace(p: Path) -> bool:
    return p.name.endswith((".json", ".json.gz"))


def find_profile_files(directory: str | Path) -> dict[str, list[Path]]:
    """Profiler files under `directory`: torch_npu's `*_ascend_pt/ASCEND_PROFILER_OUTPUT/` files
    (`directory` may be the run folder, one `*_ascend_pt` folder or its output folder), msprof's
    `op_summary_*.csv`, and chrome traces (torch_npu's trace_view.json, torch.profiler's
    `*.pt.trace.json[.gz]`)."""
    d = Path(directory)
    if not d.is_dir():
        raise NpusimError(f"profile folder not found: {d}")
    found: dict[str, list[Path]] = {"kernel_details": [], "op_statistic": [], "op_summary": [],
                                    "chrome_trace": []}
    for p in sorted(d.rglob("*")):
        if p.name == "kernel_details.csv":
            found["kernel_details"].append(p)
        elif p.name == "op_statistic.csv":
            found["op_statistic"].append(p)
        elif p.name.startswith("op_summary_") and p.suffix == ".csv":
            found["op_summary"].append(p)
        elif p.name == "trace_view.json" or p.name.endswith((".pt.trace.json", ".pt.trace.json.gz")):
            found["chrome_trace"].append(p)
    return found


def load_kernels(path: str | Path) -> tuple[list[KernelRecord], list[Path]]:
    """Kernel records from one file (kernel_details / op_summary CSV, or a chrome trace) or from
    every profile under a folder, and the files read. Folders: kernel_details.csv files win (they
    carry shapes); msprof's op_summary files are read only without them (torch_npu leaves msprof's
    copy of the same kernels beside its own), and chrome traces only without either."""
    p = Path(path)
    if p.is_file():
        if _is_chrome_trace(p):
            return read_chrome_trace(p), [p]
        reader = read_op_summary if p.name.startswith("op_summary") else read_kernel_details
        return reader(p), [p]
    if not p.exists():
        raise NpusimError(f"profile not found: {p}")
    found = find_profile_files(p)
    files = found["kernel_details"] or found["op_summary"] or found["chrome_trace"]
    if not files:
        raise NpusimError(f"no kernel_details.csv, op_summary_*.csv or chrome trace (trace_view.json, "
                          f"*.pt.trace.json) under {p}")
    records: list[KernelRecord] = []
    for f in files:
        records.extend(read_chrome_trace(f) if _is_chrome_trace(f) else _read_kernels(f))
    return records, files


# --------------------------------------------------------------------------- GEMMs

def gemm_dims(shapes: list[tuple[int, ...]], out: tuple[int, ...] | None = None) -> tuple[int, int, int] | None:
    """(M, K, N) of a 2-D GEMM from its first two input shapes. Profilers print the stored
    layouts and not the transpose flags, so the shared dimension K is found by matching, trying
    A @ B, A @ B^T, A^T @ B, A^T @ B^T in that order; a 2-D output shape (M, N) picks among them
    (`32,4096;32,4096 -> 4096,4096` is A^T @ B, 128x the FLOPs of the first match)."""
    if len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return None
    (a0, a1), (b0, b1) = shapes[0], shapes[1]
    layouts = [(m, ka, n) for m, ka in ((a0, a1), (a1, a0)) for kb, n in ((b0, b1), (b1, b0)) if ka == kb]
    if out is not None and len(out) == 2:
        layouts = [(m, k, n) for m, k, n in layouts if (m, n) == tuple(out)]
    return layouts[0] if layouts else None


def _gemm_calls(records: list[KernelRecord]) -> Iterator[tuple[KernelRecord, list, tuple | None, float]]:
    """(record, input shapes, output shape, measured µs) of each GEMM call: an Ascend MatMul
    kernel, or on CUDA one aten::mm/addmm call, whose kernels (a GEMM and its split-K reduce)
    are summed."""
    torch_calls: dict[Any, list[KernelRecord]] = {}
    for r in records:
        if r.op_type.lower() in MATMUL_TYPES:
            yield r, r.input_shapes, r.output_shapes[0] if r.output_shapes else None, r.duration_us
        elif r.op in TORCH_GEMM_OPS and r.core_type == "kernel":
            torch_calls.setdefault((r.file, r.op_id), []).append(r)
    for rs in torch_calls.values():
        first = TORCH_GEMM_OPS[rs[0].op]
        yield rs[0], rs[0].input_shapes[first:], None, sum(r.duration_us for r in rs)


def _cost_models(hw) -> dict[str, Any]:
    """One CostModel per 16-bit compute dtype. `gemm` prices from the hardware alone; the model
    is only there because CostModel needs one."""
    from npusim.costmodel import CostModel
    from npusim.specs import load_model

    model = load_model("llama-3.2-1b")
    return {dt: CostModel(hw, model, weight_dtype=dt) for dt in ("bf16", "fp16")}


def gemm_kernels(records: list[KernelRecord], hw) -> tuple[list[dict], dict[str, int]]:
    """Per-GEMM measured vs predicted for the fp16/bf16 2-D GEMMs, and counts of those skipped."""
    models = _cost_models(hw)
    peak_bw = hw.memory_bandwidth_gbs * 1e9
    rows: list[dict] = []
    skipped = {"no shapes": 0, "not 2-D": 0, "shapes disagree": 0, "not fp16/bf16": 0, "zero duration": 0}
    for r, shapes, out, measured in _gemm_calls(records):
        dims = gemm_dims(shapes, out)
        if dims is None:
            two_d = len(shapes) >= 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2
            skipped["shapes disagree" if two_d else "not 2-D" if shapes else "no shapes"] += 1
            continue
        first = TORCH_GEMM_OPS.get(r.op, 0)
        dtype = r.input_dtypes[first] if len(r.input_dtypes) > first else ""
        if dtype not in ("bf16", "fp16"):
            skipped["not fp16/bf16"] += 1
            continue
        if measured <= 0:
            skipped["zero duration"] += 1
            continue
        m, k, n = dims
        op_type = r.op_type or r.op
        op = models[dtype].gemm(m, k, n, 2.0, name=op_type)
        peak = hw.matmul_tflops(dtype) * 1e12
        tflops = op.flops / (measured * 1e-6) / 1e12
        rows.append({
            "op_type": op_type, "m": m, "k": k, "n": n, "dtype": dtype, "flops": op.flops,
            "bytes": op.bytes, "measured_us": measured, "predicted_us": op.time_s * 1e6,
            "ratio": measured / (op.time_s * 1e6), "tflops": tflops,
            "efficiency": tflops * 1e12 / peak, "bound": op.bound,
            # compute-bound on the bare roofline (peak flops vs peak bandwidth)
            "compute_bound": op.flops / op.bytes >= peak / peak_bw,
            "where": f"{r.file}:{r.line}",
        })
    return rows, skipped


def _source(records: list[KernelRecord]) -> str:
    files = sorted({r.file for r in records})
    if not files:
        return "the profile"
    return files[0] + (f" and {len(files) - 1} more" if len(files) > 1 else "")


def _no_gemms(records: list[KernelRecord], skipped: dict[str, int]) -> str:
    """Why no GEMM could be priced, in one line."""
    src = _source(records)
    if not records:
        return f"no kernels in {src}"
    gemms = [r for r in records if classify_kernel(r.name, r.op_type) == "gemm"]
    if not gemms:
        return f"no GEMM kernels among the {len(records)} kernels of {src}: nothing to price"
    counted = {reason: n for reason, n in skipped.items() if n}
    if counted and set(counted) != {"no shapes"}:
        why = ", ".join(f"{n} {reason}" for reason, n in counted.items())
        return (f"no fp16/bf16 2-D GEMMs to price among the {sum(counted.values())} matmul kernels "
                f"of {src} ({why})")
    if counted or not any(r.input_shapes for r in gemms):
        return (f"{src} has {len(gemms)} GEMM kernels but no GEMM shapes (trace_view.json and traces "
                f"without record_shapes do not carry them): import the run's kernel_details.csv, "
                f"or profile with record_shapes=True")
    kinds = sorted({r.op_type or r.op or _short_name(r.name) for r in gemms})
    return (f"none of the {len(gemms)} GEMM kernels of {src} is a 2-D matmul npusim prices "
            f"({', '.join(kinds[:4])}{', ...' if len(kinds) > 4 else ''})")


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
    "by_shape", "skipped", "note"}; raises NpusimError, saying why, when no GEMM can be priced."""
    rows, skipped = gemm_kernels(records, hw)
    if not rows:
        raise NpusimError(_no_gemms(records, skipped))
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
    src = source or _source(records)
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
