"""Mixture-of-experts models: parameter counts checked by hand against the published ones, the
router and grouped expert GEMMs, the memory of every expert, and the HF configs read."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from npusim.costmodel import CostModel
from npusim.errors import NpusimError
from npusim.specs import ModelSpec, load_engine_profile, load_hardware, load_model, model_from_hf_config, tp_shard


@pytest.mark.parametrize("name, total_b, active_b", [
    # published: Qwen3 model cards (30.5 B / 3.3 B, 235 B / 22 B); Mixtral paper (46.7 B / 12.9 B)
    ("qwen3-30b-a3b", 30.5, 3.3), ("qwen3-235b-a22b", 235.0, 22.0), ("mixtral-8x7b", 46.7, 12.9)])
def test_parameter_counts_match_the_published_ones(name, total_b, active_b):
    m = load_model(name)
    assert m.num_params / 1e9 == pytest.approx(total_b, rel=0.01)
    assert m.active_params / 1e9 == pytest.approx(active_b, rel=0.02)


def test_qwen3_30b_a3b_by_hand():
    m = load_model("qwen3-30b-a3b")
    h, f, E, L = 2048, 768, 128, 48
    attention = h * (32 * 128 + 2 * 4 * 128) + 32 * 128 * h
    experts = E * 3 * h * f + h * E  # and the router
    assert m.linear_params_per_layer == attention + experts
    assert m.kv_bytes_per_token("bf16") == 2 * L * 4 * 128 * 2  # GQA: 4 KV heads of 128
    # the memory plan holds every expert, not only the active ones
    assert m.weight_bytes("bf16") == pytest.approx(2.0 * m.num_params, rel=1e-6)


def _dense_and_one_expert(f=4096):
    common = dict(num_layers=2, hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128, vocab_size=32000,
                  max_position_embeddings=4096, source="test model")
    dense = ModelSpec(name="dense", intermediate_size=f, **common)
    moe = ModelSpec(name="moe", intermediate_size=f, num_experts=1, experts_per_token=1, moe_intermediate_size=f,
                    **common)
    return dense, moe


@pytest.mark.parametrize("tokens", [1, 7, 64, 2048])
def test_every_token_on_one_expert_costs_the_dense_ffn_of_that_size(tokens):
    hw = load_hardware("ascend-910b2")  # (the roofline: no measured tables on this device)
    dense, moe = _dense_and_one_expert()
    d = {o.name: o for o in CostModel(hw, dense).layer_dense_ops(tokens)}
    m = {o.name: o for o in CostModel(hw, moe).layer_dense_ops(tokens)}
    for name in ("gate_up_proj", "silu_mul", "down_proj"):
        assert m[name].time_s == pytest.approx(d[name].time_s, rel=1e-12), name
        assert m[name].flops == pytest.approx(d[name].flops) and m[name].bytes == pytest.approx(d[name].bytes)
    # what routing adds: the router, and the combine, which reads each routed row once
    assert set(m) - set(d) == {"moe_router", "moe_combine"}
    h = dense.hidden_size
    assert m["moe_combine"].bytes == pytest.approx(2 * tokens * h * 2)  # T rows in, T rows out, bf16


def test_decode_reads_the_experts_its_tokens_reach():
    hw = load_hardware("h200")
    cm = CostModel(hw, load_model("qwen3-30b-a3b"))
    m = cm.model
    one_expert = 2 * m.hidden_size * 2 * m.moe_intermediate_size  # gate_up bytes of one expert, bf16
    def gate_up(tokens):
        return next(o for o in cm.layer_dense_ops(tokens) if o.name == "gate_up_proj")
    # one token reaches its 8 experts; many reach nearly all 128
    assert gate_up(1).bytes == pytest.approx(8 * one_expert + 8 * (2048 + 1536) * 2)
    assert 120 * one_expert < gate_up(256).bytes < 128 * one_expert + 256 * 8 * (2048 + 1536) * 2
    assert gate_up(1).time_s < gate_up(32).time_s < gate_up(256).time_s
    # a decode step of an MoE model with 3.3 B active parameters at batch 1 reads its active weights
    step = cm.step_time(num_decodes=1, decode_context_tokens=1000, decode_kv_slots=1008)
    dense_3b = CostModel(hw, load_model("llama-3.2-3b")).step_time(num_decodes=1, decode_context_tokens=1000,
                                                                    decode_kv_slots=1008)
    assert 0.5 * dense_3b < step < 3 * dense_3b


def test_tensor_parallel_splits_each_expert():
    s = tp_shard(load_model("qwen3-30b-a3b"), 4)
    assert (s.num_experts, s.moe_intermediate_size, s.num_kv_heads) == (128, 192, 1)
    with pytest.raises(NpusimError, match="expert size 768 does not divide among 5"):
        tp_shard(load_model("qwen3-30b-a3b").model_copy(update={"num_heads": 40, "num_kv_heads": 5}), 5)


QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936,
             "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
             "max_position_embeddings": 40960, "decoder_sparse_step": 1, "mlp_only_layers": [],
             "tie_word_embeddings": False}


def test_hf_qwen3_moe_and_mixtral_configs_are_read():
    m = model_from_hf_config(QWEN3_MOE, "q", "config.json")
    z = load_model("qwen3-30b-a3b")
    assert (m.num_experts, m.experts_per_token, m.moe_intermediate_size, m.qk_norm) == (128, 8, 768, True)
    assert m.num_params == z.num_params
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
               "num_experts_per_tok": 2, "max_position_embeddings": 32768, "sliding_window": None}
    x = model_from_hf_config(mixtral, "mixtral", "config.json")
    assert x.num_params == load_model("mixtral-8x7b").num_params


@pytest.mark.parametrize("change, needle", [
    ({"mlp_only_layers": "0"}, "mlp_only_layers must be a list of layer indices"),
    ({"decoder_sparse_step": 100}, "leave no MoE layer of 48"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be a whole number > 0"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok 200 exceeds num_experts 128"),
    ({"decoder_sparse_step": "1"}, "decoder_sparse_step must be a whole number >= 1, got '1'"),
    ({"shared_expert_intermediate_size": 4096}, "shared experts"),
    ({"num_local_experts": 64}, "num_local_experts is not a qwen3_moe key"),
    ({"model_type": "deepseek_v3"}, "kv_lora_rank must be a whole number >= 1"),
])
def test_moe_configs_npusim_cannot_price_are_refused(change, needle, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**QWEN3_MOE, **change}))
    rc, _, err = run_cli("step", "--hw", "h200", "--model", str(p))
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def _rows(layout, times):
    E, k, h, f = layout
    return [{"experts": E, "top_k": k, "hidden": h, "expert_size": f, "tokens": t, "dtype": "bf16",
             "gate_up_seconds": s, "down_seconds": s / 2} for t, s in times.items()]


def test_grouped_gemm_table_interpolates_its_layout_and_carries_others_by_the_roofline():
    from npusim.calibration import GroupedGemmTable

    table = GroupedGemmTable(_rows((8, 2, 4096, 14336), {1: 100e-6, 16: 400e-6, 256: 400e-6, 4096: 3200e-6}))
    calls = []

    def roofline(E, k, h, f, tokens):
        calls.append((E, tokens))
        return E * h * f * (1 + tokens / 1000)

    # a measured point, and log-log between two
    assert table.time("gate_up_proj", 8, 2, 4096, 14336, 16, roofline) == pytest.approx(400e-6)
    assert table.time("down_proj", 8, 2, 4096, 14336, 16, roofline) == pytest.approx(200e-6)
    assert table.time("gate_up_proj", 8, 2, 4096, 14336, 4, roofline) == pytest.approx(200e-6, rel=1e-9)
    # another layout: the nearest measured one, times the roofline's ratio at the same tokens
    other = table.time("gate_up_proj", 16, 2, 4096, 14336, 16, roofline)
    assert other == pytest.approx(400e-6 * roofline(16, 2, 4096, 14336, 16) / roofline(8, 2, 4096, 14336, 16))
    # past the measured tokens: the edge, carried by the roofline
    far = table.time("gate_up_proj", 8, 2, 4096, 14336, 8192, roofline)
    assert far == pytest.approx(3200e-6 * roofline(8, 2, 4096, 14336, 8192) / roofline(8, 2, 4096, 14336, 4096))
    assert table.time("qkv_proj", 8, 2, 4096, 14336, 16, roofline) is None


def test_a_measured_grouped_gemm_curve_never_prices_more_tokens_faster():
    """A dip in the measured times (repeats' noise) is pooled with its neighbours: more tokens over
    the same experts is at least as much work, so the time is non-decreasing in tokens."""
    from npusim.calibration import GroupedGemmTable

    table = GroupedGemmTable(_rows((8, 2, 4096, 14336), {1: 100e-6, 16: 400e-6, 64: 380e-6, 256: 420e-6}))
    tokens, times = table.curves[(8, 2, 4096, 14336, "gate_up_proj")]
    assert tokens == [1, 16, 64, 256]
    assert times == pytest.approx([100e-6, 390e-6, 390e-6, 420e-6])  # (400 and 380 pooled)

    def roofline(E, k, h, f, t):
        return E * h * f * (1 + t / 1000)

    priced = [table.time("gate_up_proj", 8, 2, 4096, 14336, t, roofline) for t in range(1, 400, 3)]
    assert all(b >= a for a, b in zip(priced, priced[1:]))
    # the h200's own measured table: an MoE layer's expert time never falls as the batch grows
    for model in ("qwen3-30b-a3b", "mixtral-8x7b"):
        cm = CostModel(load_hardware("h200"), load_model(model))
        t = [sum(o.time_s for o in cm.layer_dense_ops(n) if o.name in ("gate_up_proj", "down_proj"))
             for n in (1, 8, 40, 64, 128, 256, 512, 1000, 1024, 2048, 4096)]
        assert all(b >= a * (1 - 1e-12) for a, b in zip(t, t[1:])), t


def test_a_device_with_measured_grouped_gemms_prices_moe_layers_from_them(tmp_path):
    import yaml

    from npusim.specs import HW_PROFILE_DIR

    meas = tmp_path / "moe.json"
    meas.write_text(json.dumps({"moe_grouped_gemm": _rows((128, 8, 2048, 768), {1: 50e-6, 4096: 900e-6}),
                                "gemm_sweep": [{"m": 1, "n": 4096, "k": 4096, "dtype": "bf16", "seconds": 1e-5}]}))
    data = yaml.safe_load((HW_PROFILE_DIR / "ascend-910b2.yaml").read_text())
    data["calibration_files"] = [str(meas)]
    (tmp_path / "hw.yaml").write_text(yaml.safe_dump(data))
    hw = load_hardware(str(tmp_path / "hw.yaml"))
    cm = CostModel(hw, load_model("qwen3-30b-a3b"))
    ops = {o.name: o for o in cm.layer_dense_ops(1)}
    assert ops["gate_up_proj"].time_s == pytest.approx(50e-6) and ops["down_proj"].time_s == pytest.approx(25e-6)
    plain = CostModel(load_hardware("ascend-910b2"), load_model("qwen3-30b-a3b"))
    assert {o.name: o for o in plain.layer_dense_ops(1)}["gate_up_proj"].time_s != pytest.approx(50e-6)


def test_a_bad_grouped_gemm_time_is_refused(tmp_path):
    from npusim.calibration import check_measured_times

    rows = _rows((8, 2, 64, 64), {1: 1e-5})
    rows[0]["down_seconds"] = -1.0
    with pytest.raises(NpusimError, match=r"moe_grouped_gemm\[0\].down_seconds must be a time > 0"):
        check_measured_times("m.json", {"moe_grouped_gemm": rows})


def test_engine_profile_counts_the_router_and_combine_kernels():
    """moe_router and moe_combine take their kernels and least kernel time from the engine
    profile (defaults 3 and 1 kernels where it does not say): more kernels cost more at batch 1."""
    hw = load_hardware("h200")
    model = load_model("qwen3-30b-a3b")
    base = load_engine_profile("vllm")
    default = {o.name: o for o in CostModel(hw, model, engine=base).layer_dense_ops(1)}
    assert default["moe_router"].kernels == 3 and default["moe_combine"].kernels == 1
    kernels = dict(base.kernels)
    kernels["moe_router"], kernels["moe_combine"] = 14, 6
    busy = base.model_copy(update={"kernels": kernels})
    more = {o.name: o for o in CostModel(hw, model, engine=busy).layer_dense_ops(1)}
    assert more["moe_router"].kernels == 14 and more["moe_combine"].kernels == 6
    assert more["moe_router"].time_s > default["moe_router"].time_s
    assert more["moe_combine"].time_s > default["moe_combine"].time_s


def test_a_measured_expert_imbalance_sets_the_busiest_devices_rows():
    """With --ep the busiest device sets the pace: by default the uniform-routing estimate (mean +
    sqrt(2 mean ln ep)); given the measured busiest/mean ratio, exactly that many rows."""
    import math
    from npusim.costmodel import CostModel
    from npusim.specs import load_hardware, load_model, tp_shard
    m, hw = load_model("qwen3-30b-a3b"), load_hardware("h200")
    T, ep = 8192, 8
    mean = T * m.experts_per_token / ep

    def gate_up(imbalance):
        cm = CostModel(hw, tp_shard(m, ep), tp=ep, ep=ep, expert_imbalance=imbalance)
        return next(o for o in cm.layer_dense_ops(T) if o.name == "gate_up_proj")

    uniform, balanced, skewed = gate_up(None), gate_up(1.0), gate_up(2.0)
    n_in, n_out = m.hidden_size, 2 * m.moe_intermediate_size  # whole experts under EP
    assert uniform.flops == pytest.approx(2 * (mean + math.sqrt(2 * mean * math.log(ep))) * n_in * n_out)
    assert balanced.flops == pytest.approx(2 * mean * n_in * n_out)
    assert skewed.flops == pytest.approx(2 * 2 * mean * n_in * n_out)
    assert balanced.time_s < uniform.time_s < skewed.time_s


def test_expert_imbalance_needs_expert_parallelism():
    from conftest import assert_one_line_error
    assert_one_line_error("step", ["--hw", "h200", "--model", "qwen3-30b-a3b", "--expert-imbalance", "1.5"],
                          "needs --ep > 1")
    assert_one_line_error("simulate", ["--hw", "h200", "--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "2",
                                       "--expert-imbalance", "0.5", "--requests", "4"], "--expert-imbalance")
