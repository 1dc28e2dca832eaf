"""Every input does what it says or is refused in one line naming the flag, field, file or line
(exit 2, no traceback); nothing is silently clamped, truncated or ignored."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli

HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens\n"

# file name -> bytes of a bad (or unusual) trace
TRACES = {
    "inf.csv": (HEADER + "0,inf,5\n").encode(),
    "nan_time.csv": (HEADER + "nan,5,5\n").encode(),
    "frac.csv": (HEADER + "0,5.5,5\n").encode(),
    "zero.csv": (HEADER + "0,5,0\n").encode(),
    "negative_time.csv": (HEADER + "-1,5,5\n").encode(),
    "backwards.csv": (HEADER + "2,5,5\n1,5,5\n").encode(),
    "word.csv": (HEADER + "0,five,5\n").encode(),
    "short_row.csv": (HEADER + "0,5\n").encode(),
    "dup_column.csv": b"arrived_at,num_prefill_tokens,num_prefill_tokens,num_decode_tokens\n0,5,6,5\n",
    "two_names.csv": b"arrived_at,start_time,input_len,output_len\n0,0,5,5\n",
    "no_lengths.csv": b"arrived_at,tokens\n0,5\n",
    "not_utf8.csv": HEADER.encode() + b"0,5\xff,5\n",
    "empty.csv": b"",
    "header_only.csv": HEADER.encode(),
    "lengths_only.csv": b"num_prefill_tokens,num_decode_tokens\n5,5\n",
}


@pytest.fixture()
def traces(tmp_path):
    for name, data in TRACES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (HEADER + "0,100,10\n0.5,200,5\n").encode())
    (tmp_path / "seed.yaml").write_text("seed: -3\n")
    (tmp_path / "oracle.yaml").write_text("contiguous_policy: oracle\n")
    (tmp_path / "trace_and_len.yaml").write_text(
        f"workload: {{trace: {tmp_path / 'bom.csv'}, input_len: {{kind: fixed, value: 8}}}}\n")
    return tmp_path


BAD = [
    # (command and args, with {d} for the fixture folder; what the one line must say)
    ("simulate --trace {d}/inf.csv", "inf.csv: line 2: num_prefill_tokens must be a whole number"),
    ("simulate --trace {d}/nan_time.csv", "nan_time.csv: line 2: arrived_at must be a time >= 0"),
    ("simulate --trace {d}/frac.csv", "frac.csv: line 2: num_prefill_tokens must be a whole number of tokens"),
    ("simulate --trace {d}/zero.csv", "zero.csv: line 2: num_decode_tokens must be a whole number of tokens >= 1"),
    ("simulate --trace {d}/negative_time.csv", "negative_time.csv: line 2: arrived_at must be a time >= 0"),
    ("simulate --trace {d}/backwards.csv", "backwards.csv: line 3: arrived_at goes back in time"),
    ("simulate --trace {d}/word.csv", "word.csv: line 2: num_prefill_tokens must be a number, got 'five'"),
    ("simulate --trace {d}/short_row.csv", "short_row.csv: line 2: 2 fields, the header has 3"),
    ("simulate --trace {d}/dup_column.csv", "dup_column.csv: line 1: column num_prefill_tokens appears 2 times"),
    ("simulate --trace {d}/two_names.csv", "columns arrived_at and start_time mean the same"),
    ("simulate --trace {d}/no_lengths.csv", "no_lengths.csv: line 1: missing column(s) num_prefill_tokens"),
    ("simulate --trace {d}/not_utf8.csv", "not_utf8.csv: line 2: not UTF-8 text (byte 0xff)"),
    ("simulate --trace {d}/empty.csv", "empty.csv: empty trace file"),
    ("simulate --trace {d}/header_only.csv", "header_only.csv: no requests in the trace"),
    ("simulate --trace {d}/lengths_only.csv", "no arrived_at column: give it a rate (--rate"),
    ("simulate --trace {d}", "is not a file"),
    ("kv-study --trace {d}", "is not a file"),
    ("kv-study --trace {d}/frac.csv", "frac.csv: line 2"),
    ("simulate --trace {d}/missing.csv", "trace file not found"),
    ("simulate --trace {d}/bom.csv --input-len 5", "--input-len would be ignored: the trace gives the lengths"),
    ("simulate --trace {d}/bom.csv --output-len 5", "--output-len would be ignored"),
    ("simulate {d}/trace_and_len.yaml", "input_len would be ignored: a trace gives the lengths"),
    ("simulate --seed -1", "--seed"),
    ("simulate {d}/seed.yaml", "seed.yaml: seed must be >= 0, got -3"),
    ("seed --seed -2", "--seed"),
    ("simulate --contiguous-policy oracle --requests 2", "--contiguous-policy applies to a contiguous reservation"),
    ("simulate --contiguous-policy max --requests 2", "it needs --no-paging"),
    ("simulate --trace", "--trace"),
    ("simulate --burstiness 3 --rate inf", "burstiness_cv 3.0 would be ignored"),
    ("simulate --instances 1 --sharing vnpu", "sharing vnpu splits the device between instances"),
    ("step --hw h200 --model llama-2-7b --context 8000", "--context 8000 exceeds llama-2-7b's context of 4096"),
    ("analyze --hw ascend-910 --model llama-3.1-70b", "does not fit at batch 32, context 2048 nor at any point"),
    ("simulate {d}/oracle.yaml", "contiguous_policy oracle is a contiguous reservation"),
    ("simulate --no-paging --prefix-caching --requests 2", "enable_prefix_caching needs paging"),
    ("simulate --no-paging --preemption swap --requests 2", "preemption_mode swap needs paging"),
    ("simulate --num-blocks 100000000 --requests 2", "hold at most 3138 blocks"),
    ("simulate --max-model-len 100 --requests 3", "no request completed: all 3 were rejected"),
    ("step --hw ascend-910b4 --model llama-3.1-70b", "llama-3.1-70b on ascend-910b4 does not fit"),
    ("step --hw ascend-910b2 --model llama-3.1-8b --batch 5000 --context 8000", "lower --batch or --context"),
    ("step --hw ascend-910b2 --model llama-3.1-8b --phase prefill --batch 400 --prompt 8000", "lower --batch or --prompt"),
    ("simulate --goodput ttft", "--goodput"),
    ("analyze --hw h200 --model llama-3.2-1b --compare --batch 1 --context 100", "it needs --context >= 128, got 100"),
    ("simulate --input-len 50 --shared-prefix-len 1000", "shared_prefix_len 1000 is longer than every prompt (50 tokens)"),
    ("analyze --hw h200 --model llama-3.1-8b --block-size 0", "engine: block_size must be > 0, got 0"),
    ("step --hw h200 --model llama-3.1-8b --phase prefill --context 5", "--context would be ignored"),
    ("step --hw h200 --model llama-3.1-8b --prompt 5", "--prompt would be ignored"),
    ("step --hw h200 --model llama-3.1-8b --phase foo", "--phase must be decode or prefill"),
    ("analyze --hw h200 --model llama-3.1-8b --instances 0", "--instances must be >= 1"),
    ("simulate --rate -1", "--rate must be > 0"),
    ("simulate --goodput foo:5", "--goodput takes ttft:MS tpot:MS e2el:MS"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[b[0].replace("{d}/", "") for b in BAD])
def test_a_bad_input_is_refused_in_one_line(traces, argv, needle):
    cmd, *args = argv.format(d=traces).split()
    assert_one_line_error(cmd, args, needle)


def test_a_trace_with_a_byte_order_mark_reads_as_without(traces):
    rc, out, err = run_cli("simulate", "--trace", str(traces / "bom.csv"), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["completed"] == 2 and d["total_input_tokens"] == 300 and d["total_output_tokens"] == 15


@pytest.mark.parametrize("how", [["--rate", "4"], ["--max-concurrency", "1"]])
def test_a_lengths_only_trace_runs_with_a_rate_or_a_closed_loop(traces, how):
    p = traces / "lens.csv"
    p.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{100 + i},{5 + i}\n" for i in range(6)))
    rc, out, err = run_cli("simulate", "--trace", str(p), *how, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["completed"] == 6 and d["total_input_tokens"] == sum(100 + i for i in range(6))
    if how[0] == "--max-concurrency":
        assert d["max_concurrent_requests"] == 1


MOE = ('{"model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16, '
       '"num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000, "num_experts": 8}')
ODD = ('{"model_type": "llama", "hidden_size": 1000, "num_hidden_layers": 4, "num_attention_heads": 16, '
       '"num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000}')
STRING = ODD.replace('"hidden_size": 1000', '"hidden_size": "big"')
FP8 = ODD.replace('"hidden_size": 1000', '"hidden_size": 1024').replace('"vocab_size": 32000', '"vocab_size": 32000, "torch_dtype": "float8_e4m3fn"')
NEWER = FP8.replace('"torch_dtype": "float8_e4m3fn"', '"dtype": 16')
NEG = ODD.replace('"hidden_size": 1000', '"hidden_size": 1024').replace('"num_hidden_layers": 4', '"num_hidden_layers": -4')


@pytest.fixture()
def specs(tmp_path):
    from npusim.specs import HW_PROFILE_DIR

    hw = (HW_PROFILE_DIR / "ascend-910b2.yaml").read_text()
    (tmp_path / "inf_bw.yaml").write_text(hw.replace("memory_bandwidth_gbs: {value: 1600.0", "memory_bandwidth_gbs: {value: .inf"))
    (tmp_path / "twice.yaml").write_text("hw: ascend-910b2\nseed: 1\nhw: h200\n")
    for name, text in (("moe", MOE), ("odd", ODD), ("string", STRING), ("neg", NEG),
                       ("fp8", FP8), ("newer", NEWER)):
        (tmp_path / f"{name}.json").write_text(text)
    return tmp_path


SPEC_BAD = [
    ("step --hw {d}/inf_bw.yaml --model llama-3.1-8b", "memory_bandwidth_gbs: input should be a finite number"),
    ("simulate {d}/twice.yaml", "twice.yaml: malformed YAML at line 3: key 'hw' given twice (first at line 1)"),
    ("step --hw h200 --model {d}/moe.json", "a mixture-of-experts qwen2 model (num_experts): npusim reads qwen3_moe and mixtral"),
    ("step --hw h200 --model {d}/fp8.json", "torch_dtype 'float8_e4m3fn' is not a dtype npusim prices"),
    ("step --hw h200 --model {d}/newer.json", "dtype 16 is not a dtype npusim prices"),
    ("step --hw h200 --model {d}/odd.json", "hidden_size 1000 is not a multiple of num_attention_heads 16"),
    ("step --hw h200 --model {d}/string.json", "hidden_size must be a whole number > 0, got 'big'"),
    ("step --hw h200 --model {d}/neg.json", "num_hidden_layers must be a whole number > 0, got -4"),
    ("simulate --max-model-len 200000 --requests 2", "exceeds llama-3.1-8b's context of 131072 tokens"),
]


@pytest.mark.parametrize("argv,needle", SPEC_BAD, ids=[b[0].replace("{d}/", "") for b in SPEC_BAD])
def test_a_bad_spec_is_refused_in_one_line(specs, argv, needle):
    cmd, *args = argv.format(d=specs).split()
    assert_one_line_error(cmd, args, needle)


def test_a_scenario_file_the_flags_and_python_resolve_the_same_defaults(tmp_path):
    from npusim.scenario import Scenario, load_scenario, simulate_scenario, summarize
    from npusim.workload import WorkloadSpec

    (tmp_path / "s.yaml").write_text("workload: {num_requests: 12}\n")
    rc, out, err = run_cli("simulate", "--requests", "12", "--json")
    assert rc == 0, err
    by_flags = json.loads(out)
    rc, out, err = run_cli("simulate", str(tmp_path / "s.yaml"), "--json")
    assert rc == 0, err
    by_file = json.loads(out)
    sc = Scenario(workload=WorkloadSpec(num_requests=12))
    by_api = summarize(simulate_scenario(sc), sc)
    for d in (by_flags, by_file, by_api):
        d.pop("wall_seconds", None)
    assert by_flags == by_file == json.loads(json.dumps(by_api))
    assert load_scenario(tmp_path / "s.yaml").workload.rate == 8.0  # ShareGPT-like at 8/s, as the flags
    assert by_flags["scenario"]["workload"]["input_len"]["kind"] == "sharegpt"


def test_files_a_scenario_names_are_relative_to_its_folder(tmp_path, monkeypatch):
    d = tmp_path / "study"
    d.mkdir()
    (d / "t.csv").write_text(HEADER + "0,100,5\n0.1,50,3\n")
    (d / "config.json").write_text(ODD.replace('"hidden_size": 1000', '"hidden_size": 1024'))
    (d / "s.yaml").write_text("model: config.json\nhw: h200\nworkload: {trace: t.csv}\n")
    monkeypatch.chdir(tmp_path)  # not the scenario's folder
    rc, out, err = run_cli("simulate", "study/s.yaml", "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["completed"] == 2 and got["total_input_tokens"] == 150 and got["model"] == "study"  # (a config.json is named after its folder)


@pytest.mark.parametrize("flag,what", [("--hw", "hardware profile"), ("--engine", "engine profile")])
def test_a_folder_given_for_a_profile_is_named_as_a_folder(tmp_path, flag, what):
    args = {"--hw": "h200", "--model": "llama-3.1-8b", flag: str(tmp_path)}
    assert_one_line_error("step", [x for kv in args.items() for x in kv], f"{what} {tmp_path} is a folder")


def test_help_at_80_columns_shows_every_option_name_whole(monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "80")
    for command in (["simulate"], ["step"], ["analyze"], ["kv-study"], ["seed"], ["calibrate", "serve"],
                    ["calibrate", "engine"], ["engine", "show"]):
        rc, out, err = run_cli(*command, "--help")
        assert rc == 0, err
        assert "…" not in out and "<bool>" not in out, command
        for name in re.findall(r"^ +(--[a-z][a-z-]*)", out, flags=re.M):  # the option column
            assert not name.endswith("-"), (command, name)
    rc, out, _ = run_cli("simulate", "--help")
    assert "--max-num-batched-tokens" in out and "--prefix-caching / --no-prefix-caching" in out


@pytest.mark.parametrize("argv,needle", [
    (["simulate", "--trace", ""], "--trace is empty"),
    (["simulate", "--report", "", "--requests", "2"], "--report is empty"),
    (["simulate", ""], "the scenario file name is empty"),
    (["step", "--hw", "", "--model", "llama-3.1-8b"], "the hardware profile name is empty"),
    (["step", "--hw", "h200", "--model", ""], "the model name is empty"),
    (["step", "--hw", "h200", "--model", "llama-3.1-8b", "--engine", ""], "the engine profile name is empty"),
])
def test_an_empty_name_is_refused_not_taken_for_the_default(argv, needle):
    assert_one_line_error(argv[0], argv[1:], needle)


@pytest.mark.parametrize("length,needle", [
    ("{kind: fixed, value: 10, mean: 50}", "mean would be ignored by a fixed length (it takes value)"),
    ("{kind: sharegpt, mean: 5000}", "mean would be ignored by a sharegpt length (it takes nothing else)"),
    ("{kind: uniform, low: 5, high: 50, cv: 3}", "cv would be ignored by a uniform length"),
])
def test_a_length_field_of_another_kind_is_refused(tmp_path, length, needle):
    (tmp_path / "s.yaml").write_text(f"workload: {{input_len: {length}}}\n")
    assert_one_line_error("simulate", [str(tmp_path / "s.yaml")], needle)


@pytest.mark.parametrize("rule,needle", [
    ("{allowed: [], max: 128, recommended: 16", "kv_block_sizes.allowed must list page sizes >= 1"),
    ("{min: 200, max: 128, recommended: 128", "min 200 is above max 128"),
    ("{multiple_of: 16, max: 128, recommended: 100", "recommended 100 is not one the rule accepts"),
])
def test_an_engine_profile_with_an_impossible_page_rule_is_refused(tmp_path, rule, needle):
    import re

    from npusim.specs import ENGINE_PROFILE_DIR

    text = (ENGINE_PROFILE_DIR / "mindie.yaml").read_text()
    text = re.sub(r"kv_block_sizes:\n(  .*\n)+", f"kv_block_sizes: {rule}, source: a test rule}}\n", text, count=1)
    (tmp_path / "e.yaml").write_text(text)
    assert_one_line_error("step", ["--hw", "ascend-910b2", "--model", "llama-3.1-8b", "--engine",
                                   str(tmp_path / "e.yaml")], needle)


@pytest.mark.parametrize("old,new,needle", [
    ("gpu_memory_utilization: {value: 0.9", "gpu_memory_utilization: {value: 2.0",
     "scheduler_defaults.gpu_memory_utilization must be in (0, 1], got 2"),
    ("max_num_seqs: {value: 256", "max_num_seqs: {value: 2.5", "scheduler_defaults.max_num_seqs must be a whole number"),
])
def test_an_engine_profile_with_bad_scheduler_defaults_names_its_file(tmp_path, old, new, needle):
    from npusim.specs import ENGINE_PROFILE_DIR

    text = (ENGINE_PROFILE_DIR / "vllm.yaml").read_text()
    assert old in text
    (tmp_path / "e.yaml").write_text(text.replace(old, new, 1))
    rc, _, err = run_cli("step", "--hw", "h200", "--model", "llama-3.1-8b", "--engine", str(tmp_path / "e.yaml"))
    assert rc == 2 and "e.yaml" in err and needle in err and len(err.strip().splitlines()) == 1, err


def test_booleans_are_not_taken_for_numbers(tmp_path):
    from npusim.specs import HW_PROFILE_DIR

    (tmp_path / "s.yaml").write_text("workload: {num_requests: true}\n")
    assert_one_line_error("simulate", [str(tmp_path / "s.yaml")], "num_requests must be a whole number, got True")
    hw = (HW_PROFILE_DIR / "ascend-910b2.yaml").read_text().replace("ai_cores: {value: 24", "ai_cores: {value: true")
    (tmp_path / "hw.yaml").write_text(hw)
    assert_one_line_error("step", ["--hw", str(tmp_path / "hw.yaml"), "--model", "llama-3.1-8b"],
                          "ai_cores must be a number, got True")


def test_activations_that_do_not_fit_name_the_settings_behind_them():
    assert_one_line_error("simulate", ["--max-num-batched-tokens", "99999999999"],
                          "(for max_num_batched_tokens 99999999999, max_num_seqs 256)")


@pytest.mark.parametrize("argv,needle", [
    (["step", "--hw", "h200", "--model", "llama-3.1-8b", "--engine", "hw_profiles/ascend-910b2.yaml"],
     "is a hardware profile, not an engine profile (give it to --hw)"),
    (["step", "--hw", "hw_profiles/engines/vllm.yaml", "--model", "llama-3.1-8b"],
     "is an engine profile, not a hardware profile (give it to --engine)"),
])
def test_a_profile_of_the_wrong_kind_is_named_as_such(argv, needle, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert_one_line_error(argv[0], argv[1:], needle)


def test_a_model_given_as_a_mapping_in_a_scenario_is_refused(tmp_path):
    (tmp_path / "s.yaml").write_text("model: {name: x}\n")
    assert_one_line_error("simulate", [str(tmp_path / "s.yaml")], "model must be a zoo name or the path")


@pytest.mark.parametrize("change,needle", [
    ({"npusim_calibration": 99}, "npusim_calibration 99 is not a version this npusim reads"),
    ({"dtype": "fp8"}, "dtype 'fp8': the tables are read for bf16/fp16 weights only"),
])
def test_calibrate_fit_refuses_a_measurement_file_it_cannot_read(tmp_path, change, needle):
    from npusim.specs import HW_PROFILE_DIR

    data = json.loads((HW_PROFILE_DIR / "measurements" / "h200-2026-12-02-calibrate.json").read_text())
    data.update(change)
    (tmp_path / "m.json").write_text(json.dumps(data))
    assert_one_line_error("calibrate", ["fit", "--hw", "h200", "--measurements", str(tmp_path / "m.json"),
                                        "--out", str(tmp_path / "p.yaml")], needle)
