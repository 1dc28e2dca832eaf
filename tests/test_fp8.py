"""FP8 weights and KV cache: W8A8 on FP8 tensor cores where the device has them (H100/H200:
1979 dense TFLOPS), weight-only elsewhere (dequantised to 16 bits, as vLLM's FP8 Marlin); an FP8
cache holds one byte a value."""

import pytest

from conftest import assert_one_line_error, run_cli
from npusim.costmodel import CostModel, instance_setup
from npusim.specs import EngineConfig, load_hardware, load_model

M = load_model("llama-3.1-8b")


def test_without_fp8_units_fp8_weights_cost_what_int8_weights_do():
    hw = load_hardware("ascend-910b2")
    assert hw.matmul_tflops_fp8 is None
    f, i = CostModel(hw, M, weight_dtype="fp8"), CostModel(hw, M, weight_dtype="int8")
    for shape in ((16, 4096, 28672), (8192, 4096, 28672)):
        assert f.gemm(*shape, 1.0).time_s == i.gemm(*shape, 1.0).time_s


def test_fp8_tensor_cores_halve_a_compute_bound_gemm_on_the_roofline():
    """An H100 without tables: its roofline at the FP8 peak, the same efficiency as 16 bits."""
    hw = load_hardware("h100-sxm").without_tables()
    assert hw.matmul_tflops_fp8 == 2 * hw.matmul_tflops_bf16 + 1  # 1979 dense vs 989 (datasheet)
    b, f = CostModel(hw, M), CostModel(hw, M, weight_dtype="fp8")
    # (the GEMM kernel alone: its input quantised to FP8 before it, priced apart below)
    big_b, big_f = b.gemm(8192, 4096, 28672, 2.0), f.gemm(8192, 4096, 28672, 1.0, quantise_input=False)
    assert big_f.bound == big_b.bound == "compute"
    assert big_f.time_s == pytest.approx(big_b.time_s * hw.matmul_tflops_bf16 / hw.matmul_tflops_fp8, rel=1e-9)
    # a decode GEMM streams its weight: half the bytes
    small_b, small_f = b.gemm(16, 4096, 28672, 2.0), f.gemm(16, 4096, 28672, 1.0, quantise_input=False)
    assert small_f.bound == "memory"
    assert 0.45 < small_f.time_s / small_b.time_s < 0.55
    # W8A8 FP8 quantises the input first (vLLM's scaled_fp8_quant): one kernel more, reading the
    # 16-bit input and writing it at a byte, at least the device's least kernel time
    with_quant = f.gemm(8192, 4096, 28672, 1.0)
    assert with_quant.kernels == big_f.kernels + 1
    assert with_quant.time_s - big_f.time_s >= max(hw.kernel_latency_us * 1e-6,
                                                   8192 * 4096 * 3 / (hw.memory_bandwidth_gbs * 1e9))


def test_measured_fp8_gemms_are_faster_than_bf16_and_within_the_fp8_roofline():
    """The H200's FP8 GEMMs were timed (calibrate --gemm-dtype fp8): they beat bf16 but not the
    datasheet's 2x at large M, and never exceed the FP8 peak or the HBM."""
    hw = load_hardware("h200")
    b, f = CostModel(hw, M), CostModel(hw, M, weight_dtype="fp8")
    for m in (1, 16, 256, 2048, 8192, 12000):
        tb, tf = b.gemm(m, 4096, 28672, 2.0).time_s, f.gemm(m, 4096, 28672, 1.0).time_s
        flops, weight = 2.0 * m * 4096 * 28672, 4096 * 28672
        assert tf >= flops / (hw.matmul_tflops_fp8 * 1e12)
        assert tf >= weight / (hw.memory_bandwidth_gbs * 1e9)
        assert tf < tb
        if m >= 2048:
            assert tb / tf < 1.95  # FP8 reaches less of its peak than bf16 of its own


def test_an_fp8_cache_holds_twice_the_tokens_and_reads_half_the_bytes():
    hw = load_hardware("h200")
    assert M.kv_bytes_per_token("fp8") == M.kv_bytes_per_token("bf16") / 2
    b = instance_setup(hw, M, EngineConfig(kv_dtype="bf16"))
    f = instance_setup(hw, M, EngineConfig(kv_dtype="fp8"))
    assert f.plan.num_blocks == pytest.approx(2 * b.plan.num_blocks, rel=0.01)
    # decode attention from the H200's bf16-cache table (torch-graph's kernel): a large batch saves
    # the time of the bytes it does not read (about half), one short sequence (a fixed cost) almost
    # nothing; vLLM's in-place kernel on the roofline reads half the KV (the queries stay 16-bit)
    for engine, (b, ctx), lo, hi in (("torch-graph", (64, 8192), 0.5 - 1e-9, 0.6),
                                     ("torch-graph", (1, 128), 0.9, 1.0),
                                     ("vllm", (64, 8192), 0.49, 0.51)):
        cb, cf = CostModel(hw, M, engine=engine), CostModel(hw, M, kv_dtype="fp8", engine=engine)
        n = b * ctx
        tb, tf = cb.attention_decode_op(b, n, n).time_s, cf.attention_decode_op(b, n, n).time_s
        assert lo <= tf / tb <= hi, (engine, b, ctx, tf / tb)


def test_the_lm_head_stays_16_bit_under_fp8_weights():
    """FP8 checkpoints keep the LM head in 16 bits: priced as in a bf16 run, not at the FP8 rate."""
    for name in ("h200", "h100-sxm"):
        hw = load_hardware(name)
        b, f = CostModel(hw, M), CostModel(hw, M, weight_dtype="fp8")
        head = lambda c: next(o for o in c.head_ops(2048) if o.name == "lm_head").time_s  # noqa: E731
        assert head(f) == pytest.approx(head(b), rel=1e-12), name


def test_cli_takes_fp8_and_names_it_among_the_choices():
    rc, out, err = run_cli("step", "--hw", "h200", "--model", "llama-3.1-8b", "--weight-dtype", "fp8",
                           "--kv-dtype", "fp8", "--batch", "8", "--json")
    assert rc == 0, err
    assert_one_line_error("step", ["--hw", "h200", "--model", "llama-3.1-8b", "--weight-dtype", "fp4"], "fp8")
