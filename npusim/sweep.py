"""Sweeps and SLO capacity search: a grid of simulate settings, each point one simulation, run on
local processes or a Dask cluster.

A point's seed depends only on the base seed and the point's workload settings other than the
rate, never on which worker ran it or when. So every point of a grid that varies engine or device
settings sees the same requests (a paired comparison), and points that differ only in rate see the
same lengths with arrivals scaled, which keeps a load-latency curve smooth and makes the capacity
search's bisection well behaved."""

from __future__ import annotations

import hashlib
import itertools
import re
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from npusim.errors import NpusimError
from npusim.settings import SIMULATE_FIELDS, _parse_rate, apply_flags
from npusim.specs import CUDAGRAPH_MODES


# --------------------------------------------------------------------------- the grid

def _ints(minimum: int) -> Callable[[str, str], int]:
    def parse(flag: str, text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text):  # (int() would take "1_6" and other scripts' digits)
            raise NpusimError(f"--{flag}: {text!r} is not a whole number")
        value = int(text)
        if value < minimum:
            raise NpusimError(f"--{flag}: {value} must be >= {minimum}")
        return value
    return parse


def _float(flag: str, text: str) -> float:
    if not re.fullmatch(r"[0-9.eE+-]+|nan|inf|-inf", text.lower()):
        raise NpusimError(f"--{flag}: {text!r} is not a number")
    try:
        value = float(text)
    except ValueError:
        raise NpusimError(f"--{flag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise NpusimError(f"--{flag}: {text!r} must be finite")
    if flag == "burstiness" and value < 0.001:  # (simulate's own bound)
        raise NpusimError(f"--burstiness: {value} must be >= 0.001")
    return value


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(flag: str, text: str) -> str:
        if text not in allowed:
            raise NpusimError(f"--{flag} takes {','.join(allowed)}, got {text!r}")
        return text
    return parse


def _text(flag: str, text: str) -> str:
    return text


def _rate(flag: str, text: str) -> float:
    return _parse_rate(text)


def _on_off(flag: str, text: str) -> bool:
    value = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise NpusimError(f"--{flag} takes on,off (or true,false), got {text!r}")
    return value


# The settings a grid may list: the sweep's column name -> (how one value is read, help). They are
# simulate's flags, except that the on/off switches (--no-paging, --no-chunked-prefill,
# --prefix-caching) become `paging`, `chunked_prefill` and `prefix_caching` taking on,off.
GRID_SETTINGS: dict[str, tuple[Callable[[str, str], Any], str]] = {
    "hw": (_text, "hardware profiles"), "model": (_text, "models"), "engine": (_text, "engine profiles"),
    "instances": (_ints(1), "model instances on the device"),
    "sharing": (_choice("time-slice", "vnpu"), "time-slice,vnpu"),
    "block_size": (_ints(1), "KV page sizes in tokens"), "max_num_seqs": (_ints(1), "batch limits"),
    "max_num_batched_tokens": (_ints(1), "token budgets per iteration"),
    "gpu_memory_utilization": (_float, "memory fractions"), "num_blocks": (_ints(1), "KV block counts"),
    "max_model_len": (_ints(1), "max model lengths"), "weight_dtype": (_text, "weight dtypes"),
    "kv_dtype": (_text, "KV dtypes"), "tp": (_ints(1), "tensor-parallel sizes"), "ep": (_ints(1), "expert-parallel sizes (1, the tp size, or tp x dp)"),
    "pp": (_ints(1), "pipeline-parallel stages"),
    "expert_imbalance": (_float, "busiest / mean routed tokens per expert-parallel device"),
    "dp": (_ints(1), "data-parallel replicas"), "router": (_choice("round-robin", "least-outstanding", "prefix-aware"), "round-robin,least-outstanding,prefix-aware"),
    "batching": (_choice("auto", "continuous", "static"), "auto,continuous,static"),
    "paging": (_on_off, "on,off (off: contiguous reservation)"),
    "contiguous_policy": (_choice("max", "oracle"), "max,oracle (with paging off)"),
    "chunked_prefill": (_on_off, "on,off"), "prefix_caching": (_on_off, "on,off"),
    "preemption": (_choice("recompute", "swap"), "recompute,swap"), "requests": (_ints(1), "request counts"),
    "cudagraph_mode": (_choice(*CUDAGRAPH_MODES), ",".join(CUDAGRAPH_MODES) + " (vLLM engines)"),
    "max_cudagraph_capture_size": (_ints(1), "largest captured steps in tokens (vLLM engines)"),
    "input_len": (_ints(1), "fixed prompt lengths"), "output_len": (_ints(1), "fixed output lengths"),
    "rate": (_rate, "arrival rates in requests/s (inf: all at t=0)"),
    "burstiness": (_float, "CVs of inter-arrival gaps"), "max_concurrency": (_ints(1), "closed-loop limits"),
    "trace": (_text, "trace CSVs"), "shared_prefix_len": (_ints(0), "shared-prefix lengths"),
}
# how a grid setting becomes simulate's flag (the rest have simulate's own name and value)
_AS_FLAG = {"paging": ("no_paging", lambda on: not on), "chunked_prefill": ("no_chunked_prefill", lambda on: not on)}
WORKLOAD_SETTINGS = {k for k, (section, _, _) in SIMULATE_FIELDS.items() if section == "workload"}


def parse_grid(lists: dict[str, str | None]) -> dict[str, list]:
    """{"block_size": "16,32", ...} (None: not given) -> {"block_size": [16, 32]}, in the given order."""
    grid: dict[str, list] = {}
    for name, text in lists.items():
        if text is None:
            continue
        flag = name.replace("_", "-")
        parse = GRID_SETTINGS[name][0]
        items = [part.strip() for part in text.split(",")]
        if any(not part for part in items):
            raise NpusimError(f"--{flag}: an empty value in {text!r} (give a comma list such as 16,32)")
        values = [parse(flag, part) for part in items]
        if len(set(map(repr, values))) < len(values):
            raise NpusimError(f"--{flag} lists a value twice: {text!r}")
        grid[name] = values
    return grid


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product, the first setting varying slowest."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _not_applicable(params: dict[str, Any], data: dict) -> set[str]:
    """The point's settings that do not apply to it: sharing with one instance, the contiguous
    policy with paging on, prefix caching with paging off."""
    instances = params.get("instances", data.get("instances", 1))
    paging = params.get("paging", data.get("engine", {}).get("paging", True))
    na = {"sharing"} if instances == 1 else set()
    if params.get("dp", data.get("dp", 1)) == 1 and instances == 1:
        na.add("router")
    na.add("contiguous_policy" if paging else "prefix_caching")
    return na & set(params)


def expand(grid: dict[str, list], data: dict) -> tuple[list[dict[str, Any]], int]:
    """The grid's points over the scenario `data`, a setting that does not apply to a point set
    to None (so `--instances 1,2 --sharing time-slice,vnpu` runs one instance once, and two
    instances both ways); returns the points and how many duplicates that removed."""
    points, seen = [], set()
    raw = grid_points(grid)
    listed = {k for k, v in grid.items() if len(v) > 1}  # (a single value that does not apply is refused)
    for p in raw:
        na = _not_applicable(p, data) & listed
        q = {k: (None if k in na else v) for k, v in p.items()}
        key = point_key(q)
        if key not in seen:
            seen.add(key)
            points.append(q)
    return points, len(raw) - len(points)


def setting_text(value: Any) -> str:
    """A setting's value as a table cell or in a point's name."""
    if value is None:
        return "-"  # (does not apply to this point)
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def point_key(params: dict[str, Any]) -> str:
    """A point's name in an output file (what --resume matches on)."""
    return " ".join(f"{k}={setting_text(v)}" for k, v in params.items()) or "(base)"


def point_seed(base_seed: int, params: dict[str, Any], varied: Iterable[str]) -> int:
    """The base seed, or (where the grid varies workload settings other than the rate) a seed
    derived from it and the point's values of them, the same wherever and whenever the point runs.
    A setting given one value does not change the seed: such a point is `simulate` with the same
    flags, to the last digit."""
    varied = set(varied)
    workload = [f"{k}={params[k]}" for k in sorted(params)
                if k in varied and k in WORKLOAD_SETTINGS and k != "rate"]
    if not workload:
        return base_seed
    digest = hashlib.sha256(f"{base_seed}|{' '.join(workload)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def check_names(grid: dict[str, list], data: dict) -> None:
    """Every device, model and engine the grid names exists (a typo in a list is refused, not a
    row of errors)."""
    from npusim.specs import load_engine_profile, load_hardware, load_model

    for key, load in (("hw", load_hardware), ("model", load_model), ("engine", load_engine_profile)):
        for value in grid.get(key, []):
            try:
                load(value)
            except NpusimError as err:
                raise NpusimError(f"--{key} {value}: {err}") from None


def point_flags(fixed: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """simulate's flags of a point: the fixed ones, then the point's settings."""
    flags = dict(fixed)
    for name, value in params.items():
        if name in _AS_FLAG:
            name, convert = _AS_FLAG[name]
            value = convert(value)
        flags[name] = value
    if flags.get("no_paging") is False:
        flags["no_paging"] = None  # (paging on: the scenario's default)
    if flags.get("no_chunked_prefill") is False:
        flags["no_chunked_prefill"] = None
    return flags


# --------------------------------------------------------------------------- one point

def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """The scalars of a `simulate --json` result as one flat row (sections prefixed)."""
    row: dict[str, Any] = {}
    for key, value in result.items():
        if key in ("scenario", "per_instance", "wall_seconds"):
            continue
        if key == "rejected":
            row["rejected"] = len(value)
        elif isinstance(value, dict):
            prefix = {"kv_cache": "kv"}.get(key, key)
            for sub, v in value.items():
                if not isinstance(v, (dict, list)):
                    row[f"{prefix}_{sub}"] = v
        else:
            row[key] = value
    for sub, v in result["scenario"]["engine"].items():  # the engine settings as resolved
        if not isinstance(v, (dict, list)):
            row[f"engine_{sub}"] = v
    return row


def _scenario(task: dict[str, Any], params: dict[str, Any], seed: int):
    flags = point_flags(task["fixed"], params)
    flags["seed"] = seed
    return apply_flags(task["data"], flags, task["where"])


def run_point(task: dict[str, Any]) -> dict[str, Any]:
    """One grid point (a picklable task, run in a worker) -> its row. Never raises: a point that
    cannot run records why (status "infeasible": npusim refused it, with the reason; "failed":
    anything else, with the error)."""
    from npusim.scenario import simulate_scenario, summarize

    params = task["params"]
    row: dict[str, Any] = {**params, "point": point_key(params), "seed": task["seed"],
                           "status": "ok", "error": None}
    try:
        sc = _scenario(task, params, task["seed"])
        record = simulate_scenario(sc)
        if not record.completed:
            why = record.rejected[0][1] if record.rejected else "nothing was scheduled"
            raise NpusimError(f"no request completed; the first rejection: {why}")
        row.update(flatten(summarize(record, sc)))
    except NpusimError as err:
        row.update(status="infeasible", error=str(err))
    except Exception as err:  # noqa: BLE001 - recorded so the sweep goes on; the row says what
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
    return row


# --------------------------------------------------------------------------- executors

def execute(fn: Callable[[Any], Any], tasks: list, *, executor: str = "local", workers: int | None = None,
            address: str | None = None) -> Iterator[tuple[int, Any]]:
    """Run fn over tasks; yields (index, result) as each finishes. `local`: this process (one
    worker) or a process pool; `dask`: a LocalCluster of `workers` processes, or the scheduler at
    `address`. Stopping early (Ctrl-C, or closing the generator) cancels what has not run."""
    if executor not in ("local", "dask"):
        raise NpusimError(f"--executor must be local or dask, got {executor!r}")
    if address is not None and executor != "dask":
        raise NpusimError("--address names a Dask scheduler: it needs --executor dask")
    if address is not None and workers is not None:
        raise NpusimError("--workers starts a local cluster; with --address the cluster's own workers run")
    if workers is not None and workers < 1:
        raise NpusimError(f"--workers must be >= 1, got {workers}")
    if not tasks:
        return
    if executor == "dask":
        yield from _execute_dask(fn, tasks, workers, address)
        return
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) == 1:
        for i, task in enumerate(tasks):
            yield i, fn(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: a worker starts clean (no copy of this process's threads, e.g. the progress bar's)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)),
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _execute_dask(fn, tasks, workers, address) -> Iterator[tuple[int, Any]]:
    try:
        import logging

        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise NpusimError("--executor dask needs dask.distributed: pip install 'npusim[sweep]'") from None
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=min(workers or os.cpu_count() or 1, len(tasks)), threads_per_worker=1,
                               processes=True, dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout=10)
        except (OSError, ValueError, TypeError) as err:
            raise NpusimError(f"--address {address}: no Dask scheduler answered ({err})") from None
    futures = []
    try:
        futures = client.map(fn, tasks, pure=False)
        index = {fut.key: i for i, fut in enumerate(futures)}
        for fut in as_completed(futures):
            yield index[fut.key], fut.result()
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- output files

OUT_SUFFIXES = (".parquet", ".csv")


def check_out(out: str | None, resume: bool) -> None:
    if out is None:
        if resume:
            raise NpusimError("--resume continues an output file: it needs --out")
        return
    if not out.strip():
        raise NpusimError("--out is empty: give a .parquet or .csv file")
    if Path(out).suffix.lower() not in OUT_SUFFIXES:
        raise NpusimError(f"--out {out}: the file must end in .parquet or .csv")
    if Path(out).is_dir():
        raise NpusimError(f"--out {out} is a folder: give a .parquet or .csv file")
    if not Path(out).resolve().parent.is_dir():
        raise NpusimError(f"--out {out}: the folder {Path(out).resolve().parent} does not exist")
    if Path(out).exists() and not resume:
        raise NpusimError(f"--out {out} exists: add --resume to continue it, or remove it")


def read_rows(path: str) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if path.lower().endswith(".parquet") else pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise NpusimError(f"--resume: cannot read {path}: {err}") from None
    if "point" not in frame.columns or "status" not in frame.columns:
        raise NpusimError(f"--resume: {path} is not an npusim sweep output (no point/status columns)")
    bad = sorted(set(frame["status"].astype(str)) - {"ok", "infeasible", "failed"})
    if bad:
        raise NpusimError(f"--resume: {path}: status {bad[0]!r} is not ok, infeasible or failed")
    if (frame["status"] == "ok").any() and "output_throughput" not in frame.columns:
        raise NpusimError(f"--resume: {path} has ok rows without their results (no output_throughput column)")
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict("records")


def write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Write the rows (atomically: a crash leaves the previous file)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    tmp = f"{path}.tmp{os.getpid()}"
    if path.lower().endswith(".parquet"):
        for col in frame.columns:  # (a column of mixed types, e.g. None and text, as text)
            if frame[col].dtype == object and frame[col].map(type).nunique() > 1:
                kinds = set(frame[col].dropna().map(type))
                if len(kinds) > 1:
                    frame[col] = frame[col].map(lambda v: None if v is None else str(v))
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the sweep

def sweep(data: dict, fixed: dict[str, Any], grid: dict[str, list], *, where: str = "settings",
          executor: str = "local", workers: int | None = None, address: str | None = None,
          out: str | None = None, resume: bool = False,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every point of `grid` over the scenario `data` with simulate's `fixed` flags; returns the
    rows in grid order (with --resume: the file's rows first where the grid has them). A point
    whose settings contradict each other is refused before anything runs."""
    check_out(out, resume)
    base_seed = fixed.get("seed")
    if base_seed is None:
        base_seed = data.get("seed", 0)
    check_names(grid, data)
    points, _ = expand(grid, data)
    for params in points:  # every point must be a valid scenario before any runs
        try:
            _scenario({"fixed": fixed, "data": data, "where": where}, params, 0)
        except NpusimError as err:
            raise NpusimError(f"point {point_key(params)}: {err}") from None
    done: dict[str, dict] = {}
    if resume and out is not None and Path(out).exists():
        for row in read_rows(out):
            if row["status"] != "failed":  # (a failed point runs again)
                done[row["point"]] = row
    todo = [p for p in points if point_key(p) not in done]
    varied = [k for k, values in grid.items() if len(values) > 1]
    tasks = [{"data": data, "fixed": fixed, "where": where, "params": p, "seed": point_seed(base_seed, p, varied)}
             for p in todo]
    fresh: dict[int, dict] = {}

    def ordered() -> list[dict]:
        rows, seen = [], set()
        new = {point_key(todo[i]): row for i, row in fresh.items()}
        for p in points:
            key = point_key(p)
            if key in new or key in done:
                rows.append(new.get(key) or done[key])
                seen.add(key)
        rows += [row for key, row in done.items() if key not in seen]  # (points of another grid)
        return rows

    import time
    last_write = 0.0
    try:
        for i, row in execute(run_point, tasks, executor=executor, workers=workers, address=address):
            fresh[i] = row
            if on_row is not None:
                on_row(row)
            if out is not None and time.monotonic() - last_write > 1.0:
                write_rows(out, ordered())
                last_write = time.monotonic()
    finally:  # (Ctrl-C too: what finished is kept)
        if out is not None and (fresh or not Path(out).exists()):
            write_rows(out, ordered())
    mine = {point_key(p) for p in points}
    return [row for row in ordered() if row["point"] in mine]  # (the file keeps other grids' rows too)


def skipped_points(grid: dict[str, list], data: dict, out: str | None, resume: bool) -> int:
    """How many of the grid's points --resume will skip."""
    if not (resume and out and Path(out).exists()):
        return 0
    keys = {row["point"] for row in read_rows(out) if row["status"] != "failed"}
    return sum(point_key(p) in keys for p in expand(grid, data)[0])


# --------------------------------------------------------------------------- capacity

SLO_METRICS = ("ttft", "tpot", "e2el")


def capacity_requests_note(n: int) -> str:
    """Why n requests give a stable enough p99."""
    sd = math.sqrt(n * 0.01 * 0.99)
    lo, hi = 100 * (1 - (n * 0.01 + 2 * sd) / n), 100 * (1 - max(0.0, n * 0.01 - 2 * sd) / n)
    return (f"{n} requests per run: the count of requests above the true p99 is Binomial({n}, 0.01), "
            f"mean {n * 0.01:g}, sd {sd:.1f}, so the measured p99 lies between about the "
            f"{lo:.1f}th and {hi:.1f}th percentiles (95 %); quadruple --requests to halve that")


def _simulate(task: dict, rate: float):
    from npusim.scenario import simulate_scenario

    sc = _scenario(task, {**task["params"], "rate": rate}, task["seed"])
    record = simulate_scenario(sc)
    if not record.completed:
        why = record.rejected[0][1] if record.rejected else "nothing was scheduled"
        raise NpusimError(f"no request completed; the first rejection: {why}")
    return record, sc


def saturated_rate(task: dict) -> float:
    """A first guess at the highest sustainable rate: the requests a fully queued run completes
    per second (every request at t=0). Only a starting point: with fewer requests than the batch
    holds it measures the spread of output lengths, not throughput."""
    record, _ = _simulate(task, math.inf)
    return record.completed / record.duration


def _evaluate(task: dict, rate: float) -> dict[str, Any]:
    from npusim.scenario import summarize

    record, sc = _simulate(task, rate)
    r = summarize(record, sc)
    slo = task["slo"]
    violated = [m for m in SLO_METRICS if slo.get(m) is not None
                and (r[f"p99_{m}_ms"] is None or r[f"p99_{m}_ms"] > slo[m])]
    if r["rejected"]:
        violated.append("rejected")
    if r["load"]["overloaded"]:  # the queue grew through the run: this rate is not sustained
        violated.append("throughput")
    kv = r["kv_cache"]
    return {"rate": rate, "ok": not violated, "violated": violated,
            "kv_full": kv["preemptions"] > 0 or kv["peak_used_fraction"] >= 0.95,
            "ttft_p99_ms": r["p99_ttft_ms"], "tpot_p99_ms": r["p99_tpot_ms"], "e2el_p99_ms": r["p99_e2el_ms"],
            "request_throughput": r["request_throughput"], "output_throughput": r["output_throughput"],
            "goodput": r["request_goodput"], "preemptions": kv["preemptions"],
            "kv_peak_used_fraction": kv["peak_used_fraction"]}


def capacity_search(task: dict[str, Any]) -> dict[str, Any]:
    """The highest Poisson rate (to `tolerance` relative) at which one configuration's p99s meet
    every SLO and the run keeps up with its arrivals (scenario.load_check: requests in the system
    do not keep growing). A rate the SLOs allow but the device cannot sustain is not an answer:
    such a configuration is bound by "throughput"."""
    params, tol = task["params"], task["tolerance"]
    out: dict[str, Any] = {**params, "point": point_key(params), "seed": task["seed"], "max_rate": None,
                           "ttft_p99_ms": None, "tpot_p99_ms": None, "e2el_p99_ms": None, "goodput": None,
                           "output_throughput": None, "bound_by": "infeasible", "reason": None,
                           "evaluations": []}
    evals: list[dict] = out["evaluations"]

    def run(rate):
        e = _evaluate(task, rate)
        evals.append(e)
        return e

    try:
        # bracket: from a first guess, double while the SLOs hold and the run keeps up with its
        # arrivals, or halve until they do; then bisect (geometrically) to the tolerance
        first = run(saturated_rate(task))
        lo = hi = None
        if first["ok"]:
            lo = first
            for _ in range(20):
                nxt = run(lo["rate"] * 2)
                if not nxt["ok"]:
                    hi = nxt
                    break
                lo = nxt
            if hi is None:
                out["reason"] = f"the SLOs still hold at {lo['rate']:.4g} req/s (2^20 x the first guess)"
                return out
        else:
            hi = first
            for _ in range(14):
                nxt = run(hi["rate"] / 2)
                if nxt["ok"]:
                    lo = nxt
                    break
                hi = nxt
            if lo is None:
                out["reason"] = (f"the SLOs are not met even at {hi['rate']:.4g} req/s "
                                 f"(violated: {', '.join(hi['violated'])})")
                return out
        while hi["rate"] / lo["rate"] > 1 + tol:
            mid = run(math.sqrt(lo["rate"] * hi["rate"]))
            if mid["ok"]:
                lo = mid
            else:
                hi = mid
        best = lo
        slo_missed = [v for v in hi["violated"] if v in SLO_METRICS]
        if hi["kv_full"] or "rejected" in hi["violated"]:
            bound = "memory"
        elif slo_missed:
            bound = slo_missed[0]
        else:
            bound = "throughput"  # the SLOs held, but the queue grew: the device's limit
    except NpusimError as err:
        out["reason"] = str(err)
        return out
    except Exception as err:  # noqa: BLE001 - recorded so the other configurations go on
        out.update(bound_by="failed", reason=f"{type(err).__name__}: {err}")
        return out
    evals.sort(key=lambda e: e["rate"])
    out.update(max_rate=best["rate"], ttft_p99_ms=best["ttft_p99_ms"], tpot_p99_ms=best["tpot_p99_ms"],
               e2el_p99_ms=best["e2el_p99_ms"], goodput=best["goodput"],
               output_throughput=best["output_throughput"], bound_by=bound)
    return out


def capacity(data: dict, fixed: dict[str, Any], grid: dict[str, list], slo: dict[str, float], *,
             requests: int, where: str = "settings", tolerance: float = 0.02, executor: str = "local",
             workers: int | None = None, address: str | None = None,
             on_config: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """capacity_search over every configuration of the grid; the `best` sustains the most load."""
    if "rate" in grid or fixed.get("rate") is not None:
        raise NpusimError("--rate is what capacity searches for: leave it out")
    if "max_concurrency" in grid or (data.get("workload") or {}).get("max_concurrency"):
        raise NpusimError("--max-concurrency closes the loop (no more than C requests in flight), so no arrival "
                          "rate overloads it: capacity searches an open-loop Poisson rate; leave it out")
    if not any(slo.get(m) is not None for m in SLO_METRICS):
        raise NpusimError("capacity needs at least one SLO: --slo-ttft-p99-ms, --slo-tpot-p99-ms or --slo-e2el-p99-ms")
    fixed = {**fixed, "requests": requests,  # (goodput: the share of requests meeting the SLOs)
             "goodput": [" ".join(f"{m}:{slo[m]:g}" for m in SLO_METRICS if slo.get(m) is not None)]}
    base_seed = fixed.get("seed")
    if base_seed is None:
        base_seed = data.get("seed", 0)
    check_names(grid, data)
    configs, _ = expand(grid, data)
    for params in configs:
        try:
            _scenario({"fixed": fixed, "data": data, "where": where}, {**params, "rate": 1.0}, 0)
        except NpusimError as err:
            raise NpusimError(f"configuration {point_key(params)}: {err}") from None
    varied = [k for k, values in grid.items() if len(values) > 1]
    tasks = [{"data": data, "fixed": fixed, "where": where, "params": p, "slo": slo, "tolerance": tolerance,
              "seed": point_seed(base_seed, p, varied)} for p in configs]
    results: dict[int, dict] = {}
    for i, res in execute(capacity_search, tasks, executor=executor, workers=workers, address=address):
        results[i] = res
        if on_config is not None:
            on_config(res)
    rows = [results[i] for i in range(len(configs))]
    feasible = [r for r in rows if r["max_rate"] is not None]
    best = max(feasible, key=lambda r: r["max_rate"]) if feasible else None
    return {"slo": {f"{m}_p99_ms": slo.get(m) for m in SLO_METRICS}, "requests": requests,
            "requests_note": capacity_requests_note(requests), "tolerance": tolerance,
            "configs": rows, "best": best}


def capacity_figure(result: dict[str, Any]):
    """Load against p99 latency per configuration, one panel per SLO, with the SLO lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = [m for m in SLO_METRICS if result["slo"][f"{m}_p99_ms"] is not None]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[f"p99 {m.upper()} (ms)" for m in metrics])
    for k, cfg in enumerate(result["configs"]):
        evals = cfg["evaluations"]
        label = ", ".join(part.replace("=", " ") for part in cfg["point"].split())
        for col, m in enumerate(metrics, start=1):
            fig.add_trace(go.Scatter(x=[e["rate"] for e in evals], y=[e[f"{m}_p99_ms"] for e in evals],
                                     mode="lines+markers", name=label, legendgroup=cfg["point"],
                                     marker=dict(size=9), showlegend=col == 1, line=dict(color=_color(k))),
                          row=1, col=col)
    for col, m in enumerate(metrics, start=1):
        slo = result["slo"][f"{m}_p99_ms"]
        # (the line without plotly's annotation, which lands at 10^y on a log axis: plotly.py #2580)
        fig.add_hline(y=slo, line_dash="dash", line_color="black", row=1, col=col)
        fig.add_annotation(text=f"SLO {slo:g} ms", x=1, xref=f"x{col if col > 1 else ''} domain", xanchor="right",
                           y=math.log10(slo), yref=f"y{col if col > 1 else ''}", yanchor="bottom", showarrow=False)
        fig.update_xaxes(title_text="arrival rate (req/s)", row=1, col=col)
        fig.update_yaxes(type="log", dtick=1, row=1, col=col)
    fig.update_layout(title="Load against p99 latency (dashed: the SLO)", legend=dict(orientation="h", y=-0.25),
                      margin=dict(b=120))
    return fig


def _color(k: int) -> str:
    import plotly.colors

    palette = plotly.colors.qualitative.D3
    return palette[k % len(palette)]


def summary_rows(rows: Iterable[dict[str, Any]], grid: dict[str, list]) -> list[list[str]]:
    """The sweep's rows as text cells: the grid's settings, then the headline numbers."""
    def cell(v, spec=",.1f"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    out = []
    for row in rows:
        out.append([setting_text(row.get(k)) for k in grid] + [
            row["status"], cell(row.get("output_throughput")), cell(row.get("p99_ttft_ms")),
            cell(row.get("p99_tpot_ms"), ",.2f"), cell(row.get("kv_mean_waste_fraction"), ".3f"),
            cell(row.get("kv_preemptions"), ",.0f"), (row.get("error") or "")[:80]])
    return out


SUMMARY_HEADERS = ["status", "out tok/s", "p99 TTFT ms", "p99 TPOT ms", "KV waste", "preempt", "why not"]
