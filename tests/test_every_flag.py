"""Every `npusim simulate` flag takes effect: given a value other than its default, the JSON changes
the way the flag says (a flag that is parsed but ignored fails here)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli

BASE = ["--requests", "6", "--input-len", "300", "--output-len", "8", "--rate", "inf", "--json"]


def _run(*args: str) -> dict:
    argv = list(BASE)
    for flag in [a for a in args if a.startswith("--")]:  # a flag given replaces the base's
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    rc, out, err = run_cli("simulate", *argv, *args)
    assert rc == 0, err
    return json.loads(out)


BASELINE = None


def _base() -> dict:
    global BASELINE
    if BASELINE is None:
        BASELINE = _run()
    return BASELINE


EFFECTS = {
    "--hw": (["--hw", "h200"], lambda d, b: d["hw"] == "h200" and d["duration"] < b["duration"]),
    "--model": (["--model", "llama-3.2-1b"], lambda d, b: d["model"] == "llama-3.2-1b" and d["duration"] < b["duration"]),
    "--requests": (["--requests", "4"], lambda d, b: d["completed"] == 4),
    "--input-len": (["--input-len", "100"], lambda d, b: d["total_input_tokens"] == 600),
    "--output-len": (["--output-len", "5"], lambda d, b: d["total_output_tokens"] == 30),
    "--rate": (["--rate", "0.5"], lambda d, b: d["duration"] > 5 * b["duration"]),
    "--burstiness": (["--rate", "2", "--burstiness", "4"],
                     lambda d, b: d["scenario"]["workload"]["burstiness_cv"] == 4
                     and d["duration"] != _run("--rate", "2")["duration"]),
    "--max-concurrency": (["--max-concurrency", "1"], lambda d, b: d["max_concurrent_requests"] == 1),
    "--block-size": (["--engine", "mindie", "--block-size", "16"], lambda d, b: d["kv_cache"]["block_size"] == 16),
    "--max-num-seqs": (["--max-num-seqs", "2"], lambda d, b: d["per_instance"][0]["max_batch"] == 2),
    "--max-num-batched-tokens": (["--max-num-batched-tokens", "256"],
                                 lambda d, b: d["per_instance"][0]["iterations"] > b["per_instance"][0]["iterations"]),
    "--gpu-memory-utilization": (["--gpu-memory-utilization", "0.6"],
                                 lambda d, b: d["kv_cache"]["num_blocks"] < b["kv_cache"]["num_blocks"]),
    "--num-blocks": (["--num-blocks", "500"], lambda d, b: d["kv_cache"]["num_blocks"] == 500),
    "--max-model-len": (["--max-model-len", "2048"], lambda d, b: d["max_model_len"] == 2048),
    "--instances": (["--instances", "2"], lambda d, b: len(d["per_instance"]) == 2),
    "--sharing": (["--instances", "2", "--sharing", "vnpu"],
                  lambda d, b: d["scenario"]["sharing"] == "vnpu"
                  and [p["ai_cores"] for p in d["per_instance"]] == [12, 12]),  # 24 cores, split
    "--tp": (["--tp", "2", "--hw", "h200"], lambda d, b: d["parallel"]["devices"] == 2
             and d["energy"]["mean_power_w"] > 1.5 * _run("--hw", "h200")["energy"]["mean_power_w"]
             and d["memory"]["weights_gib"] < 0.51 * _run("--hw", "h200")["memory"]["weights_gib"]),
    "--ep": (["--ep", "2", "--tp", "2", "--hw", "h200", "--model", "qwen3-30b-a3b"],
             lambda d, b: d["parallel"]["expert_parallel_size"] == 2
             and d["duration"] != _run("--tp", "2", "--hw", "h200", "--model", "qwen3-30b-a3b")["duration"]),
    "--expert-imbalance": (["--ep", "2", "--dp", "2", "--hw", "h200", "--model", "qwen3-30b-a3b",
                            "--expert-imbalance", "3"],
                           lambda d, b: d["duration"] > _run("--ep", "2", "--dp", "2", "--hw", "h200", "--model",
                                                             "qwen3-30b-a3b")["duration"]),
    "--pp": (["--pp", "2", "--hw", "h200"], lambda d, b: d["parallel"]["pipeline_parallel_size"] == 2
             and d["parallel"]["devices"] == 2 and len(d["per_instance"]) == 2  # (its virtual engines)
             and d["memory"]["weights_gib"] < 0.6 * _run("--hw", "h200")["memory"]["weights_gib"]),
    "--dp": (["--dp", "2"], lambda d, b: d["parallel"]["devices"] == 2 and len(d["per_instance"]) == 2
             and d["duration"] < b["duration"]),
    "--router": (["--dp", "2", "--router", "least-outstanding", "--rate", "20", "--requests", "40"],
                 lambda d, b: d["parallel"]["router"] == "least-outstanding"
                 and d["scenario"]["router"] == "least-outstanding"),
    "--no-paging": (["--no-paging"], lambda d, b: d["batching"] == "static" and not d["scenario"]["engine"]["paging"]),
    "--contiguous-policy": (["--no-paging", "--contiguous-policy", "oracle", "--max-model-len", "4096"],
                            lambda d, b: d["kv_cache"]["mean_waste_fraction"]
                            < _run("--no-paging", "--max-model-len", "4096")["kv_cache"]["mean_waste_fraction"]),
    "--batching": (["--no-paging", "--batching", "continuous"], lambda d, b: d["batching"] == "continuous"),
    "--no-chunked-prefill": (["--no-chunked-prefill", "--input-len", "1000"],
                             lambda d, b: not d["scenario"]["engine"]["enable_chunked_prefill"]
                             and d["max_model_len"] == d["scenario"]["engine"]["max_num_batched_tokens"]),
    "--preemption": (["--preemption", "swap", "--num-blocks", "8", "--input-len", "200", "--output-len", "300"],
                     lambda d, b: d["kv_cache"]["swaps"] > 0),
    "--prefix-caching": (["--prefix-caching", "--shared-prefix-len", "256"],
                         lambda d, b: d["kv_cache"]["prefix_cache_hit_rate"] > 0),
    "--no-prefix-caching": (["--no-prefix-caching"], lambda d, b: d["kv_cache"]["prefix_cache_hit_rate"] is None),
    "--shared-prefix-len": (["--shared-prefix-len", "256"],
                            lambda d, b: d["kv_cache"]["prefix_cache_hit_rate"] > 0
                            and d["mean_ttft_ms"] < b["mean_ttft_ms"]),
    "--weight-dtype": (["--weight-dtype", "int8"], lambda d, b: d["memory"]["weights_gib"] < 0.6 * b["memory"]["weights_gib"]),
    "--kv-dtype": (["--kv-dtype", "int8"], lambda d, b: d["kv_cache"]["num_blocks"] > 1.8 * b["kv_cache"]["num_blocks"]),
    "--engine": (["--engine", "mindie"], lambda d, b: d["engine_profile"] == "mindie"),
    "--goodput": (["--goodput", "ttft:1"], lambda d, b: d["request_goodput"] == 0.0 and b["request_goodput"] is None),
    "--seed": (["--seed", "3", "--rate", "2"], lambda d, b: d["duration"] != _run("--rate", "2")["duration"]),
    # a small model on a GPU is host-bound when its decode steps are not captured
    "--cudagraph-mode": (["--hw", "h200", "--model", "llama-3.2-1b", "--cudagraph-mode", "none"],
                         lambda d, b: d["scenario"]["engine"]["cudagraph_mode"] == "none"
                         and d["mean_tpot_ms"] > _run("--hw", "h200", "--model", "llama-3.2-1b")["mean_tpot_ms"]),
    "--max-cudagraph-capture-size": (["--hw", "h200", "--model", "llama-3.2-1b", "--max-cudagraph-capture-size", "2"],
                                     lambda d, b: d["mean_tpot_ms"]
                                     > _run("--hw", "h200", "--model", "llama-3.2-1b")["mean_tpot_ms"]),
}


@pytest.mark.parametrize("flag", sorted(EFFECTS))
def test_the_flag_takes_effect(flag):
    args, effect = EFFECTS[flag]
    assert effect(_run(*args), _base()), flag


def test_every_simulate_flag_is_checked():
    import re

    rc, out, _ = run_cli("simulate", "--help")
    flags = set()
    for line in out.splitlines():
        m = re.match(r"^ +(--[a-z][a-z-]*)(?: / (--[a-z-]+))?", line)
        if m:
            flags.update(f for f in m.groups() if f)
    flags -= {"--help", "--json", "--report", "--trace"}  # output options; --trace: test_engine, test_input_contract
    assert flags == set(EFFECTS), flags ^ set(EFFECTS)


def test_report_writes_the_file(tmp_path):
    out = tmp_path / "r.html"
    d = _run("--report", str(out))
    assert d["completed"] == 6 and out.stat().st_size > 10_000 and "<html" in out.read_text()[:2000].lower()


def test_rate_inf_sends_everything_at_once():
    d = _base()
    assert math.isinf(d["scenario"]["workload"]["rate"]) and d["max_concurrent_requests"] == 6


def test_prefix_caching_left_to_the_engine_is_reported_as_the_engine_runs_it():
    """Regression: with the engine's default (on for vLLM V1 and vllm-ascend), the hit rate was
    reported as n/a although the cache was in use."""
    d = _run("--shared-prefix-len", "256")
    assert d["scenario"]["engine"]["enable_prefix_caching"] is True
    # 300-token prompts hold 2 full 128-token blocks, both in the 256-token shared prefix: the first
    # request computes them, the other five find them cached
    assert d["kv_cache"]["prefix_cache_hit_rate"] == pytest.approx(5 * 2 / (6 * 2))


def test_every_simulate_parameter_has_a_scenario_field_in_the_table():
    import inspect

    from npusim.cli import simulate
    from npusim.settings import SIMULATE_FIELDS

    params = set(inspect.signature(simulate).parameters) - {"scenario", "as_json", "report"}
    assert params == set(SIMULATE_FIELDS)


def _json(*argv: str) -> dict:
    rc, out, err = run_cli(*argv, "--json")
    assert rc == 0, err
    return json.loads(out)


STEP = ("step", "--hw", "h200", "--model", "llama-3.1-8b")
STEP_EFFECTS = {
    "--phase": (["--phase", "prefill"], lambda d, b: d["phase"] == "prefill" and d["device_ms"] > b["device_ms"]),
    "--batch": (["--batch", "64"], lambda d, b: d["batch"] == 64 and d["tokens_per_s"] > 10 * b["tokens_per_s"]),
    "--context": (["--context", "8000"], lambda d, b: d["context"] == 8000 and d["device_ms"] > b["device_ms"]),
    "--prompt": (["--phase", "prefill", "--prompt", "4096"],
                 lambda d, b: d["prompt"] == 4096 and d["device_ms"] > _json(*STEP, "--phase", "prefill")["device_ms"]),
    "--block-size": (["--block-size", "128"], lambda d, b: d["block_size"] == 128),
    "--weight-dtype": (["--weight-dtype", "int8"], lambda d, b: d["device_ms"] < 0.7 * b["device_ms"]),
    "--kv-dtype": (["--kv-dtype", "int8", "--batch", "64", "--context", "8000"],
                   lambda d, b: d["device_ms"] < _json(*STEP, "--batch", "64", "--context", "8000")["device_ms"]),
    "--engine": (["--engine", "vllm-eager"], lambda d, b: d["engine"] == "vllm-eager" and d["execution"] == "eager"),
    "--ep": (["--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "2", "--batch", "64"],
             lambda d, b: d["ep"] == 2 and d["device_ms"] != _json(*STEP[:-2], "--model", "qwen3-30b-a3b", "--tp", "2",
                                                                   "--batch", "64")["device_ms"]),
    "--expert-imbalance": (["--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "2", "--phase", "prefill",
                            "--prompt", "4096", "--expert-imbalance", "2"],
                           lambda d, b: d["device_ms"] > _json(*STEP[:-2], "--model", "qwen3-30b-a3b", "--tp", "2",
                                                               "--ep", "2", "--phase", "prefill", "--prompt",
                                                               "4096")["device_ms"]),
    "--tp": (["--tp", "2"], lambda d, b: d["tp"] == 2 and d["comm_ms"] > 0 and b["comm_ms"] == 0
             and d["memory"]["weights_gib"] < 0.51 * b["memory"]["weights_gib"]),
    "--pp": (["--pp", "2"], lambda d, b: d["pp"] == 2 and d["devices"] == 2 and b["pipeline"] is None
             and d["pipeline"]["stage_layers"] == [16, 16] and d["device_ms"] > b["device_ms"]
             and d["memory"]["weights_gib"] < 0.6 * b["memory"]["weights_gib"]),
    "--hw": (["--hw", "h100-sxm"], lambda d, b: d["hw"] == "h100-sxm" and d["device_ms"] > b["device_ms"]),
    "--model": (["--model", "llama-3.2-1b"], lambda d, b: d["model"] == "llama-3.2-1b" and d["device_ms"] < b["device_ms"]),
    "--cudagraph-mode": (["--cudagraph-mode", "none"], lambda d, b: d["launch"] == "eager" and b["launch"] == "graph"),
    "--max-cudagraph-capture-size": (["--batch", "64", "--max-cudagraph-capture-size", "32"],
                                     lambda d, b: d["launch"] == "eager"
                                     and _json(*STEP, "--batch", "64")["launch"] == "graph"),
}


@pytest.mark.parametrize("flag", sorted(STEP_EFFECTS))
def test_the_step_flag_takes_effect(flag):
    args, effect = STEP_EFFECTS[flag]
    base = [a for a in STEP]
    for f in [a for a in args if a.startswith("--")]:
        if f in base:
            i = base.index(f)
            del base[i:i + 2]
    assert effect(_json(*base, *args), _json(*STEP)), flag


ANALYZE = ("analyze", "--hw", "h200", "--model", "llama-3.1-8b")
ANALYZE_EFFECTS = {
    "--batch": (["--batch", "64"], lambda p, b: p["batch"] == 64 and p["tokens_per_s"] > b["tokens_per_s"]),
    "--context": (["--context", "8000"], lambda p, b: p["context"] == 8000 and p["tokens_per_s"] < b["tokens_per_s"]),
    "--instances": (["--instances", "2"], lambda p, b: p["instances"] == 2),
    "--sharing": (["--instances", "2", "--sharing", "vnpu"], lambda p, b: p["cores_per_instance"] == 66),
    "--block-size": (["--block-size", "128"], lambda p, b: p["block_size"] == 128 and p["num_blocks"] < b["num_blocks"]),
    "--weight-dtype": (["--weight-dtype", "int8"], lambda p, b: p["num_blocks"] > b["num_blocks"]),
    "--kv-dtype": (["--kv-dtype", "int8"], lambda p, b: p["num_blocks"] > 1.9 * b["num_blocks"]),
    "--gpu-memory-utilization": (["--gpu-memory-utilization", "0.5"], lambda p, b: p["num_blocks"] < b["num_blocks"]),
    "--engine": (["--engine", "vllm-eager"], lambda p, b: p["engine"] == "vllm-eager"),
    "--tp": (["--tp", "2"], lambda p, b: p["tp"] == 2 and p["comm_ms"] > 0 and b["comm_ms"] == 0
             and p["weights_gib"] < 0.51 * b["weights_gib"]),
    "--ep": (["--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "2"], lambda p, b: p["ep"] == 2 and p["tp"] == 2),
    "--pp": (["--pp", "2"], lambda p, b: p["pp"] == 2 and p["micro_batch"] == 16 and len(p["stage_ms"]) == 2
             and b["stage_ms"] == [] and p["weights_gib"] < 0.6 * b["weights_gib"]),
    # replicas of the point on devices of their own: the point unchanged, three times its tokens/s
    "--dp": (["--dp", "3"], lambda p, b: p == b and _json(*ANALYZE, "--dp", "3")["replicas"]["tokens_per_s"]
             == pytest.approx(3 * b["tokens_per_s"])),
    # a 1B model's decode launched kernel by kernel (no graph, or a batch above the capture size)
    "--cudagraph-mode": (["--model", "llama-3.2-1b", "--cudagraph-mode", "none"],
                         lambda p, b: p["tokens_per_s"] < 0.9 * _json(*ANALYZE[:-2], "--model",
                                                                      "llama-3.2-1b")["point"]["tokens_per_s"]),
    "--max-cudagraph-capture-size": (["--model", "llama-3.2-1b", "--max-cudagraph-capture-size", "8"],
                                     lambda p, b: p["tokens_per_s"] < 0.9 * _json(
                                         *ANALYZE[:-2], "--model", "llama-3.2-1b")["point"]["tokens_per_s"]),
}


@pytest.mark.parametrize("flag", sorted(ANALYZE_EFFECTS))
def test_the_analyze_flag_takes_effect(flag):
    args, effect = ANALYZE_EFFECTS[flag]
    assert effect(_json(*ANALYZE, *args)["point"], _json(*ANALYZE)["point"]), flag


@pytest.mark.parametrize("command,effects,outputs", [
    ("step", STEP_EFFECTS, {"--json"}), ("analyze", ANALYZE_EFFECTS, {"--json", "--compare", "--hw", "--model"})])
def test_every_step_and_analyze_flag_is_checked(command, effects, outputs):
    import re

    rc, out, _ = run_cli(command, "--help")
    flags = {m for line in out.splitlines() for m in re.findall(r"^ +(--[a-z][a-z-]*)", line)}
    assert flags - {"--help"} - outputs == set(effects) - outputs


# --------------------------------------------------------------------------- kv-study and seed

@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    """40 requests, 0.2 s apart, prompts 100-2050 tokens."""
    p = tmp_path_factory.mktemp("trace") / "t.csv"
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                 + "".join(f"{0.2 * i:.1f},{100 + 50 * i},{20 + i}\n" for i in range(40)))
    return str(p)


def _rows(*args: str) -> dict:
    rc, out, err = run_cli(*args, "--json")
    assert rc == 0, err
    data = json.loads(out)
    return {r["allocator"]: r for r in data} if isinstance(data, list) else data


KV_STUDY_EFFECTS = {
    "--requests": (["--requests", "10"], lambda d, b: all(r["completed"] + r["rejected"] == 10 for r in d.values())),
    "--hw": (["--hw", "h200", "--engine", "vllm"],
             lambda d, b: all(d[k]["mean_ttft_ms"] < b[k]["mean_ttft_ms"] for k in d)),
    "--model": (["--model", "llama-3.2-1b"], lambda d, b: all(d[k]["mean_ttft_ms"] < b[k]["mean_ttft_ms"] for k in d)),
    "--max-model-len": (["--max-model-len", "1000"], lambda d, b: all(d[k]["rejected"] > b[k]["rejected"] for k in d)),
    "--rate": (["--rate", "inf"], lambda d, b: all(d[k]["output_throughput"] > b[k]["output_throughput"] for k in d)),
    "--engine": (["--engine", "torch-eager"], lambda d, b: all(d[k]["mean_ttft_ms"] != b[k]["mean_ttft_ms"] for k in d)),
}


@pytest.mark.parametrize("flag", sorted(KV_STUDY_EFFECTS))
def test_the_kv_study_flag_takes_effect(flag, small_trace):
    args, effect = KV_STUDY_EFFECTS[flag]
    base = _rows("kv-study", "--trace", small_trace)
    assert effect(_rows("kv-study", "--trace", small_trace, *args), base), flag


SEED_EFFECTS = {
    # 16 requests per instance queue behind each other: 4 wait less for their first token
    "--requests": (["--requests", "4"], lambda d, b: d["setup"]["requests_per_instance"] == 4
                   and d["scenarios"][0]["ttft_ms"] < b["scenarios"][0]["ttft_ms"] / 3),
    "--gpu-memory-utilization": (["--gpu-memory-utilization", "0.95"],
                                 lambda d, b: b["scenarios"][0]["feasible"] and not d["scenarios"][0]["feasible"]),
    "--no-alternatives": (["--no-alternatives"], lambda d, b: b["alternatives"] and not d["alternatives"]),
    "--engine": (["--engine", "vllm-ascend-eager"],
                 lambda d, b: d["setup"]["engine"] == "vllm-ascend-eager"
                 and d["scenarios"][0]["throughput_tok_s"] != b["scenarios"][0]["throughput_tok_s"]),
}


@pytest.mark.parametrize("flag", sorted(SEED_EFFECTS))
def test_the_seed_flag_takes_effect(flag):
    args, effect = SEED_EFFECTS[flag]
    assert effect(_rows("seed", *args), _rows("seed")), flag


@pytest.mark.parametrize("command,effects,outputs", [
    ("kv-study", KV_STUDY_EFFECTS, {"--json", "--trace"}), ("seed", SEED_EFFECTS, {"--json"})])
def test_every_kv_study_and_seed_flag_is_checked(command, effects, outputs):
    import re

    rc, out, _ = run_cli(command, "--help")
    flags = {m for line in out.splitlines() for m in re.findall(r"^ +(--[a-z][a-z-]*)", line)}
    assert flags - {"--help"} - outputs == set(effects)
