"""Requests: synthetic lengths and arrivals, or a replayed trace (the Azure LLM inference format)."""

from __future__ import annotations

import csv
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from npusim.errors import NpusimError
from npusim.specs import read_text_file

if TYPE_CHECKING:  # numpy is imported where lengths or arrivals are drawn: a trace replay needs none
    import numpy as np


@dataclass(slots=True)
class RequestSpec:
    """What arrives: when, how long its prompt is, how many tokens it will generate, and which
    shared prefix (e.g. a system prompt) its prompt starts with."""

    id: int
    arrival: float
    prompt_len: int
    output_len: int
    prefix_group: int = -1  # -1: no shared prefix
    prefix_len: int = 0


MAX_TOKENS = 10**9  # a sanity bound on any one length (the longest contexts are ~10^7)
MAX_REQUESTS = 10**9


class LengthDist(BaseModel):
    """A token-length distribution: fixed, uniform [low, high], lognormal (mean, cv) clipped to
    [low, high], or a ShareGPT-like mix."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["fixed", "uniform", "lognormal", "sharegpt"] = "fixed"
    value: int = Field(default=512, gt=0, le=MAX_TOKENS)
    low: int = Field(default=1, gt=0, le=MAX_TOKENS)
    high: int = Field(default=4096, gt=0, le=MAX_TOKENS)
    mean: float = Field(default=512.0, gt=0, le=MAX_TOKENS, allow_inf_nan=False)
    cv: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> "LengthDist":
        # a field of another kind would be ignored (sharegpt is a fixed published mix)
        uses = {"fixed": {"value"}, "uniform": {"low", "high"}, "lognormal": {"mean", "cv", "low", "high"},
                "sharegpt": set()}[self.kind]
        stray = sorted(self.model_fields_set - uses - {"kind"})
        if stray:
            raise ValueError(f"{', '.join(stray)} would be ignored by a {self.kind} length "
                             f"(it takes {', '.join(sorted(uses)) or 'nothing else'})")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


# ShareGPT-like (prompt, output) mixes, from the published ShareGPT V3 length statistics used by
# vLLM's benchmarks: prompts lognormal around ~250 tokens with a long tail, outputs around ~200.
SHAREGPT_PROMPT = dict(mean=250.0, cv=1.6, low=4, high=4096)
SHAREGPT_OUTPUT = dict(mean=210.0, cv=1.1, low=4, high=2048)


def sample_lengths(dist: LengthDist, n: int, rng: "np.random.Generator", role: str) -> "np.ndarray":
    import numpy as np

    if dist.kind == "fixed":
        return np.full(n, dist.value, dtype=np.int64)
    if dist.kind == "uniform":
        return rng.integers(dist.low, dist.high + 1, size=n, dtype=np.int64)
    if dist.kind == "sharegpt":
        params = SHAREGPT_PROMPT if role == "prompt" else SHAREGPT_OUTPUT
        mean, cv, low, high = params["mean"], params["cv"], params["low"], params["high"]
    else:
        mean, cv, low, high = dist.mean, dist.cv, dist.low, dist.high
    sigma = math.sqrt(math.log(1.0 + cv * cv))
    mu = math.log(mean) - sigma * sigma / 2.0
    # Clipping, not resampling, keeps the draw count fixed and so the stream reproducible.
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), low, high).astype(np.int64)


class WorkloadSpec(BaseModel):
    """Where requests come from. A trace gives lengths and arrival times; otherwise lengths are
    drawn from distributions and arrivals from a process (Poisson, gamma with a CV, or all at t=0).
    The defaults (500 ShareGPT-like requests at 8/s) are the same however a workload is given: flags,
    a scenario file, or Python."""

    model_config = ConfigDict(extra="forbid")
    num_requests: int | None = Field(default=500, gt=0, le=MAX_REQUESTS, description="None with a trace: all its rows")
    input_len: LengthDist = Field(default_factory=lambda: LengthDist(kind="sharegpt"))
    output_len: LengthDist = Field(default_factory=lambda: LengthDist(kind="sharegpt"))
    rate: float | None = Field(default=8.0, gt=0, description=(
        "requests/s; inf = all at t=0; None = the trace's own times (inf without a trace); "
        "a trace without a rate keeps its own times"))
    burstiness_cv: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="CV of inter-arrival gaps; 1 = Poisson")
    max_concurrency: int | None = Field(default=None, gt=0)
    trace: str | None = None
    # per-request lengths (and optionally send times), as a `vllm bench serve --save-detailed`
    # result lists them: replayed one for one
    input_lens: list[int] | None = Field(default=None, min_length=1)
    output_lens: list[int] | None = Field(default=None, min_length=1)
    start_times: list[float] | None = Field(default=None, min_length=1)
    shared_prefix_len: int = Field(default=0, ge=0, le=MAX_TOKENS, description="tokens of a shared system prompt")
    shared_prefix_groups: int = Field(default=1, gt=0)
    shared_prefix_fraction: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _listed_defaults(cls, data: Any) -> Any:
        # A trace (or a list of requests) brings its own count and times: the defaults for drawn
        # requests do not apply unless asked for.
        if isinstance(data, dict):
            for key in ("num_requests", "max_concurrency", "shared_prefix_len", "shared_prefix_groups"):
                if isinstance(data.get(key), bool):
                    raise ValueError(f"{key} must be a whole number, got {data[key]!r}")
        if isinstance(data, dict) and (data.get("trace") is not None or data.get("input_lens") is not None):
            data = dict(data)
            data.setdefault("rate", None)
            data.setdefault("num_requests", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> "WorkloadSpec":
        given = self.model_fields_set
        if self.input_lens is not None:
            if self.trace is not None:
                raise ValueError("give a trace or input_lens, not both")
            if self.num_requests is not None and self.num_requests != len(self.input_lens):
                raise ValueError(f"num_requests {self.num_requests} but input_lens lists {len(self.input_lens)}")
            if self.start_times is not None and "rate" in given and self.rate is not None:
                raise ValueError("rate would be ignored: start_times give the arrivals")
            if self.start_times is not None and not all(math.isfinite(t) for t in self.start_times):
                raise ValueError("start_times must be finite")
        elif self.output_lens is not None or self.start_times is not None:
            raise ValueError("output_lens and start_times need input_lens")
        if self.input_lens is None and self.trace is None and self.num_requests is None:
            raise ValueError("num_requests is required without a trace")
        if (self.shared_prefix_len and self.input_lens is None and self.trace is None
                and self.input_len.kind == "fixed" and self.shared_prefix_len > self.input_len.value):
            raise ValueError(f"shared_prefix_len {self.shared_prefix_len} is longer than every prompt "
                             f"({self.input_len.value} tokens)")
        if self.burstiness_cv != 1.0 and (self.rate is None or math.isinf(self.rate)):
            raise ValueError(f"burstiness_cv {self.burstiness_cv} would be ignored: it shapes the gaps of a "
                             "finite rate (with a trace's own times or rate inf there are none)")
        for source, what in ((self.trace, "a trace"), (self.input_lens, "input_lens")):
            if source is not None:
                clash = [k for k in ("input_len", "output_len") if k in given]
                if clash:
                    raise ValueError(f"{' and '.join(clash)} would be ignored: {what} gives the lengths")
        return self


def arrival_times(n: int, rate: float, cv: float, rng: "np.random.Generator") -> "np.ndarray":
    """Arrival instants: gamma-distributed gaps with mean 1/rate and the given CV (CV 1 = Poisson)."""
    import numpy as np

    if math.isinf(rate):
        return np.zeros(n)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
# The same three columns as a per-request export of a `vllm bench serve --save-detailed` run
# names them (start_times, input_lens, output_lens): one row per request.
TRACE_ALIASES = (("arrived_at", "start_time"), ("num_prefill_tokens", "input_len"),
                 ("num_decode_tokens", "output_len"))


def _trace_column(p: Path, header: list[str], names: tuple[str, ...]) -> int | None:
    found = [n for n in names if n in header]
    if len(found) > 1:
        raise NpusimError(f"{p}: line 1: columns {' and '.join(found)} mean the same; keep one")
    return header.index(found[0]) if found else None


def _token_count(p: Path, line: int, column: str, text: str) -> int:
    """A whole, positive token count ("12" or "12.0"); anything else names the file, line and column."""
    try:
        v = float(text)
    except ValueError:
        raise NpusimError(f"{p}: line {line}: {column} must be a number, got {text!r}") from None
    if not math.isfinite(v) or v != int(v) or v < 1:
        raise NpusimError(f"{p}: line {line}: {column} must be a whole number of tokens >= 1, got {text!r}")
    if v > MAX_TOKENS:
        raise NpusimError(f"{p}: line {line}: {column} must be at most {MAX_TOKENS:.0e} tokens, got {text!r}")
    return int(v)


def read_trace(path: str | Path, limit: int | None = None) -> list[tuple[float | None, int, int]]:
    """Rows of (arrival s, prompt tokens, output tokens) from a CSV with the Azure trace columns
    (or their vLLM-bench names: start_time, input_len, output_len). A file without a time column
    gives None for every arrival (the caller must then supply an arrival process). Every problem
    raises an error naming the file and line."""
    p = Path(path)
    if not p.exists():
        raise NpusimError(f"trace file not found: {p}")
    if not p.is_file():
        raise NpusimError(f"trace {p} is not a file")
    text = read_text_file(p).removeprefix("\ufeff")  # (a byte-order mark is not part of the first column)
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        raise NpusimError(f"{p}: empty trace file") from None
    header = [h.strip() for h in header]
    dup = sorted({h for h in header if h and header.count(h) > 1})
    if dup:
        raise NpusimError(f"{p}: line 1: column {dup[0]} appears {header.count(dup[0])} times")
    ia, ip, io = (_trace_column(p, header, names) for names in TRACE_ALIASES)
    missing = [" or ".join(names) for names, i in zip(TRACE_ALIASES[1:], (ip, io)) if i is None]
    if missing:
        raise NpusimError(f"{p}: line 1: missing column(s) {', '.join(missing)}; "
                          f"expected {', '.join(TRACE_COLUMNS)} (arrived_at may be left out)")
    cols = tuple(header[i] if i is not None else "" for i in (ia, ip, io))
    rows: list[tuple[float | None, int, int]] = []
    last = -math.inf
    for line, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if limit is not None and len(rows) >= limit:
            break
        if len(row) != len(header):
            raise NpusimError(f"{p}: line {line}: {len(row)} fields, the header has {len(header)}")
        t = None
        if ia is not None:
            try:
                t = float(row[ia])
            except ValueError:
                raise NpusimError(f"{p}: line {line}: {cols[0]} must be a number, got {row[ia]!r}") from None
            if not math.isfinite(t) or t < 0:
                raise NpusimError(f"{p}: line {line}: {cols[0]} must be a time >= 0, got {row[ia]!r}")
            if t < last:
                raise NpusimError(f"{p}: line {line}: {cols[0]} goes back in time ({t} < {last})")
            last = t
        rows.append((t, _token_count(p, line, cols[1], row[ip].strip()),
                     _token_count(p, line, cols[2], row[io].strip())))
    if not rows:
        raise NpusimError(f"{p}: no requests in the trace")
    if limit is not None and len(rows) < limit:
        raise NpusimError(f"{p}: --requests {limit} asks for the first {limit} requests, the trace has "
                          f"{len(rows)}")
    return rows


def _compact(typecode: str, values) -> array:
    """A stdlib array of 8-byte numbers from a list or a numpy array (without a list in between)."""
    if hasattr(values, "astype"):  # numpy
        out = array(typecode)
        out.frombytes(values.astype("float64" if typecode == "d" else "int64").tobytes())
        return out
    return array(typecode, values)


class RequestStream:
    """The requests of a workload, made one at a time from compact per-request arrays (a few bytes
    each), so that a million-request run never holds a million request objects."""

    def __init__(self, arrivals, prompts, outputs, prefix_groups=None, prefix_lens=None):
        self.arrivals = _compact("d", arrivals)
        self.prompts = _compact("q", prompts)
        self.outputs = _compact("q", outputs)
        self.prefix_groups = None if prefix_groups is None else _compact("q", prefix_groups)
        self.prefix_lens = None if prefix_lens is None else _compact("q", prefix_lens)

    def __len__(self) -> int:
        return len(self.arrivals)

    def __iter__(self):
        rows = zip(self.arrivals, self.prompts, self.outputs)
        if self.prefix_groups is None:
            for i, (t, p, o) in enumerate(rows):
                yield RequestSpec(i, t, p, o)
            return
        for i, ((t, p, o), g, n) in enumerate(zip(rows, self.prefix_groups, self.prefix_lens)):
            yield RequestSpec(i, t, p, o, g, n)


def _listed_requests(spec: WorkloadSpec, seed: int) -> RequestStream:
    """Requests of given lengths: at their start times if listed, else by the arrival process."""
    ins, outs = spec.input_lens, spec.output_lens
    if outs is None or len(outs) != len(ins):
        raise NpusimError(f"workload: input_lens ({len(ins)}) and output_lens "
                          f"({'none' if outs is None else len(outs)}) must list the same requests")
    if any(n < 1 for n in ins) or any(n < 1 for n in outs):
        raise NpusimError("workload: input_lens and output_lens must be >= 1")
    if spec.start_times is not None:
        if len(spec.start_times) != len(ins):
            raise NpusimError(f"workload: start_times ({len(spec.start_times)}) must list the "
                              f"{len(ins)} requests")
        t0 = min(spec.start_times)
        arrivals = [t - t0 for t in spec.start_times]
        order = sorted(range(len(ins)), key=arrivals.__getitem__)
        return RequestStream([arrivals[i] for i in order], [ins[i] for i in order], [outs[i] for i in order])
    import numpy as np

    rate = math.inf if spec.rate is None else spec.rate
    arrivals = arrival_times(len(ins), rate, spec.burstiness_cv, np.random.default_rng(seed))
    return RequestStream(arrivals, ins, outs)


def make_requests(spec: WorkloadSpec, seed: int) -> RequestStream:
    """The request stream of a workload. The same spec and seed give the same stream."""
    if spec.input_lens is not None:
        return _listed_requests(spec, seed)
    if spec.trace:
        rows = read_trace(spec.trace, spec.num_requests)
        if rows[0][0] is None and spec.rate is None and not spec.max_concurrency:
            raise NpusimError(f"{spec.trace}: the trace has no arrived_at column: give it a rate "
                              "(--rate; simulate also takes a closed loop, --max-concurrency)")
    if spec.trace and spec.rate is None and rows[0][0] is not None and not spec.shared_prefix_len:
        t0 = rows[0][0]  # the trace as it is: nothing to draw
        return RequestStream([r[0] - t0 for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    import numpy as np

    rng = np.random.default_rng(seed)
    if spec.trace:
        n = len(rows)
        if spec.rate is None and rows[0][0] is not None:
            t0 = rows[0][0]
            arrivals = [r[0] - t0 for r in rows]
        else:  # the trace's lengths with a chosen arrival process (a closed loop: all at once)
            rate = math.inf if spec.rate is None else spec.rate
            arrivals = arrival_times(n, rate, spec.burstiness_cv, rng)
        prompts = np.array([r[1] for r in rows], dtype=np.int64)
        outputs = [r[2] for r in rows]
    else:
        n = spec.num_requests or 200
        prompts = sample_lengths(spec.input_len, n, rng, "prompt")
        outputs = sample_lengths(spec.output_len, n, rng, "output")
        rate = math.inf if spec.rate is None else spec.rate
        arrivals = arrival_times(n, rate, spec.burstiness_cv, rng)
    groups = lens = None
    if spec.shared_prefix_len:
        shares = rng.random(n) < spec.shared_prefix_fraction
        drawn = rng.integers(0, spec.shared_prefix_groups, size=n)
        groups = np.where(shares, drawn, -1)
        lens = np.where(shares, np.minimum(spec.shared_prefix_len, prompts), 0)
    return RequestStream(arrivals, prompts, outputs, groups, lens)
