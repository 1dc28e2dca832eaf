"""simulate's settings: the table from command-line flags to scenario fields, and the one place
where a scenario file (or the default scenario) and flags become a validated `Scenario`. The CLI,
`sweep` and `capacity` use it, so a flag means the same everywhere."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

from npusim.errors import NpusimError
from npusim.specs import CUDAGRAPH_MODES, KV_DTYPES, WEIGHT_DTYPES, _validate

if TYPE_CHECKING:  # (the simulator is imported by the commands that build a scenario, not by every one)
    from npusim.scenario import Scenario


def _parse_rate(text: str | float | None) -> float | None:
    if text is None or isinstance(text, float):  # (None: not given; a float: parsed already)
        return text
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        rate = float(text)
    except ValueError:
        raise NpusimError(f"--rate must be a number of requests/s or 'inf', got {text!r}") from None
    if not rate > 0 or math.isnan(rate):
        raise NpusimError(f"--rate must be > 0 (or 'inf'), got {text}")
    if math.isinf(rate):  # 1e309 overflows: it is not the 'inf' the user did not write
        raise NpusimError(f"--rate {text} is beyond a float: give a number of requests/s, or 'inf' for all at once")
    return rate


GOODPUT_KEYS = ("ttft", "tpot", "e2el")


def _parse_goodput(items: list[str]) -> dict[str, float]:
    """`--goodput ttft:500 tpot:50` (as vllm bench serve) -> {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    out: dict[str, float] = {}
    for item in (part for text in items for part in text.replace(",", " ").split()):
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise NpusimError(f"--goodput takes {' '.join(k + ':MS' for k in GOODPUT_KEYS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise NpusimError(f"--goodput {key}: milliseconds must be a number, got {value!r}") from None
        if not (ms > 0 and math.isfinite(ms)):
            raise NpusimError(f"--goodput {key}: milliseconds must be > 0, got {value}")
        if f"{key}_ms" in out:
            raise NpusimError(f"--goodput gives {key} twice")
        out[f"{key}_ms"] = ms
    if not out:
        raise NpusimError("--goodput needs at least one of ttft:MS tpot:MS e2el:MS")
    return out


def _fixed(n: int) -> dict:
    return {"kind": "fixed", "value": n}


def _flag(flag: bool) -> bool | None:
    return False if flag else None  # (a --no-... flag left off changes nothing)


# simulate's flags -> (section of the scenario, field, how the flag's value becomes the field's);
# None as the section: the scenario's top level. A flag left off (None) keeps the file's value.
SIMULATE_FIELDS: dict[str, tuple[str | None, str, Any]] = {
    "hw": (None, "hw", None), "model": (None, "model", None), "instances": (None, "instances", None),
    "sharing": (None, "sharing", None), "seed": (None, "seed", None),
    "contiguous_policy": (None, "contiguous_policy", None), "goodput": (None, "goodput", _parse_goodput),
    "engine": ("engine", "profile", None), "block_size": ("engine", "block_size", None),
    "max_num_seqs": ("engine", "max_num_seqs", None),
    "max_num_batched_tokens": ("engine", "max_num_batched_tokens", None),
    "gpu_memory_utilization": ("engine", "gpu_memory_utilization", None),
    "num_blocks": ("engine", "num_blocks", None), "max_model_len": ("engine", "max_model_len", None),
    "weight_dtype": ("engine", "weight_dtype", None), "kv_dtype": ("engine", "kv_dtype", None),
    "tp": ("engine", "tensor_parallel_size", None), "ep": ("engine", "expert_parallel_size", None),
    "pp": ("engine", "pipeline_parallel_size", None),
    "expert_imbalance": ("engine", "expert_imbalance", None),
    "dp": (None, "dp", None), "router": (None, "router", None),
    "batching": ("engine", "batching", None), "no_paging": ("engine", "paging", _flag),
    "no_chunked_prefill": ("engine", "enable_chunked_prefill", _flag),
    "prefix_caching": ("engine", "enable_prefix_caching", None),
    "preemption": ("engine", "preemption_mode", None),
    "cudagraph_mode": ("engine", "cudagraph_mode", None),
    "max_cudagraph_capture_size": ("engine", "max_cudagraph_capture_size", None),
    "requests": ("workload", "num_requests", None), "input_len": ("workload", "input_len", _fixed),
    "output_len": ("workload", "output_len", _fixed), "rate": ("workload", "rate", _parse_rate),
    "burstiness": ("workload", "burstiness_cv", None),
    "max_concurrency": ("workload", "max_concurrency", None), "trace": ("workload", "trace", None),
    "shared_prefix_len": ("workload", "shared_prefix_len", None),
}
CHOICES = {"sharing": ("time-slice", "vnpu"), "preemption": ("recompute", "swap"),
           "router": ("round-robin", "least-outstanding", "prefix-aware"),
           "cudagraph_mode": CUDAGRAPH_MODES, "weight_dtype": WEIGHT_DTYPES, "kv_dtype": KV_DTYPES}


def build_scenario(scenario_file: str | None, flags: dict) -> "Scenario":
    """The scenario file (or the default scenario) with the given command-line flags applied,
    validated by the scenario's own rules (the same as for a file or the Python API)."""
    return apply_flags(scenario_data(scenario_file), flags, scenario_file or "settings")


def scenario_data(scenario_file: str | None) -> dict:
    """What a scenario file gives (paths made absolute; defaults left to the specs), or {}."""
    from npusim.scenario import Scenario, load_scenario

    if scenario_file is not None and not scenario_file.strip():
        raise NpusimError("the scenario file name is empty")
    base = load_scenario(scenario_file) if scenario_file else Scenario()
    return base.model_dump(exclude_unset=True)


def apply_flags(data: dict, flags: dict, where: str) -> "Scenario":
    """`data` (a scenario's given fields) with `flags` (SIMULATE_FIELDS' keys; None: not given)
    applied, validated; `where` names the source in error messages. `data` is not changed."""
    from npusim.scenario import Scenario

    unknown = set(flags) - set(SIMULATE_FIELDS)
    if unknown:
        raise AssertionError(f"flags without a scenario field: {sorted(unknown)}")
    for key, allowed in CHOICES.items():
        if flags.get(key) is not None and flags[key] not in allowed:
            raise NpusimError(f"--{key.replace('_', '-')} must be {' or '.join(allowed)}, got {flags[key]!r}")
    data = copy.deepcopy(data)
    data.setdefault("engine", {})
    wl = data.setdefault("workload", {})
    if flags.get("trace") is not None or wl.get("trace") is not None:
        for key in ("input_len", "output_len"):
            if flags.get(key) is not None:
                raise NpusimError(f"--{key.replace('_', '-')} would be ignored: the trace gives the lengths")
            wl.pop(key, None)  # (the trace's, not a default's)
        if flags.get("trace") is not None:  # a new trace brings its own count and times
            wl.pop("num_requests", None)
            wl.pop("rate", None)
    if wl.get("input_lens") is not None:
        wl.pop("input_len", None)
        wl.pop("output_len", None)
    for key, value in flags.items():
        if isinstance(value, str) and not value.strip():
            raise NpusimError(f"--{key.replace('_', '-')} is empty")
    if flags.get("contiguous_policy") is not None and not flags.get("no_paging") and data["engine"].get("paging", True):
        raise NpusimError("--contiguous-policy applies to a contiguous reservation: it needs --no-paging")
    for key, value in flags.items():
        section, field, convert = SIMULATE_FIELDS[key]
        if convert is not None and value is not None:
            value = convert(value)
        if value is None:
            continue
        (data if section is None else data[section])[field] = value
    return _validate(Scenario, data, where)
