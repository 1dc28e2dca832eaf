"""Roofline cost model and memory plan: physics that must hold."""

import pytest

from npusim.costmodel import CostModel, memory_plan
from npusim.specs import EngineConfig, load_hardware, load_model


@pytest.fixture(scope="module")
def cm13():
    return CostModel(load_hardware("ascend-910"), load_model("llama-2-13b"))


def test_batch1_decode_cannot_beat_weights_over_bandwidth(cm13):
    hw, m = cm13.hw, cm13.model
    floor = m.weight_bytes("bf16") / (hw.memory_bandwidth_gbs * 1e9)
    assert floor == pytest.approx(0.0217, rel=0.01)  # about 21 ms
    t = cm13.step_time(1, 1024, 1024)
    assert t >= floor
    assert t < 2 * floor  # and it is a roofline, not a guess: within 2x of the floor


@pytest.mark.parametrize("hw, model", [("ascend-910b2", "llama-3.1-8b"), ("h200", "qwen3-30b-a3b"),
                                       ("h200", "deepseek-v2-lite"), ("ascend-910b2", "deepseek-v2-lite")])
def test_step_time_equals_sum_of_ops(hw, model):
    cm = CostModel(load_hardware(hw), load_model(model))
    cases = [
        dict(num_decodes=7, decode_context_tokens=7 * 900, decode_kv_slots=7 * 1024),
        dict(prefill_chunks=[(512, 0), (300, 1000)]),
        dict(num_decodes=3, decode_context_tokens=3000, decode_kv_slots=3072, prefill_chunks=[(256, 128)],
             num_sampled=3),
    ]
    for kw in cases:
        ops = cm.ops(**kw)
        assert cm.step_time(**kw) == pytest.approx(sum(o.time_s for o in ops), rel=1e-12)
        assert cm.step_time(**kw) == pytest.approx(sum(o.time_s for o in ops), rel=1e-12)  # memoised path


def test_decode_hot_path_matches_op():
    cm = CostModel(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    for n, ctx, slots in [(1, 10, 16), (64, 64 * 3000, 64 * 3008), (256, 256 * 100000, 256 * 100000)]:
        assert cm.decode_attention_time(n, ctx, slots) == pytest.approx(
            cm.attention_decode_op(n, ctx, slots).time_s, rel=1e-12)


@pytest.mark.parametrize("hw", ["ascend-910b2", "h100-sxm", "ascend-310p3"])
def test_monotone_in_batch_and_context(hw):
    cm = CostModel(load_hardware(hw), load_model("llama-3.1-8b"))
    prev = 0.0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        t = cm.step_time(b, b * 2048, b * 2048)
        assert t >= prev
        prev = t
    prev = 0.0
    for ctx in (128, 512, 2048, 8192, 32768):
        t = cm.step_time(16, 16 * ctx, 16 * ctx)
        assert t >= prev  # flat while attention sits at its kernel's least time
        prev = t
    assert cm.step_time(16, 16 * 32768, 16 * 32768) > cm.step_time(16, 16 * 2048, 16 * 2048)
    # per-token cost falls with batch: weights are read once for the whole batch
    assert cm.step_time(64, 64 * 1024, 64 * 1024) / 64 < cm.step_time(1, 1024, 1024) / 2


def test_decode_reads_unfilled_tail_of_last_page():
    cm = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.1-8b"))
    a = cm.attention_decode_op(8, 8 * 129, 8 * 256)  # 129 tokens occupy two 128-token pages
    b = cm.attention_decode_op(8, 8 * 129, 8 * 129)
    assert a.bytes > b.bytes
    assert a.bytes - b.bytes == pytest.approx(8 * 127 * cm.kv_bytes_per_token_layer)


def test_prefill_attention_grows_quadratically():
    cm = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.1-8b"))
    f1 = cm.attention_prefill_op([(1024, 0)]).flops
    f2 = cm.attention_prefill_op([(2048, 0)]).flops
    assert f2 / f1 == pytest.approx(4, rel=0.01)
    # a chunk over cached context costs what the same tokens cost at the end of a full prefill
    whole = cm.attention_prefill_op([(2048, 0)]).flops
    split = cm.attention_prefill_op([(1024, 0)]).flops + cm.attention_prefill_op([(1024, 1024)]).flops
    assert split == pytest.approx(whole)


def test_large_prefill_is_compute_bound_and_decode_memory_bound():
    cm = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.1-8b"))
    prefill = {o.name: o for o in cm.ops(prefill_chunks=[(4096, 0)])}
    assert prefill["gate_up_proj"].bound == "compute"
    decode = {o.name: o for o in cm.ops(num_decodes=1, decode_context_tokens=4096, decode_kv_slots=4096)}
    assert decode["gate_up_proj"].bound == "memory"
    # one sequence's attention is its kernel's least time (FusedInferAttentionScore's ~58 us);
    # a large batch's is its KV read
    assert decode["attention_decode"].bound == "latency"
    big = {o.name: o for o in cm.ops(num_decodes=64, decode_context_tokens=64 * 8192, decode_kv_slots=64 * 8192)}
    assert big["attention_decode"].bound == "memory"


def test_badly_tiled_gemm_is_less_efficient():
    cm = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.1-8b"))
    # 4097 tokens need a 257th 16-row pass of the cube: more time per token than 4096
    t4096 = cm.gemm(4096, 4096, 14336, 2).time_s / 4096
    t4097 = cm.gemm(4097, 4096, 14336, 2).time_s / 4097
    assert t4097 > t4096


def test_quantised_weights_decode_faster():
    hw, m = load_hardware("ascend-910b2"), load_model("llama-3.1-8b")
    t = {d: CostModel(hw, m, d).step_time(1, 1024, 1024) for d in ("bf16", "int8", "int4")}
    assert t["int4"] < t["int8"] < t["bf16"]


def test_memory_plan_counts_blocks_as_vllm():
    hw, m = load_hardware("ascend-910b2"), load_model("llama-3.1-8b")
    e = EngineConfig(block_size=128, gpu_memory_utilization=0.9)
    plan = memory_plan(hw, m, e)
    expected = int((64 * 2**30 * 0.9 - plan.weight_bytes - plan.activation_bytes - plan.reserve_bytes)
                   // (128 * 128 * 1024))
    assert plan.num_blocks == expected
    assert plan.fits
    override = memory_plan(hw, m, EngineConfig(block_size=128, num_blocks=1000))
    assert override.num_blocks == 1000 and override.num_blocks_formula == expected


def test_two_13b_instances_do_not_fit_in_32_gb():
    hw, m = load_hardware("ascend-910"), load_model("llama-2-13b")
    half = memory_plan(hw, m, EngineConfig(), memory_fraction=0.5)
    assert not half.fits
    assert "does not fit" in half.verdict and "GiB" in half.verdict
    assert 2 * m.weight_bytes("bf16") > hw.memory_bytes


def test_70b_on_one_910b2_does_not_fit():
    plan = memory_plan(load_hardware("ascend-910b2"), load_model("llama-3.1-70b"))
    assert not plan.fits
    assert "exceed the usable" in plan.verdict

