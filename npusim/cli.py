"""The `npusim` command line. Every user error ends as one line on stderr and exit status 2."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from npusim.costmodel import CostModel, memory_plan
from npusim.errors import NpusimError
from npusim.specs import (MODEL_ZOO, EngineConfig, check_block_size, gib, known_hardware,
                          load_hardware, load_model)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="npusim: paged KV-cache memory and throughput of LLM serving on NPUs and GPUs.")
hw_app = typer.Typer(no_args_is_help=True, help="Hardware profiles.")
model_app = typer.Typer(no_args_is_help=True, help="Models.")
app.add_typer(hw_app, name="hw")
app.add_typer(model_app, name="model")

# wide enough that model and profile names are never cut when output is piped
console = Console(width=max(140, Console().width))

HW_OPT = typer.Option(..., "--hw", help="hardware profile name (see `npusim hw list`) or path to a .yaml")
MODEL_OPT = typer.Option(..., "--model", help="model name (see `npusim model list`) or path to a config.json")


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _engine(**kw) -> EngineConfig:
    from npusim.specs import _validate
    return _validate(EngineConfig, {k: v for k, v in kw.items() if v is not None}, "engine")


# --------------------------------------------------------------------------- step

@app.command()
def step(
    hw: str = HW_OPT,
    model: str = MODEL_OPT,
    phase: str = typer.Option("decode", "--phase", help="decode | prefill"),
    batch: int = typer.Option(1, "--batch", min=1, help="sequences in the iteration"),
    context: int = typer.Option(1024, "--context", min=1, help="decode: tokens of context per sequence"),
    prompt: int = typer.Option(1024, "--prompt", min=1, help="prefill: prompt tokens per sequence"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="KV page size in tokens (default: the device's recommended)"),
    weight_dtype: str = typer.Option("bf16", "--weight-dtype", help="bf16 | fp16 | int8 | int4"),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="bf16 | fp16 | int8"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Device time of one forward iteration: per-op FLOPs, bytes, time and bound."""
    if phase not in ("decode", "prefill"):
        raise NpusimError(f"--phase must be decode or prefill, got {phase!r}")
    h = load_hardware(hw)
    m = load_model(model)
    bs = block_size if block_size is not None else h.kv_block_sizes.recommended
    check_block_size(h, bs)
    eng = _engine(block_size=bs, weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    cm = CostModel(h, m, weight_dtype, kv_dtype)
    if phase == "decode":
        slots_per_seq = -(-context // bs) * bs
        args = dict(num_decodes=batch, decode_context_tokens=batch * context,
                    decode_kv_slots=batch * slots_per_seq)
        kv_tokens = batch * context
    else:
        args = dict(prefill_chunks=[(prompt, 0)] * batch)
        kv_tokens = batch * prompt
    ops = cm.ops(**args)
    step_s = sum(o.time_s for o in ops)
    plan = memory_plan(h, m, eng)
    need_blocks = batch * -(-(context if phase == "decode" else prompt) // bs)
    mem = plan.as_dict()
    mem["blocks_needed"] = need_blocks
    mem["batch_fits"] = plan.fits and need_blocks <= plan.num_blocks
    tokens = batch if phase == "decode" else batch * prompt
    if as_json:
        _print_json({
            "hw": h.name, "model": m.name, "phase": phase, "batch": batch,
            "context": context if phase == "decode" else None,
            "prompt": prompt if phase == "prefill" else None, "block_size": bs,
            "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
            "step_ms": step_s * 1e3, "host_overhead_ms": cm.host_overhead_s * 1e3,
            "tokens_per_s": tokens / (step_s + cm.host_overhead_s),
            "ops": [{"name": o.name, "flops": o.flops, "bytes": o.bytes, "time_ms": o.time_s * 1e3,
                     "bound": o.bound, "kernels": o.kernels} for o in ops],
            "memory": mem,
        })
        return
    what = f"decode, batch {batch}, context {context}" if phase == "decode" else f"prefill, batch {batch}, prompt {prompt}"
    t = Table(title=f"{m.name} on {h.name}: {what}, block {bs}, weights {weight_dtype}, KV {kv_dtype}")
    for col in ("op", "GFLOP", "MB", "time ms", "share", "bound"):
        t.add_column(col, justify="left" if col in ("op", "bound") else "right")
    for o in ops:
        t.add_row(o.name, f"{o.flops / 1e9:,.2f}", f"{o.bytes / 1e6:,.1f}", f"{o.time_s * 1e3:.3f}",
                  f"{o.time_s / step_s:.1%}", o.bound)
    console.print(t)
    console.print(f"device step: [bold]{step_s * 1e3:.3f} ms[/]   host overhead: {cm.host_overhead_s * 1e3:.3f} ms   "
                  f"throughput: {tokens / (step_s + cm.host_overhead_s):,.1f} tokens/s")
    console.print(f"memory: {plan.verdict}")
    if plan.fits and need_blocks > plan.num_blocks:
        console.print(f"[yellow]this batch needs {need_blocks} blocks ({kv_tokens} tokens) but only "
                      f"{plan.num_blocks} fit[/]")


# --------------------------------------------------------------------------- hw / model

@hw_app.command("list")
def hw_list() -> None:
    """Known hardware profiles."""
    t = Table()
    for col in ("name", "cores", "bf16 TFLOPS", "memory GiB", "GB/s", "TDP W", "description"):
        t.add_column(col)
    for name in known_hardware():
        h = load_hardware(name)
        t.add_row(name, str(h.ai_cores), f"{h.matmul_tflops_bf16:g}", f"{h.memory_gib:g}",
                  f"{h.memory_bandwidth_gbs:g}", f"{h.tdp_w:g}", h.description)
    console.print(t)


@hw_app.command("show")
def hw_show(name: str = typer.Argument(..., help="profile name or path"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """One profile, every number with its kind and source."""
    h = load_hardware(name)
    if as_json:
        _print_json(h.model_dump())
        return
    t = Table(title=f"{h.name}: {h.description}")
    for col in ("field", "value", "kind", "source"):
        t.add_column(col)
    for field, prov in h.provenance.items():
        t.add_row(field, f"{getattr(h, field):g}", prov.kind, prov.source)
    r = h.kv_block_sizes
    t.add_row("kv_block_sizes", f"{r.describe()}; recommended {r.recommended}", "datasheet", r.source)
    console.print(t)


@model_app.command("list")
def model_list() -> None:
    """Models in the zoo."""
    t = Table()
    for col in ("name", "params (B)", "layers", "hidden", "heads/kv", "KV KiB/token (bf16)", "context"):
        t.add_column(col)
    for name in MODEL_ZOO:
        m = load_model(name)
        t.add_row(name, f"{m.num_params / 1e9:.2f}", str(m.num_layers), str(m.hidden_size),
                  f"{m.num_heads}/{m.num_kv_heads}", f"{m.kv_bytes_per_token() / 1024:g}",
                  str(m.max_position_embeddings))
    console.print(t)


@model_app.command("show")
def model_show(name: str = typer.Argument(..., help="zoo name or path to a config.json"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """A model's shape and derived figures."""
    m = load_model(name)
    derived = {
        "num_params": m.num_params,
        "weight_gib": {d: round(gib(m.weight_bytes(d)), 3) for d in ("bf16", "int8", "int4")},
        "kv_bytes_per_token": {d: m.kv_bytes_per_token(d) for d in ("bf16", "int8")},
    }
    if as_json:
        _print_json({**m.model_dump(), **derived})
        return
    t = Table(title=m.name)
    t.add_column("field")
    t.add_column("value")
    for k, v in {**m.model_dump(), **derived}.items():
        t.add_row(k, str(v))
    console.print(t)


# --------------------------------------------------------------------------- entry point

def _cli_exceptions() -> tuple[type[BaseException], ...]:
    # typer >= 0.29 vendors click (typer._click); older typer raises click's own exceptions
    kinds: list[type[BaseException]] = [typer.TyperException]
    try:
        import click
        kinds.append(click.ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (no traceback) and return exit status 2."""
    try:
        app(args=argv, prog_name="npusim", standalone_mode=False)
    except NpusimError as e:
        print(f"npusim: error: {e}", file=sys.stderr)
        return 2
    except (typer.Exit,) as e:
        return e.exit_code
    except typer.Abort:
        print("npusim: aborted", file=sys.stderr)
        return 130
    except _cli_exceptions() as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            return 0
        print(f"npusim: error: {e.format_message()}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
