"""`npusim step`, `hw`, `model` from the outside: output contract and error handling."""

import json
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, run_cli


def test_step_json_contract():
    rc, out, err = run_cli("step", "--hw", "ascend-910", "--model", "llama-2-13b", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert {"step_ms", "device_ms", "host_ms", "iteration_ms", "kernels", "engine", "ops", "memory"} <= set(data)
    assert data["step_ms"] == data["device_ms"] == pytest.approx(sum(o["time_ms"] for o in data["ops"]))
    assert data["kernels"] == sum(o["kernels"] for o in data["ops"])
    assert data["iteration_ms"] == pytest.approx(data["device_ms"] + data["host_ms"])
    assert data["step_ms"] == pytest.approx(sum(o["time_ms"] for o in data["ops"]))
    for op in data["ops"]:
        assert {"name", "flops", "bytes", "time_ms", "bound"} <= set(op)
        assert op["bound"] in ("compute", "memory", "latency")
    assert data["step_ms"] >= 21.0  # weights / bandwidth floor of a batch-1 13B decode on a 910


def test_step_prefill_and_table():
    rc, out, _ = run_cli("step", "--hw", "h100-sxm", "--model", "llama-3.1-8b", "--phase", "prefill",
                         "--prompt", "2048", "--block-size", "16")
    assert rc == 0
    assert "gate_up_proj" in out and "iteration:" in out
    rc, out, _ = run_cli("step", "--hw", "h100-sxm", "--model", "llama-3.1-8b", "--phase", "prefill",
                         "--prompt", "2048", "--json")
    assert json.loads(out)["block_size"] == 16  # the device's recommended size


@pytest.mark.parametrize("args, needle", [
    (["--hw", "ascend-91"], "unknown hardware 'ascend-91'; known:"),
    (["--model", "llama-3.2-13b"], "unknown model 'llama-3.2-13b'; known:"),
    (["--batch", "0"], "--batch"),
    (["--batch", "-3"], "--batch"),
    (["--batch", "abc"], "--batch"),
    (["--context", "0"], "--context"),
    (["--block-size", "100"], "block_size 100 is not accepted"),
    (["--block-size", "0"], "block_size must be > 0"),
    (["--weight-dtype", "fp4"], "--weight-dtype"),
    (["--phase", "train"], "--phase"),
])
def test_step_errors_are_one_line(args, needle):
    assert_one_line_error("step", args, needle, {"--hw": "ascend-910b2", "--model": "llama-3.1-8b"})


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "npusim", "step", "--hw", str(bad), "--model", "llama-3.1-8b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bad.yaml: malformed YAML at line" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "npusim", "step", "--hw", str(tmp_path / "none.yaml"),
                           "--model", "llama-3.1-8b"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_hw_and_model_commands():
    rc, out, _ = run_cli("hw", "list")
    assert rc == 0 and "ascend-910b2" in out and "h200" in out
    rc, out, _ = run_cli("hw", "show", "ascend-910b2", "--json")
    data = json.loads(out)
    assert data["ai_cores"] == 24 and data["provenance"]["ai_cores"]["kind"] == "datasheet"
    rc, out, _ = run_cli("model", "show", "llama-3.1-8b", "--json")
    data = json.loads(out)
    assert data["kv_bytes_per_token"]["bf16"] == 131072
    rc, out, _ = run_cli("model", "list")
    assert rc == 0 and "qwen2.5-7b" in out
    rc, _, err = run_cli("hw", "show", "tpu-v5")
    assert rc == 2 and "unknown hardware" in err
