"""One self-contained HTML report of a simulation: KV use and batch size over time, latency
distributions, and a map of which request holds which KV page at the peak."""

from __future__ import annotations

import html
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from npusim.engine import InstanceRecord, LatencySummary, RunRecord
from npusim.errors import NpusimError
from npusim.specs import ceil_div
from npusim.text import result_lines


INSTANCE_COLOURS = (("#1f77b4", "#d62728"), ("#2ca02c", "#ff7f0e"), ("#9467bd", "#8c564b"), ("#17becf", "#e377c2"))


def _timeline_figure(run: RunRecord) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("KV cache: used fraction and waste", "Batch: running and waiting requests"))
    for inst in run.instances:
        pts = inst.timeline.series()
        t = [p[0] for p in pts]
        cap = [p[3] + p[4] + p[5] for p in pts]
        used = [p[3] / c if c else 0.0 for p, c in zip(pts, cap)]
        waste = [(p[1] - p[2]) / p[1] if p[1] else 0.0 for p in pts]
        tag = f"instance {inst.index}"
        colour = INSTANCE_COLOURS[inst.index % len(INSTANCE_COLOURS)]
        width = 2 + 2 * (len(run.instances) - 1 - inst.index)  # (the first widest: identical lines stay visible)
        fig.add_trace(go.Scatter(x=t, y=used, name=f"{tag}: used (share of the pool)", mode="lines",
                                 line=dict(color=colour[0], width=width)), row=1, col=1)
        fig.add_trace(go.Scatter(x=t, y=waste, name=f"{tag}: waste (share of its allocated slots)", mode="lines",
                                 line=dict(color=colour[1], dash="dot", width=width)), row=1, col=1)
        bt = inst.batch_series
        fig.add_trace(go.Scatter(x=[b[0] for b in bt], y=[b[1] for b in bt], name=f"{tag}: running",
                                 mode="lines", line=dict(color=colour[0], width=width)), row=2, col=1)
        fig.add_trace(go.Scatter(x=[b[0] for b in bt], y=[b[2] for b in bt], name=f"{tag}: waiting",
                                 mode="lines", line=dict(color=colour[1], dash="dot", width=width)), row=2, col=1)
    fig.update_xaxes(title_text="simulated time (s)", row=2, col=1)
    fig.update_yaxes(range=[0, 1.02], title_text="fraction", row=1, col=1)
    fig.update_yaxes(title_text="requests", row=2, col=1)
    fig.update_layout(height=620, margin=dict(t=50, l=60, r=20, b=40))
    return fig


def _histogram(summary: LatencySummary, name: str) -> go.Histogram:
    """Every request's latency, or past the summary's exact limit its 0.1 %-wide bins, in ms."""
    if summary.exact:
        return go.Histogram(x=[v * 1e3 for v in summary.values], nbinsx=60, name=name)
    centres, counts = summary.hist.bins()
    return go.Histogram(x=[c * 1e3 for c in centres], y=counts, histfunc="sum", nbinsx=60, name=name)


def _latency_figure(run: RunRecord) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT (ms)", "TPOT (ms)"))
    fig.add_trace(_histogram(run.ttft, "TTFT"), row=1, col=1)
    fig.add_trace(_histogram(run.tpot, "TPOT"), row=1, col=2)
    fig.update_xaxes(title_text="ms")
    fig.update_yaxes(title_text="requests", row=1, col=1)
    fig.update_layout(height=360, showlegend=False, margin=dict(t=50, l=60, r=20, b=50))
    return fig


MAX_MAP_CELLS = 4096  # past this many pages, the block map shows groups of consecutive pages


def _block_map_figure(inst: InstanceRecord) -> go.Figure | None:
    """Pages as a grid, coloured by the request holding them, at the instance's peak use."""
    if inst.block_map is None:
        return None
    t, tables = inst.block_map
    if inst.paged:
        n = inst.setup.plan.num_blocks
        unit = "block"
        owner = [-1] * n
        for rid, table in tables.items():
            for b in table:
                owner[b] = rid
    else:
        # Contiguous arena: one cell per block_size slots, coloured by the reservation covering it.
        n = max(1, inst.capacity_tokens // inst.block_size)
        unit = f"{inst.block_size}-slot cell"
        owner = [-1] * n
        for rid, (start, length) in tables.items():
            for cell in range(start // inst.block_size, min(n, ceil_div(start + length, inst.block_size))):
                owner[cell] = rid
    used = sum(o >= 0 for o in owner)
    total = n
    group = ceil_div(n, MAX_MAP_CELLS)  # (a large pool: each cell is `group` consecutive pages)
    if group > 1:
        cells = []
        for c in range(0, n, group):
            held = [o for o in owner[c:c + group] if o >= 0]
            cells.append(max(set(held), key=held.count) if held else -1)  # the cell's main holder
        owner, n = cells, len(cells)
        unit = f"{group} {unit}s"
    cols = max(16, int(math.ceil(math.sqrt(n * 2))))
    rows = ceil_div(n, cols)
    held, free, text = [], [], []
    for r in range(rows):
        hr, fr, tr = [], [], []
        for c in range(cols):
            i = r * cols + c
            o = owner[i] if i < n else None
            hr.append(None if o is None or o < 0 else (o * 2654435761) % 997)  # neighbouring ids apart
            fr.append(1 if o is not None and o < 0 else None)
            tr.append("" if o is None else f"{unit} {i}: " + ("free" if o < 0 else f"request {o}"))
        held.append(hr)
        free.append(fr)
        text.append(tr)
    fig = go.Figure([
        go.Heatmap(z=free, text=text, hoverinfo="text", colorscale=[[0, "#e4e4e4"], [1, "#e4e4e4"]],
                   showscale=False, xgap=1, ygap=1),
        go.Heatmap(z=held, text=text, hoverinfo="text", colorscale="Turbo", showscale=False, xgap=1, ygap=1)])
    per = f"; a cell is {unit}" if group > 1 else ""
    fig.update_layout(title=f"Instance {inst.index}: who holds which page at peak use<br><sup>t = {t:.2f} s: "
                            f"{used} of {total} held by {len(tables)} requests, one colour each; grey = free{per}</sup>",
                      height=min(900, 130 + 14 * rows), yaxis=dict(autorange="reversed", showticklabels=False),
                      xaxis=dict(showticklabels=False), margin=dict(t=70, l=20, r=20, b=20),
                      plot_bgcolor="white")
    return fig


def _summary_table(result: dict) -> str:
    """Every number of the result (npusim.text: the CLI and the dashboard show the same lines)."""
    rows, section = [], None
    for line in result_lines(result):
        if line.section != section:
            section = line.section
            rows.append(f'<tr><th colspan="3" style="text-align:left;padding-top:8px">{html.escape(section)}</th></tr>')
        rows.append(f"<tr><td>{html.escape(line.label)}</td><td>{html.escape(line.text(thousands=True))}</td>"
                    f"<td>{html.escape(line.unit)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def report_figures(run: RunRecord) -> list[go.Figure]:
    """The report's figures: KV use and batch over time, latency distributions, the block maps."""
    figs = [_timeline_figure(run), _latency_figure(run)]
    return figs + [f for f in (_block_map_figure(i) for i in run.instances) if f is not None]


def _settings_text(result: dict) -> list[str]:
    """The run's hardware, engine and workload settings, one line each."""
    sc = result["scenario"]
    eng, wl = sc["engine"], sc["workload"]
    kv = f"paged, block {eng['block_size']}" if eng["paging"] else f"contiguous ({sc['contiguous_policy']} reservation)"
    if wl.get("trace"):
        load = f"trace {Path(wl['trace']).name}" + (f" at {wl['rate']:g} req/s" if wl.get("rate") else "")
    else:
        rate = wl.get("rate")
        arrivals = "all at t=0" if rate is None or rate == float("inf") else f"Poisson {rate:g} req/s"
        lens = lambda d: str(d["value"]) if d["kind"] == "fixed" else d["kind"]  # noqa: E731
        load = f"{wl['num_requests']} requests, prompt {lens(wl['input_len'])}, output {lens(wl['output_len'])}, {arrivals}"
    return [
        f"Hardware: {result['hw']}; model {result['model']}; {sc['instances']} instance(s), sharing {sc['sharing']}",
        f"Engine: {result['engine_profile']} ({result['execution']}), {kv}, {result['batching']} batching, "
        f"max_num_seqs {eng['max_num_seqs']}, max_num_batched_tokens {eng['max_num_batched_tokens']}, "
        f"weights {eng['weight_dtype']}, KV {eng['kv_dtype']}, gpu_memory_utilization {eng['gpu_memory_utilization']:g}",
        f"Workload: {load}; seed {sc['seed']}",
        f"Result: {result['completed']} requests completed, {len(result['rejected'])} rejected",
        f"Memory: {result['memory']['verdict']}",
    ]


def report_html(result: dict, run: RunRecord) -> str:
    """The report as one HTML document; plotly's JavaScript is inlined so it opens anywhere, offline."""
    parts = [fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
             for i, fig in enumerate(report_figures(run))]
    title = f"npusim: {result['model']} on {result['hw']}"
    settings = "".join(f"<li>{html.escape(line)}</li>" for line in _settings_text(result))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} td{{padding:2px 12px}}
table{{border-collapse:collapse}} tr:nth-child(even){{background:#f4f4f4}}</style></head>
<body><h1>{html.escape(title)}</h1><ul>{settings}</ul>
{_summary_table(result)}
{''.join(parts)}
</body></html>"""


def write_report(path: str | Path, result: dict, run: RunRecord) -> Path:
    """Write the report (report_html) to an .html file."""
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise NpusimError(f"--report must name an .html file, got {p}")
    try:
        p.write_text(report_html(result, run))
    except OSError as e:
        raise NpusimError(f"cannot write report {p}: {e.strerror}") from None
    return p


def notebook_renderer() -> tuple[str, str | None]:
    """The plotly renderers for a notebook, and a note when static images cannot be made. The
    interactive figure goes out as plotly's mimetype (JupyterLab and VS Code draw it offline);
    where kaleido can draw with a local Chromium, a PNG goes beside it, which is what GitHub and
    nbviewer show. Chromium is found on the PATH (Debian's `chromium`) or at $BROWSER_PATH."""
    import os
    import shutil

    if os.environ.get("NPUSIM_NO_STATIC_FIGURES"):  # (the test suite: runs the notebooks, not the images)
        return "plotly_mimetype", "static images off: NPUSIM_NO_STATIC_FIGURES is set"
    try:
        import kaleido  # noqa: F401 - only whether it is there
    except ImportError:
        return "plotly_mimetype", ("figures are interactive only (GitHub shows none): static images need "
                                   "kaleido (pip install kaleido) and Chromium")
    browser = os.environ.get("BROWSER_PATH") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if browser is None:
        return "plotly_mimetype", "figures are interactive only (GitHub shows none): kaleido found no Chromium"
    os.environ["BROWSER_PATH"] = browser
    try:
        go.Figure(go.Bar(x=[1], y=[1])).to_image(format="png", width=50, height=50)
    except Exception as e:  # noqa: BLE001 - any failure of the external browser means no images
        return "plotly_mimetype", f"figures are interactive only: kaleido could not draw ({type(e).__name__})"
    return "plotly_mimetype+png", None
