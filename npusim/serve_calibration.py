"""An engine profile's host terms fitted to serving benchmarks the user already ran.

`npusim calibrate serve --bench FILE.json ...` reads `vllm bench serve --save-result
--save-detailed` results, replays each one's workload in the simulator (its requests' prompt and
output lengths; their send times where the file has them, else its request rate, burstiness and
concurrency limit), and fits the engine profile's host terms by least squares on the relative
errors of `duration`, `mean_ttft_ms`, `mean_tpot_ms` and `mean_itl_ms`: the per-iteration host
time, the per-sequence host time, and for an eager engine the dispatch time per kernel. A
leave-one-file-out table says how well each file is predicted by a fit to the others.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from npusim.errors import NpusimError
from npusim.specs import ENGINE_NUMBER_FIELDS, EngineConfig, EngineProfile, read_json_file

METRICS = ("duration", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms")
# the host terms fitted, with the bounds a physical host time stays in
PARAMS = {"host_per_iteration_ms": (0.0, 50.0), "host_per_sequence_us": (0.0, 2000.0),
          "dispatch_per_kernel_us": (0.0, 200.0), "graph_update_per_layer_us": (0.0, 5000.0)}


def read_bench(path: str | Path) -> dict[str, Any]:
    """One `vllm bench serve --save-result --save-detailed` result, checked."""
    p = Path(path)
    data = read_json_file(p)
    if not isinstance(data, dict):
        raise NpusimError(f"{p}: not a vllm bench serve result (expected a JSON object)")
    for key in ("input_lens", "output_lens", *METRICS):
        if key not in data:
            hint = " (save it with --save-detailed)" if key.endswith("_lens") else ""
            raise NpusimError(f"{p}: no {key!r}{hint}")
    ins, outs = data["input_lens"], data["output_lens"]
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
        raise NpusimError(f"{p}: input_lens and output_lens must be lists of the same, non-zero length")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ins + outs):
        raise NpusimError(f"{p}: input_lens and output_lens must hold token counts >= 1")
    for key in METRICS:
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise NpusimError(f"{p}: {key} must be a positive number, got {v!r}")
    starts = data.get("start_times")
    if starts is not None:
        if not isinstance(starts, list) or len(starts) != len(ins):
            raise NpusimError(f"{p}: start_times must list one time per request ({len(ins)}), got "
                              f"{len(starts) if isinstance(starts, list) else type(starts).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in starts):
            raise NpusimError(f"{p}: start_times must be finite numbers of seconds")
    if data.get("completed", len(ins)) != len(ins):
        raise NpusimError(f"{p}: completed {data['completed']} but {len(ins)} requests listed: "
                          f"failed requests cannot be replayed")
    return {"path": str(p), **data}


def bench_workload(bench: dict) -> dict[str, Any]:
    """The WorkloadSpec fields that replay a benchmark's requests."""
    where = bench.get("path", "bench")
    rate = bench.get("request_rate", "inf")
    if rate in ("inf", None) or (isinstance(rate, float) and math.isinf(rate)):
        rate = math.inf
    elif isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise NpusimError(f"{where}: request_rate must be a number > 0 or \"inf\", got {rate!r}")
    burst = bench.get("burstiness", 1.0)
    if burst is None:
        burst = 1.0
    if isinstance(burst, bool) or not isinstance(burst, (int, float)) or not (burst > 0 and math.isfinite(burst)):
        raise NpusimError(f"{where}: burstiness must be a number > 0 (vllm bench serve's gamma shape), got {burst!r}")
    wl: dict[str, Any] = {"input_lens": bench["input_lens"], "output_lens": bench["output_lens"],
                          "num_requests": len(bench["input_lens"]),
                          "rate": rate, "burstiness_cv": 1.0 / math.sqrt(burst),  # gamma shape -> CV
                          "max_concurrency": bench.get("max_concurrency")}
    if bench.get("start_times"):
        wl["start_times"] = bench["start_times"]
        del wl["rate"], wl["burstiness_cv"]  # (the send times say it all)
    elif math.isinf(rate):
        del wl["burstiness_cv"]  # (all at once: no gaps to shape)
    return wl


def _simulate(bench: dict, hw: str, model: str, engine: EngineConfig, profile_path: str, seed: int,
              server: dict | None = None) -> dict:
    from npusim.scenario import Scenario, run_scenario
    from npusim.workload import WorkloadSpec

    from npusim.specs import _validate

    workload = _validate(WorkloadSpec, bench_workload(bench), bench["path"])
    sc = Scenario(hw=hw, model=model, engine=engine.model_copy(update={"profile": profile_path}),
                  workload=workload, seed=seed, **(server or {}))
    result = run_scenario(sc)
    if result["completed"] != len(bench["input_lens"]):
        why = result["rejected"][0]["reason"] if result["rejected"] else "not all were scheduled"
        raise NpusimError(f"{bench['path']}: npusim completes {result['completed']} of its "
                          f"{len(bench['input_lens'])} requests ({why}): the server described by the flags "
                          "cannot serve this benchmark")
    return result


def _profile_with(base_mapping: dict, values: dict[str, float], where: Path) -> str:
    import yaml

    m = json.loads(json.dumps(base_mapping))
    for k, v in values.items():
        m[k] = {"value": float(v), "kind": "calibrated", "source": "being fitted"}
    where.write_text(yaml.safe_dump(m, sort_keys=False))
    return str(where)


def profile_mapping(profile: EngineProfile) -> dict:
    """An engine profile as the YAML mapping it loads from (numbers with kind and source)."""
    prov = profile.provenance
    d = profile.model_dump()
    out = {k: v for k, v in d.items() if k not in ("provenance", "kernels", "kernel_floor_us", "scheduler_defaults")}
    for f in ENGINE_NUMBER_FIELDS:
        if d[f] is None:  # (optional, not set)
            del out[f]
            continue
        out[f] = {"value": d[f], "kind": prov[f].kind, "source": prov[f].source}
    for group in ("kernels", "kernel_floor_us", "scheduler_defaults"):
        out[group] = {k: {"value": v, "kind": prov[f"{group}.{k}"].kind, "source": prov[f"{group}.{k}"].source}
                      for k, v in d[group].items()}
    return out


def fit_host_terms(benches: list[dict], *, hw: str, model: str, base: EngineProfile, engine: EngineConfig,
                   workdir: Path, seed: int = 0, server: dict | None = None) -> dict[str, Any]:
    """Least squares over the host terms; returns the fitted values, the residuals and their bounds.
    `engine`: the server's engine settings; `server`: its other scenario fields (dp, router)."""
    from scipy.optimize import least_squares

    names = ["host_per_iteration_ms", "host_per_sequence_us"]
    mode = engine.cudagraph_mode or base.graph_mode
    if base.execution != "graph" or (base.max_capture_tokens is not None
                                     and mode in ("none", "piecewise", "full_decode_only")):
        # launches the benchmarks can tell apart: every step of an eager engine's, and a vLLM
        # graph engine's when it launches decode or every step with prefill without its graph
        # (its default full_and_piecewise runs only the long prefill steps eagerly, behind their
        # kernels, so the fit would guess; the profile's value stays)
        names.append("dispatch_per_kernel_us")
    if (base.execution == "graph" and base.graph_update_per_layer_us is not None
            and mode in ("full", "full_and_piecewise", "full_decode_only")):
        # an engine that refreshes its replayed graphs' attention tasks on the host (vllm-ascend):
        # where decode replays whole graphs the benchmarks time that refresh when it outlasts
        # the replay (while it hides behind the replay the fit leaves the profile's value)
        names.append("graph_update_per_layer_us")
    mapping = profile_mapping(base)
    # start from the base profile's values, or a typical magnitude where it says 0 (a zero start
    # gives finite differences nothing to move)
    typical = {"host_per_iteration_ms": 1.0, "host_per_sequence_us": 50.0, "dispatch_per_kernel_us": 10.0,
               "graph_update_per_layer_us": 100.0}
    x0 = [getattr(base, n) or typical[n] for n in names]
    lo = [PARAMS[n][0] for n in names]
    hi = [PARAMS[n][1] for n in names]
    path = workdir / "fitting.yaml"

    def residuals(x):
        prof = _profile_with(mapping, dict(zip(names, x)), path)
        out = []
        for b in benches:
            r = _simulate(b, hw, model, engine, prof, seed, server)
            for key in METRICS:
                pred = r[key]
                out.append((pred / b[key] - 1.0) if pred else 1.0)
        return out

    fit = least_squares(residuals, x0, bounds=(lo, hi), diff_step=0.1, x_scale=x0, xtol=1e-4, ftol=1e-4,
                        max_nfev=60)
    return {"names": names, "values": [float(v) for v in fit.x], "residuals": [float(v) for v in fit.fun],
            "bounds": list(zip(lo, hi)), "cost": float(fit.cost)}


def predict(bench: dict, *, hw: str, model: str, base: EngineProfile, engine: EngineConfig, values: dict,
            workdir: Path, seed: int = 0, server: dict | None = None) -> dict[str, float]:
    prof = _profile_with(profile_mapping(base), values, workdir / "predict.yaml")
    r = _simulate(bench, hw, model, engine, prof, seed, server)
    return {k: r[k] for k in METRICS}


def calibrated_mapping(base: EngineProfile, names: list[str], values: list[float], files: list[str],
                       name: str, engine: EngineConfig | None = None, described: str = "") -> dict:
    """The calibrated profile: the base's, its host terms fitted, and the graph mode and capture
    size of the server the benchmarks ran against where they were given (its flags)."""
    m = profile_mapping(base)
    m["name"] = name
    m["description"] = f"{base.description}; host terms fitted to vllm bench serve results"
    shown = ", ".join(Path(f).name for f in files)
    if engine is not None and engine.cudagraph_mode is not None:
        m["graph_mode"] = engine.cudagraph_mode
    if engine is not None and engine.max_cudagraph_capture_size is not None:
        n = engine.max_cudagraph_capture_size  # (captured up to n whatever max_num_seqs: min(seqs x n, n))
        src = f"the server's max_cudagraph_capture_size {n} (calibrate serve --max-cudagraph-capture-size)"
        m["max_capture_tokens"] = {"value": n, "kind": "calibrated", "source": src}
        m["capture_tokens_per_seq"] = {"value": n, "kind": "calibrated", "source": src}
    for n, v in zip(names, values):
        m[n] = {"value": round(v, 4), "kind": "calibrated",
                "source": f"npusim calibrate serve: least squares on duration, mean TTFT, TPOT and ITL of {shown}"
                          + (f" (the server: {described})" if described else "")}
    return m
