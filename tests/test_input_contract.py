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
    ("simulate --trace {d}/lengths_only.csv", "no arrived_at column: give a rate (--rate)"),
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
    ("simulate --contiguous-policy oracle --requests 2", "contiguous_policy oracle is a contiguous reservation"),
    ("simulate {d}/oracle.yaml", "contiguous_policy oracle is a contiguous reservation"),
    ("simulate --no-paging --prefix-caching --requests 2", "enable_prefix_caching needs paging"),
    ("simulate --no-paging --preemption swap --requests 2", "preemption_mode swap needs paging"),
    ("simulate --num-blocks 100000000 --requests 2", "hold at most 3138 blocks"),
    ("simulate --max-model-len 100 --requests 3", "no request completed: all 3 were rejected"),
    ("step --hw ascend-910b4 --model llama-3.1-70b", "llama-3.1-70b on ascend-910b4 does not fit"),
    ("step --hw ascend-910b2 --model llama-3.1-8b --batch 5000 --context 8000", "lower --batch or --context"),
    ("step --hw ascend-910b2 --model llama-3.1-8b --phase prefill --batch 400 --prompt 8000", "lower --batch or --prompt"),
    ("simulate --goodput ttft", "--goodput"),
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
