"""A GEMM kernel's fixed time beyond its roofline, causal prefill attention at its own share of the
peak, and the per-step latency of a collective: the terms a hardware profile without calibration
tables carries (the Ascend profiles, from real A3-die kernel times), each optional and sourced."""

import pytest
import yaml

from npusim.costmodel import CostModel
from npusim.errors import NpusimError
from npusim.specs import HW_PROFILE_DIR, hardware_from_mapping, load_hardware, load_model


def _mapping(name="ascend-910b3"):
    return yaml.safe_load((HW_PROFILE_DIR / f"{name}.yaml").read_text())


def _hw(**changes):
    data = _mapping()
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = {"value": v, "kind": "assumed", "source": "a test"}
    return hardware_from_mapping(data, "test")


def test_a_memory_bound_gemm_costs_its_fixed_time_plus_its_bytes():
    """Decode GEMMs on the A3 die fell on t = 4.5 us + bytes / 1184 GB/s: the profile's terms. The
    910B3's 20 cores pull at most 20 x 57.6 GB/s, below its 1.6 TB/s HBM: that is what streams."""
    hw, m = _hw(gemm_fixed_us=4.5), load_model("qwen3-8b")
    assert hw.streaming_gbs == pytest.approx(20 * 57.6) and hw.streaming_gbs < hw.memory_bandwidth_gbs
    cm = CostModel(hw, m)
    op = cm.gemm(16, 4096, 12288)
    assert op.bound == "memory"
    stream = op.bytes / (hw.streaming_gbs * 1e9 * hw.memory_efficiency)
    assert op.time_s == pytest.approx(4.5e-6 + stream, rel=1e-12)
    # without the term the same GEMM is its stream alone: the fixed time is exactly added once
    bare = CostModel(_hw(gemm_fixed_us=None), m).gemm(16, 4096, 12288)
    assert op.time_s - bare.time_s == pytest.approx(4.5e-6, rel=1e-9)
    # a GEMM of several kernels pays it in its GEMM kernel only; the others cost their least time
    two = cm.gemm(16, 4096, 12288, kernels=2)
    assert two.time_s - op.time_s == pytest.approx(hw.kernel_latency_us * 1e-6, rel=1e-9)


def test_the_fixed_time_is_a_gemm_term_not_a_vector_one():
    hw = _hw(gemm_fixed_us=50.0)
    a, b = CostModel(hw, load_model("qwen3-8b")), CostModel(_hw(gemm_fixed_us=0.0), load_model("qwen3-8b"))
    norm_a = next(o for o in a.layer_dense_ops(16) if o.name == "rmsnorm_attn")
    norm_b = next(o for o in b.layer_dense_ops(16) if o.name == "rmsnorm_attn")
    assert norm_a.time_s == norm_b.time_s
    gemms = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    ta = {o.name: o.time_s for o in a.layer_dense_ops(16)}
    tb = {o.name: o.time_s for o in b.layer_dense_ops(16)}
    for g in gemms:
        assert ta[g] - tb[g] == pytest.approx(50e-6, rel=1e-9), g


def test_prefill_attention_runs_at_its_own_share_of_the_peak():
    """A long causal prefill is compute-bound: its time is its FLOPs at flash_attention_efficiency
    of the matmul peak, whatever the GEMMs reach; without the term it runs at the GEMM rate."""
    m = load_model("qwen3-8b")
    hw = _hw(flash_attention_efficiency=0.34)
    op = CostModel(hw, m).attention_prefill_op([(8192, 0)])
    assert op.bound == "compute"
    assert op.time_s == pytest.approx(op.flops / (hw.matmul_tflops_bf16 * 1e12 * 0.34), rel=1e-9)
    plain = CostModel(_hw(flash_attention_efficiency=None), m).attention_prefill_op([(8192, 0)])
    assert plain.time_s == pytest.approx(op.flops / (hw.matmul_tflops_bf16 * 1e12 * hw.matmul_efficiency), rel=1e-6)
    assert op.time_s / plain.time_s == pytest.approx(hw.matmul_efficiency / 0.34, rel=1e-6)


def test_a_small_all_reduce_costs_two_steps_of_the_collective_latency():
    """The Ascend profiles price one HCCL step at 7 us (A3 production kernels): a decode
    all-reduce of a few KB is about two of them, far above the link's own 0.5 us."""
    hw = load_hardware("ascend-910b3")
    cm = CostModel(hw, load_model("qwen3-32b"), tp=4)
    op = cm.collective("all_reduce_attn", "all_reduce", 5120 * 2)
    assert op.time_s == pytest.approx(2 * hw.link_latency_us * 1e-6
                                      + 1.5 * 5120 * 2 / (hw.link_gbs * 1e9 * hw.link_efficiency), rel=1e-12)
    assert 14e-6 < op.time_s < 15e-6


def test_the_optional_terms_need_a_source_when_given_and_add_nothing_when_left_out():
    data = _mapping()
    data["gemm_fixed_us"] = 4.5  # a bare number: no kind, no source
    with pytest.raises(NpusimError, match="gemm_fixed_us must be a mapping"):
        hardware_from_mapping(data, "my.yaml")
    data["gemm_fixed_us"] = {"value": -1, "kind": "assumed", "source": "me"}
    with pytest.raises(NpusimError, match="gemm_fixed_us"):
        hardware_from_mapping(data, "my.yaml")
    data["gemm_fixed_us"] = {"value": 1, "kind": "assumed", "source": "me"}
    data["flash_attention_efficiency"] = {"value": 1.5, "kind": "assumed", "source": "me"}
    with pytest.raises(NpusimError, match="flash_attention_efficiency"):
        hardware_from_mapping(data, "my.yaml")
    # a profile written before these terms existed still loads, with neither of them
    old = _hw(gemm_fixed_us=None, flash_attention_efficiency=None)
    assert old.gemm_fixed_us == 0.0 and old.flash_attention_efficiency is None
    assert "gemm_fixed_us" not in old.provenance


@pytest.mark.parametrize("name", ["ascend-910b1", "ascend-910b2", "ascend-910b3", "ascend-910b4",
                                  "ascend-910c-die", "ascend-910c"])
def test_ascend_profiles_carry_the_measured_terms_with_their_source(name):
    hw = load_hardware(name)
    for field in ("gemm_fixed_us", "flash_attention_efficiency", "memory_efficiency", "link_latency_us"):
        prov = hw.provenance[field]
        # (the 910B4's HBM is half as fast: the measured share is assumed for it)
        kind = "assumed" if (name, field) == ("ascend-910b4", "memory_efficiency") else "third-party"
        assert prov.kind == kind and "msModeling" in prov.source, (name, field)


def test_hw_show_says_what_the_device_streams():
    import json
    from conftest import run_cli
    rc, out, err = run_cli("hw", "show", "ascend-910b3", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["streaming_gbs"] == pytest.approx(min(d["memory_bandwidth_gbs"], d["ai_cores"] * d["per_core_bandwidth_gbs"]))
    rc, out, _ = run_cli("hw", "show", "ascend-910b3")
    assert "streams 1152 GB/s from memory (what its 20 cores pull, below the 1600 GB/s HBM)" in " ".join(out.split())


def test_vllm_ascend_decode_attention_floors_gqa_and_mla_apart():
    """FusedInferAttentionScore took 58-64 us a layer in Qwen3-32B's decode whatever the batch and
    context, and 28 us for DeepSeek-V3's MLA at two requests: each model gets its own least time."""
    from npusim.specs import tp_shard
    hw = load_hardware("ascend-910c-die")
    mla = CostModel(hw, tp_shard(load_model("deepseek-v3"), 8), tp=8, weight_dtype="int8")
    gqa = CostModel(hw, tp_shard(load_model("qwen3-32b"), 16), tp=16)
    assert mla.engine.name == gqa.engine.name == "vllm-ascend-graph"
    for cm, floor in ((mla, 28e-6), (gqa, 58e-6)):
        op = cm.attention_decode_op(1, 512, 512)
        assert op.time_s == pytest.approx(floor) and op.bound == "latency"
        assert cm.decode_attention_time(1, 512, 512) == op.time_s


def test_a_floor_for_an_op_the_engine_does_not_have_is_refused(tmp_path):
    from npusim.specs import ENGINE_PROFILE_DIR, load_engine_profile
    text = (ENGINE_PROFILE_DIR / "vllm-ascend-graph.yaml").read_text()
    p = tmp_path / "e.yaml"
    p.write_text(text.replace("  attention_decode_mla:", "  attention_decode_gqa:"))
    with pytest.raises(NpusimError, match="unknown op.*attention_decode_gqa"):
        load_engine_profile(str(p))
