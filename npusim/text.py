"""How a simulation's result reads: one list of every number `simulate` reports, with its label,
unit and format, which the CLI (in the shape of `vllm bench serve`), the dashboard and the HTML
report all render, so the three never disagree on a name or a digit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Line:
    section: str
    label: str
    value: Any  # a number, a text, or None (not defined for this run)
    spec: str = ".2f"  # how a number is written
    unit: str = ""

    def text(self, thousands: bool = False) -> str:
        """The value as text; `thousands` adds separators (for reading, not for parsing)."""
        if self.value is None:
            return "n/a"
        if isinstance(self.value, str):
            return self.value
        spec = "," + self.spec if thousands and not self.spec.startswith(",") and self.spec[-1] in "fd" else self.spec
        return format(self.value, spec)


SERVING = "Serving Benchmark Result"
TTFT, TPOT = "Time to First Token", "Time per Output Token (excl. 1st token)"
ITL, E2EL = "Inter-token Latency", "End-to-end Latency"
SETUP, KV, ENERGY = "npusim: setup", "npusim: KV cache", "npusim: energy"


def result_lines(r: dict) -> list[Line]:
    """Every line of a `simulate --json` result, in vllm bench serve's order, then npusim's."""
    kv, en, sc = r["kv_cache"], r["energy"], r["scenario"]
    par = r.get("parallel") or {"devices": 1}  # (a result saved before it was reported)
    eng = sc["engine"]
    mode = ("paged" if eng["paging"] else f"contiguous ({sc['contiguous_policy']} reservation)") + \
        f", {r['batching']} batching"
    lines = [
        Line(SERVING, "Successful requests", r["completed"], "d"),
        Line(SERVING, "Rejected requests", len(r["rejected"]), "d"),
        Line(SERVING, "Benchmark duration", r["duration"], unit="s"),
        Line(SERVING, "Total input tokens", r["total_input_tokens"], "d"),
        Line(SERVING, "Total generated tokens", r["total_output_tokens"], "d"),
        Line(SERVING, "Request throughput", r["request_throughput"], unit="req/s"),
        Line(SERVING, "Output token throughput", r["output_throughput"], unit="tok/s"),
        Line(SERVING, "Total Token throughput", r["total_token_throughput"], unit="tok/s"),
    ]
    if r["request_goodput"] is not None:
        lines.append(Line(SERVING, "Request goodput", r["request_goodput"], unit="req/s"))
    lines.append(Line(SERVING, "Max concurrent requests", r["max_concurrent_requests"], "d"))
    for section, key, name in ((TTFT, "ttft", "TTFT"), (TPOT, "tpot", "TPOT"), (ITL, "itl", "ITL"),
                               (E2EL, "e2el", "E2EL")):
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(Line(section, f"{label} {name}", r[f"{stat}_{key}_ms"], unit="ms"))
    lines += [
        Line(SETUP, "Device / model", f"{r['hw']} / {r['model']}"),
        Line(SETUP, "Instances / sharing", f"{sc['instances']} / {sc['sharing']}"),
        Line(SETUP, "Engine", f"{r['engine_profile']} ({r['execution']})"),
        *([Line(SETUP, "Devices (tp x dp x pp)", f"{par['devices']} ({par['tensor_parallel_size']} x "
               f"{par['data_parallel_size']} x {par['pipeline_parallel_size']})"
               + (f", experts over {par['expert_parallel_size']}" if par["expert_parallel_size"] > 1 else "")
               + (", ranks in lock step" if par.get("lock_step") else ""))] if par["devices"] > 1 else []),
        Line(SETUP, "KV cache", mode),
        Line(SETUP, "Memory per instance", r["memory"]["verdict"]),
        Line(KV, "Block size", kv["block_size"], "d", "tokens"),
        Line(KV, "Blocks (all instances)", kv["num_blocks"], "d"),
        Line(KV, "Capacity (all instances)", kv["capacity_tokens"], "d", "tokens"),
        Line(KV, "Peak / mean used fraction", f"{kv['peak_used_fraction']:.3f} / {kv['mean_used_fraction']:.3f}"),
        Line(KV, "Mean waste fraction", kv["mean_waste_fraction"], ".4f"),
        Line(KV, "Peak waste fraction", kv["peak_waste_fraction"], ".4f"),
        Line(KV, "Preemptions / swaps", f"{kv['preemptions']} / {kv['swaps']}"),
        Line(KV, "Prefix-cache hit rate", kv["prefix_cache_hit_rate"], ".3f"),
        Line(ENERGY, "Energy", en["joules"], ".1f", "J"),
        Line(ENERGY, "Output tokens per joule", en["tokens_per_joule"], ".3f"),
        Line(ENERGY, "Mean power", en["mean_power_w"], ".1f", "W"),
    ]
    return lines


def rejection_lines(r: dict, most: int = 5) -> list[str]:
    """The commonest reasons requests were rejected, with their counts."""
    reasons: dict[str, int] = {}
    for item in r["rejected"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    return [f"rejected {n}: {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:most]]


def overload_warning(r: dict) -> str | None:
    """One line when the arrivals outran the service (see scenario.load_check), else None."""
    load = r.get("load") or {}
    if not load.get("overloaded"):
        return None
    why = ""
    seqs = r["scenario"]["engine"].get("max_num_seqs")
    if seqs and any(p["max_batch"] >= seqs for p in r.get("per_instance", [])) and \
            r["kv_cache"]["peak_used_fraction"] < 0.9:
        why = f"; the batch is capped at max_num_seqs {seqs} with the KV pool at most {r['kv_cache']['peak_used_fraction']:.0%} used"
    if load.get("served_fraction") is None:  # (a run too short for a steady state)
        return (f"overloaded: {load['offered_rate']:.2f} req/s arrived and a quarter of the requests or more "
                f"were still waiting to start at the last arrival ({r['request_throughput']:.2f} req/s served "
                f"over the run){why}; latencies grow with the run's length")
    return (f"overloaded: after the warm-up {load['offered_rate']:.2f} req/s arrived and "
            f"{load['served_fraction'] * load['offered_rate']:.2f} completed ({load['served_fraction']:.0%}); "
            f"requests in the system {load['in_system_first_half']:.0f} then {load['in_system_second_half']:.0f}"
            f"{why}; latencies grow with the run's length")


def format_summary(r: dict) -> str:
    """The result as `vllm bench serve` prints its "Serving Benchmark Result", then npusim's extras."""
    out, section = [], None
    for line in result_lines(r):
        if line.section != section:
            section = line.section
            title = f" {section} " if section in (SERVING, SETUP, KV, ENERGY) else section
            out.append(title.center(50, "=" if section == SERVING else "-"))
        label = f"{line.label} ({line.unit}):" if line.unit else f"{line.label}:"
        out.append(f"{label:<40}{line.text():<10}")
    out.append("=" * 50)
    out += rejection_lines(r)
    warning = overload_warning(r)
    if warning:
        out.append(f"warning: {warning}")
    out.append(f"(simulated in {r['wall_seconds']:.2f} s of wall time)")
    return "\n".join(out)


def hardware_rows(h) -> list[tuple[str, str, str, str]]:
    """A hardware profile as (field, value, kind, source) rows: every number with its provenance."""
    rows = [(field, f"{getattr(h, field):g}", prov.kind, prov.source) for field, prov in h.provenance.items()]
    rows.append(("link_topology", h.link_topology, "-", "full-mesh or switch: a collective in 2 steps; ring: 2(N-1)"))
    rows.append(("default_engine", h.default_engine, "-", "the engine profile used when none is named"))
    return rows


def engine_rows(e) -> list[tuple[str, str, str, str]]:
    """An engine profile as (field, value, kind, source) rows."""
    r = e.kv_block_sizes
    rows = [("attention_backend", e.attention_backend, "-", ""),
            ("kv_block_sizes", f"{r.describe()}; recommended {r.recommended}", "-", r.source)]
    if e.execution == "graph":  # which steps replay graphs (capture sizes among the numbers below)
        rows.append(("graph_mode", e.graph_mode, "-", "vLLM's cudagraph_mode (full: every step one graph, any size)"))
    for field in ("decode_attention_impl", "mla_decode_attention_impl"):  # measured kernels the tables hold
        if getattr(e, field):
            rows.append((field, getattr(e, field), "-", "the device's calibration table of that name"))
    for field, prov in e.provenance.items():
        head, _, key = field.partition(".")
        value = getattr(e, head)  # a plain number, or one entry of a mapping (kernels.qkv_proj)
        value = value[key] if key else value
        rows.append((field, f"{value:g}", prov.kind, prov.source))
    return rows
