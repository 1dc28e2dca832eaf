"""W8A8 (int8 weights and activations on the int8 matrix units, Ascend's usual quantisation):
GEMMs at the int8 rate, one quantisation kernel before each quantised GEMM, 16-bit LM head."""

from __future__ import annotations

import pytest

from conftest import run_cli
from npusim.costmodel import CostModel
from npusim.specs import load_hardware, load_model

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _ops(dtype, tokens, model="qwen3-8b", hw="ascend-910b3"):
    cm = CostModel(load_hardware(hw), load_model(model), weight_dtype=dtype)
    ops = cm.ops(prefill_chunks=[(tokens, 0)]) if tokens > 1 else cm.ops(1, 1000, 1024)
    return cm, {o.name: o for o in ops}


def test_each_quantised_gemm_launches_one_quantisation_kernel_more():
    for model, quantised in (("qwen3-8b", 4), ("qwen3-30b-a3b", 4)):  # (MoE: experts' two GEMMs)
        cm, w8 = _ops("w8a8", 1, model)
        _, w16 = _ops("bf16", 1, model)
        L = cm.model.num_layers  # (the ops summed over the layers)
        for name in LINEARS:
            assert w8[name].kernels == w16[name].kernels + L * cm.kernels["act_quant"], (model, name)
        assert sum(o.kernels for o in w8.values()) == sum(o.kernels for o in w16.values()) + L * quantised


def test_a_long_prefill_gemm_runs_near_the_int8_rate_and_the_lm_head_stays_16_bit():
    hw = load_hardware("ascend-910b3")
    _, w8 = _ops("w8a8", 8192)
    _, wo = _ops("int8", 8192)  # weight-only: dequantised to the 16-bit cube
    ratio = w8["gate_up_proj"].time_s / wo["gate_up_proj"].time_s
    # compute-bound: half the time at twice the rate, plus reading and writing its input once more
    assert hw.matmul_tflops_bf16 / hw.matmul_tflops_int8 <= ratio < 0.6
    assert w8["lm_head"].time_s == wo["lm_head"].time_s and w8["lm_head"].kernels == wo["lm_head"].kernels


def test_a_decode_gemm_costs_more_than_weight_only_int8_its_quantisation_and_dequantisation():
    cm, w8 = _ops("w8a8", 1)
    _, wo = _ops("int8", 1)
    for name in LINEARS:
        extra_us = (w8[name].time_s - wo[name].time_s) / cm.model.num_layers * 1e6
        # the A3 profiles' static quantisation (10.3 us) and W8A8 epilogue (10.4 - 4.5 us): 16 us a
        # decode GEMM more, the one-byte input saving a few nanoseconds
        assert 15.5 < extra_us < 17.0, (name, extra_us)


def test_mla_keeps_its_latent_up_projections_in_16_bits():
    _, w8 = _ops("w8a8", 2048, model="deepseek-v2-lite")
    _, w16 = _ops("bf16", 2048, model="deepseek-v2-lite")
    assert w8["kv_b_proj"].kernels == w16["kv_b_proj"].kernels
    assert w8["kv_b_proj"].time_s == pytest.approx(w16["kv_b_proj"].time_s)


def test_expert_parallel_dispatch_sends_int8_and_spares_the_experts_first_quantisation():
    hw, m = load_hardware("ascend-910b3"), load_model("qwen3-30b-a3b")
    from npusim.specs import ep_shard

    shard = ep_shard(m, 2, 2)  # two data-parallel ranks of one device, experts over both
    w8 = {o.name: o for o in CostModel(hw, shard, weight_dtype="w8a8", ep=2).ops(prefill_chunks=[(512, 0)])}
    w16 = {o.name: o for o in CostModel(hw, shard, weight_dtype="bf16", ep=2).ops(prefill_chunks=[(512, 0)])}
    L = m.num_layers
    assert w8["all_to_all_dispatch"].bytes == pytest.approx(w16["all_to_all_dispatch"].bytes / 2)
    assert w8["all_to_all_combine"].bytes == pytest.approx(w16["all_to_all_combine"].bytes)  # (back in 16 bits)
    assert w8["gate_up_proj"].kernels == w16["gate_up_proj"].kernels  # quantised by the dispatch
    assert w8["down_proj"].kernels == w16["down_proj"].kernels + L


def test_w8a8_weights_take_the_memory_of_int8_ones():
    m = load_model("qwen3-32b")
    assert m.weight_bytes("w8a8") == m.weight_bytes("int8") < 0.55 * m.weight_bytes("bf16")


def _h200_with(tmp_path, keep):
    """The h200 profile with only the calibration files `keep` says to keep."""
    import yaml

    from npusim.specs import HW_PROFILE_DIR

    prof = yaml.safe_load((HW_PROFILE_DIR / "h200.yaml").read_text())
    prof["calibration_files"] = [str(HW_PROFILE_DIR / f) for f in prof["calibration_files"] if keep(f)]
    (tmp_path / "h200.yaml").write_text(yaml.safe_dump(prof))
    return load_hardware(str(tmp_path / "h200.yaml"))


def test_w8a8_on_a_gpu_without_int8_rows_is_priced_by_its_fp8_gemms_at_the_same_peak(tmp_path):
    # the H200's int8 and FP8 tensor cores share one peak (1979): where only its FP8 GEMMs were
    # timed, int8 GEMMs of the same bytes cost what those do, not the bf16 table carried to that peak
    hw = _h200_with(tmp_path, lambda f: "int8" not in f)
    assert hw.matmul_tflops_int8 == hw.matmul_tflops_fp8
    m = load_model("llama-3.1-8b")
    w8, f8 = CostModel(hw, m, weight_dtype="w8a8"), CostModel(hw, m, weight_dtype="fp8")
    for rows in (1, 64, 4096):
        a = w8.gemm(rows, 4096, 6144, 1.0, quantise_input=False).time_s
        b = f8.gemm(rows, 4096, 6144, 1.0, quantise_input=False).time_s
        assert a == pytest.approx(b), rows


def test_the_flag_is_taken_and_a_wrong_one_refused():
    rc, out, err = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen3-8b", "--weight-dtype", "w8a8", "--json")
    assert rc == 0, err
    rc, out, err = run_cli("step", "--hw", "ascend-910b3", "--model", "qwen3-8b", "--weight-dtype", "w4a4")
    assert rc == 2 and "weight" in err and "w8a8" in err


def test_measured_int8_gemms_price_w8a8_weights_where_the_device_has_them(tmp_path):
    """A device whose int8 GEMMs were timed (calibrate --gemm-dtype int8) prices w8a8 GEMM kernels
    by those rows, not by its bf16 table carried to the int8 peak."""
    import json

    import yaml

    from npusim.specs import HW_PROFILE_DIR

    src = HW_PROFILE_DIR / "measurements" / "h200-2026-12-02-calibrate.json"
    data = json.loads(src.read_text())
    rows = [dict(r, dtype="int8", seconds=r["seconds"] * 0.7) for r in data["gemm_sweep"]
            if r.get("dtype", "bf16") == "bf16" and "seconds" in r]
    (tmp_path / "int8.json").write_text(json.dumps({**data, "gemm_sweep": rows}))
    (tmp_path / "bf16.json").write_text(src.read_text())
    prof = yaml.safe_load((HW_PROFILE_DIR / "h200.yaml").read_text())
    prof["calibration_files"] = ["bf16.json", "int8.json"]
    (tmp_path / "h200-int8.yaml").write_text(yaml.safe_dump(prof))
    hw = load_hardware(str(tmp_path / "h200-int8.yaml"))
    w8 = CostModel(hw, load_model("llama-3.1-8b"), weight_dtype="w8a8", engine="vllm")
    r = max(rows, key=lambda r: r["m"])  # a measured shape: the int8 row's own time
    t = w8.gemm(r["m"], r["k"], r["n"], 1.0, quantise_input=False).time_s
    assert t == pytest.approx(r["seconds"], rel=1e-6)
    plain = CostModel(load_hardware("h200"), load_model("llama-3.1-8b"), weight_dtype="w8a8", engine="vllm")
    assert plain.gemm(r["m"], r["k"], r["n"], 1.0, quantise_input=False).time_s != pytest.approx(t, rel=0.01)


def test_the_h200s_measured_int8_gemms_reach_about_half_the_int8_peak_at_large_m():
    # torch._int_mm (cuBLASLt) on the lent H200, 2026-12-03: 640-985 TOP/s at M >= 1024, so a
    # compute-bound w8a8 GEMM gains less over bf16 than the datasheet's 2x
    hw = load_hardware("h200")
    m = load_model("llama-3.1-8b")
    w8, b16 = CostModel(hw, m, weight_dtype="w8a8"), CostModel(hw, m)
    t8 = w8.gemm(8192, 4096, 28672, 1.0, quantise_input=False).time_s
    t16 = b16.gemm(8192, 4096, 28672, 2.0).time_s
    tops = 2.0 * 8192 * 4096 * 28672 / t8 / 1e12
    assert 0.35 * hw.matmul_tflops_int8 < tops < 0.6 * hw.matmul_tflops_int8
    assert 0.6 < t8 / t16 < 0.95  # faster than bf16, far from twice as fast
