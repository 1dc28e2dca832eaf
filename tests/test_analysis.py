"""The analytical model of "throughput ∝ B · N_core / T": physics that a wrong model would break."""

import json

import pytest

from conftest import assert_one_line_error, run_cli
from npusim.analysis import (analytical_point, explain_proportionality, proportionality_table,
                             scaled_hardware)
from npusim.errors import NpusimError
from npusim.specs import load_hardware, load_model

METRICS = ("device_step_ms", "iteration_ms", "tpot_ms", "tokens_per_s", "tokens_per_s_per_instance",
           "bound", "arithmetic_intensity", "proportional_tokens_per_s", "ratio_to_proportional")


def point(hw="ascend-910b2", model="llama-3.1-8b", **kw):
    kw.setdefault("batch", 1)
    kw.setdefault("context", 2048)
    return analytical_point(hw, model, **kw)


def tput(hw, **kw):
    return point(hw, **kw).tokens_per_s


def test_batch1_13b_decode_on_910_is_below_the_bandwidth_floor():
    hw, m = load_hardware("ascend-910"), load_model("llama-2-13b")
    floor_tok_s = hw.memory_bandwidth_gbs * 1e9 / m.weight_bytes("bf16")  # ≈ 46 tokens/s
    p = point("ascend-910", "llama-2-13b", context=1024)
    assert p.feasible
    assert p.tokens_per_s <= floor_tok_s
    assert p.tpot_ms >= 21.0  # 26 GB of weights over ~1.2 TB/s
    assert p.bound == "memory"
    assert p.arithmetic_intensity < 2 < p.ridge_point  # ~1 flop per weight byte


@pytest.mark.parametrize("sharing", ["time-slice", "vnpu"])
def test_two_13b_instances_on_a_910_do_not_fit(sharing):
    p = point("ascend-910", "llama-2-13b", context=1024, instances=2, sharing=sharing)
    assert not p.feasible
    assert "GiB" in p.reason and "2 instances" in p.reason
    assert p.max_batch == 0
    for key in METRICS:
        assert getattr(p, key) is None, key
    assert p.regime.startswith("capacity")


def test_memory_bound_decode_scales_with_batch_not_with_cores():
    hw = load_hardware("ascend-910b2")
    one, two = tput(hw, batch=1), tput(hw, batch=2)
    assert 1.9 <= two / one <= 2.0  # weights are read once per step whatever B is
    assert point(hw, batch=2).bound == "memory"
    half = scaled_hardware(hw, 12, "fixed-bandwidth")
    assert half.memory_bandwidth_gbs == hw.memory_bandwidth_gbs and half.ai_cores == 12
    for b in (1, 32):
        assert tput(hw, batch=b) / tput(half, batch=b) < 1.5  # doubling N_core at fixed bandwidth
    # as vNPU partitions the bandwidth follows the cores, so the N_core term appears to hold
    small, large = scaled_hardware(hw, 12, "partition"), scaled_hardware(hw, 24, "partition")
    assert tput(large, batch=8) / tput(small, batch=8) > 1.7


def test_compute_bound_large_batch_scales_with_cores_not_batch():
    hw = load_hardware("ascend-910b2")
    half = scaled_hardware(hw, 12, "fixed-bandwidth")
    kw = dict(batch=1024, context=16, block_size=16, engine="mindie")  # MindIE takes 16-token pages
    full_p, half_p = point(hw, **kw), point(half, **kw)
    assert full_p.bound == half_p.bound == "compute"
    assert full_p.regime.startswith("compute-bound")
    assert 1.7 <= full_p.tokens_per_s / half_p.tokens_per_s <= 2.0
    assert tput(hw, **kw) / tput(hw, batch=512, context=16, block_size=16, engine="mindie") < 1.2  # B saturates


def test_time_sliced_instances_read_weights_twice():
    hw = load_hardware("ascend-910b2")
    two = point(hw, batch=16, instances=2, sharing="time-slice")
    one = point(hw, batch=32)
    alone = point(hw, batch=16)
    assert two.feasible and one.feasible
    assert two.tokens_per_s < 0.9 * one.tokens_per_s
    # one device turn each per round; each instance's host work overlaps the other's turn
    assert two.tpot_ms == pytest.approx(max(2 * alone.device_turn_ms, alone.iteration_ms))
    assert two.tpot_ms > alone.iteration_ms
    assert two.tokens_per_s_per_instance == pytest.approx(16 / (two.tpot_ms / 1e3))
    assert two.max_batch < one.max_batch  # each holds its own weights in half the memory


def test_vnpu_bandwidth_is_capped_by_its_cores():
    hw = load_hardware("ascend-910b2")
    p = point(hw, batch=16, instances=2, sharing="vnpu")
    assert p.cores_per_instance == 12
    cap = min(hw.memory_bandwidth_gbs / 2, 12 * hw.per_core_bandwidth_gbs)
    assert p.bandwidth_gbs_per_instance == pytest.approx(cap)
    assert p.bandwidth_gbs_per_instance < hw.memory_bandwidth_gbs / 2  # the core-side DDR limit bites
    assert p.tokens_per_s < tput(hw, batch=32)
    odd = point(hw, batch=1, instances=5, sharing="vnpu")
    assert odd.cores_per_instance == 4 and any("idle" in n for n in odd.notes)


def test_memory_caps_the_batch_with_numbers():
    p = point(batch=256, context=2048)
    assert not p.feasible and p.max_batch > 0
    assert "batch 256" in p.reason and "blocks" in p.reason and str(p.num_blocks) in p.reason
    assert all(getattr(p, k) is None for k in METRICS)
    assert point(batch=p.max_batch, context=2048).feasible


def test_ratio_to_proportional_is_one_at_the_reference_and_honest_elsewhere():
    p1 = point(batch=1)
    assert p1.ratio_to_proportional == pytest.approx(1.0)
    p32 = point(batch=32)
    assert p32.proportional_tokens_per_s == pytest.approx(32 * p1.tokens_per_s)
    assert p32.ratio_to_proportional == pytest.approx(p32.tokens_per_s / p32.proportional_tokens_per_s)
    assert p32.ratio_to_proportional < 1  # T grows with the KV reads of the extra sequences
    assert p32.as_dict()["tokens_per_s"] == p32.tokens_per_s


def test_table_marks_regimes_and_the_explanation_quotes_it():
    rows = proportionality_table("ascend-910b2", "llama-3.1-8b", batches=[1, 32, 256], contexts=[2048],
                                 cores_list=[12, 24])
    scalings = {r["core_scaling"] for r in rows}
    assert scalings == {"device", "fixed-bandwidth", "partition"}
    regimes = " | ".join(r["regime"] for r in rows)
    assert "memory-bound on weights" in regimes and "capacity" in regimes
    assert "weights read 2x per round" in regimes and "vNPUs" in regimes
    for r in rows:
        assert r["feasible"] == (r["tokens_per_s"] is not None)
    lines = explain_proportionality(rows)
    assert 3 <= len(lines) <= 6
    text = " ".join(lines)
    assert "llama-3.1-8b on ascend-910b2, context 2048" in text
    assert "12 to 24 cores" in text and "bandwidth, not cores" in text
    assert "time-sliced" in text and "less than one instance" in text


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(NpusimError, match="sharing"):
        point(sharing="mps")
    with pytest.raises(NpusimError, match="instances"):
        point(instances=0)
    with pytest.raises(NpusimError, match="instances must be <= 24"):
        point(instances=25, sharing="vnpu")


# --------------------------------------------------------------------------- CLI

def test_analyze_json_contract():
    rc, out, err = run_cli("analyze", "--hw", "ascend-910b2", "--model", "llama-3.1-8b", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert set(data) == {"point", "replicas", "grid", "explanation"}
    p = data["point"]
    assert data["replicas"] == {"dp": 1, "devices": 1, "tokens_per_s": p["tokens_per_s"]}
    assert p["batch"] == 32 and p["context"] == 2048 and p["instances"] == 1
    assert p["feasible"] and p["bound"] == "memory" and 0 < p["ratio_to_proportional"] < 1
    assert {r["batch"] for r in data["grid"]} >= {16, 32, 64}
    assert {r["cores_per_instance"] for r in data["grid"]} >= {12, 24}
    assert any(r["instances"] == 2 for r in data["grid"])
    assert 3 <= len(data["explanation"]) <= 6


def test_analyze_infeasible_point_is_null_not_invented():
    from npusim.analysis import analytical_point
    from npusim.specs import load_hardware, load_model

    p = analytical_point(load_hardware("ascend-910"), load_model("llama-2-13b"), batch=1, context=4000,
                         instances=2, weight_dtype="fp16", kv_dtype="fp16")
    assert p.feasible is False and "GiB" in p.reason
    assert p.tokens_per_s is None and p.tpot_ms is None
    # the CLI, where nothing around the point fits either, says so in one line and exits 2
    rc, out, err = run_cli("analyze", "--hw", "ascend-910", "--model", "llama-2-13b", "--instances", "2",
                           "--batch", "1", "--context", "4000", "--weight-dtype", "fp16", "--kv-dtype", "fp16")
    assert rc == 2 and "does not fit" in err and "GiB" in err and len(err.strip().splitlines()) == 1


def test_analyze_table_output():
    rc, out, _ = run_cli("analyze", "--hw", "ascend-910b2", "--model", "llama-3.1-8b", "--instances", "2",
                         "--sharing", "vnpu", "--batch", "8")
    assert rc == 0
    assert "proportionality grid" in out and "vNPU" in out


@pytest.mark.parametrize("args, needle", [
    (["--sharing", "mps"], "--sharing"),
    (["--instances", "0"], "--instances"),
    (["--instances", "25", "--sharing", "vnpu"], "--instances must be <= 24"),
    (["--batch", "0"], "--batch"),
    (["--context", "abc"], "--context"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--block-size", "100"], "block_size 100 is not accepted"),
    (["--weight-dtype", "fp4"], "--weight-dtype"),
    (["--hw", "ascend-91"], "unknown hardware"),
])
def test_analyze_errors_are_one_line(args, needle):
    assert_one_line_error("analyze", args, needle, {"--hw": "ascend-910b2", "--model": "llama-3.1-8b"})


@pytest.mark.parametrize("hw, engine, prompt", [("ascend-910b2", None, 5000), ("h200", "torch-eager", 3000),
                                                ("ascend-910b2", "mindie", 700)])
def test_unloaded_ttft_is_what_the_simulator_gives_one_request_alone(hw, engine, prompt):
    import json

    from conftest import run_cli
    from npusim.analysis import unloaded_ttft

    args = ["simulate", "--hw", hw, "--requests", "1", "--input-len", str(prompt), "--output-len", "2", "--json"]
    rc, out, err = run_cli(*args, *(["--engine", engine] if engine else []))
    assert rc == 0, err
    got = unloaded_ttft(hw, "llama-3.1-8b", prompt=prompt, engine=engine)
    assert got["ttft_ms"] == pytest.approx(json.loads(out)["mean_ttft_ms"], rel=1e-9)
    assert got["iterations"] == -(-prompt // got["chunk_tokens"])
