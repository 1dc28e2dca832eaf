"""DeepSeek-style models: multi-head latent attention (MLA), shared experts and a mix of dense and MoE
layers. Parameter counts and KV bytes checked by hand against the published ones; the physics of
the latent cache under tensor parallelism; the HF configs read."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from npusim.costmodel import CostModel, memory_plan
from npusim.errors import NpusimError
from npusim.specs import EngineConfig, ModelSpec, load_hardware, load_model, model_from_hf_config, tp_shard

DEEPSEEK_V3 = {  # the keys of deepseek-ai/DeepSeek-V3's config.json that npusim reads (quantization_config dropped)
    "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("name, total_b, active_b", [
    # published: DeepSeek-V3 technical report (671 B total, 37 B activated per token; the 14 B
    # multi-token-prediction module is extra), DeepSeek-V2-Lite model card (15.7 B / 2.4 B). The
    # activated counts leave out the input embedding (a lookup, not a weight the token multiplies).
    ("deepseek-v3", 671.0, 37.0), ("deepseek-v2-lite", 15.7, 2.4)])
def test_parameter_counts_match_the_published_ones(name, total_b, active_b):
    m = load_model(name)
    assert m.num_params / 1e9 == pytest.approx(total_b, rel=0.005)
    assert (m.active_params - m.embedding_params) / 1e9 == pytest.approx(active_b, rel=0.025)


def test_deepseek_v3_by_hand():
    m = load_model("deepseek-v3")
    h, H = 7168, 128
    attention = (h * 1536 + 1536 * H * 192  # q_a, q_b (no-RoPE 128 + RoPE 64 per head)
                 + h * (512 + 64)  # kv_a: the latent and the shared RoPE key
                 + 512 * H * (128 + 128)  # kv_b: the latent up to each head's K and V
                 + H * 128 * h)  # o_proj
    assert m.attn_params_per_layer == attention
    routed_and_shared = (256 + 1) * 3 * h * 2048 + h * 256  # and the router
    assert m.linear_params == 61 * attention + 58 * routed_and_shared + 3 * 3 * h * 18432
    # MLA caches 576 values per token per layer, once for all heads (a GQA cache would hold K and V)
    assert m.kv_values_per_token_layer == 576
    assert m.kv_bytes_per_token("bf16") == 61 * 576 * 2
    assert m.kv_bytes_per_token("int8") == 61 * 576
    assert m.weight_bytes("bf16") == pytest.approx(2.0 * m.num_params, rel=1e-9)


def test_hf_deepseek_configs_are_read_as_the_zoo():
    for cfg, zoo in ((DEEPSEEK_V3, "deepseek-v3"), (DEEPSEEK_V2_LITE, "deepseek-v2-lite")):
        m = model_from_hf_config(cfg, "x", "config.json")
        z = load_model(zoo)
        fields = ("num_params", "active_params", "num_dense_layers", "num_shared_experts", "q_lora_rank",
                  "kv_lora_rank", "head_dim", "num_kv_heads")
        assert [getattr(m, f) for f in fields] == [getattr(z, f) for f in fields], zoo


@pytest.mark.parametrize("change, needle", [
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoint"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
    ({"first_k_dense_replace": 61}, "first_k_dense_replace 61 leaves no MoE layer of 61"),
    ({"kv_lora_rank": None}, "kv_lora_rank must be a whole number >= 1, got None"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok 300 exceeds n_routed_experts 256"),
    ({"n_shared_experts": -1}, "n_shared_experts must be a whole number >= 0, got -1"),
    ({"torch_dtype": "float8_e4m3fn"}, "torch_dtype 'float8_e4m3fn' is not a dtype"),
])
def test_deepseek_configs_npusim_cannot_price_are_refused(change, needle, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**DEEPSEEK_V3, **change}))
    with pytest.raises(NpusimError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_model(p)
    rc, _, err = run_cli("step", "--model", str(p), "--hw", "h200")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle.split(" ")[0] in err


def test_qwen3_moe_dense_layers_are_counted():
    cfg = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
           "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936,
           "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
           "max_position_embeddings": 40960, "tie_word_embeddings": False}
    plain = model_from_hf_config(cfg, "q", "config.json")
    # layers 0 and 1 dense; with decoder_sparse_step 2 only the odd layers (i + 1 even) are MoE
    for change, dense in (({"mlp_only_layers": [0, 1]}, 2), ({"decoder_sparse_step": 2}, 24),
                          ({"decoder_sparse_step": 2, "mlp_only_layers": [1, 2]}, 25)):
        m = model_from_hf_config({**cfg, **change}, "q", "config.json")
        assert m.num_dense_layers == dense
        assert m.num_params - plain.num_params == dense * (m.dense_mlp_params - m.moe_mlp_params)
    with pytest.raises(NpusimError, match="leave no MoE layer"):
        model_from_hf_config({**cfg, "decoder_sparse_step": 49}, "q", "config.json")
    with pytest.raises(NpusimError, match="mlp_only_layers must be a list of layer indices 0..47"):
        model_from_hf_config({**cfg, "mlp_only_layers": [48]}, "q", "config.json")


def _small(**change) -> ModelSpec:
    base = dict(name="t", num_layers=6, hidden_size=2048, num_heads=16, num_kv_heads=1, head_dim=192,
                intermediate_size=8192, vocab_size=32000, num_experts=16, experts_per_token=2,
                moe_intermediate_size=1024, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
                max_position_embeddings=8192, source="a test model")
    return ModelSpec(**{**base, **change})


@pytest.mark.parametrize("tokens", [1, 9, 300])
def test_a_mix_of_layers_costs_the_mix_of_its_layers(tokens):
    """Two of six layers dense: the dense work is 2/6 of an all-dense model's and 4/6 of an
    all-MoE model's, exactly (attention and the head are the same in all three)."""
    hw = load_hardware("ascend-910b2")
    mixed, moe = CostModel(hw, _small(num_dense_layers=2)), CostModel(hw, _small())
    dense_model = _small(num_experts=0, experts_per_token=0, moe_intermediate_size=0)
    dense = CostModel(hw, dense_model)
    head = sum(o.time_s for o in dense.head_ops(tokens)) + dense.embedding_op(tokens).time_s
    want = (2 * (dense.dense_time(tokens, tokens) - head) + 4 * (moe.dense_time(tokens, tokens) - head)) / 6 + head
    assert mixed.dense_time(tokens, tokens) == pytest.approx(want, rel=1e-12)
    rows = {o.name: o for o in mixed.ops(prefill_chunks=[(tokens, 0)])}
    assert rows["moe_router"].kernels == 4 * 3 and rows["gate_up_proj"].kernels == 6


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_shared_experts_cost_a_dense_mlp_of_their_width(tokens):
    hw = load_hardware("ascend-910b2")
    with_shared = CostModel(hw, _small(num_shared_experts=2)).layer_dense_ops(tokens)
    without = CostModel(hw, _small()).layer_dense_ops(tokens)
    dense = CostModel(hw, _small(num_experts=0, experts_per_token=0, moe_intermediate_size=0,
                                 intermediate_size=2 * 1024)).layer_dense_ops(tokens)
    shared = next(o for o in with_shared if o.name == "shared_experts")
    mlp = [o for o in dense if o.name in ("gate_up_proj", "silu_mul", "down_proj")]
    assert shared.time_s == pytest.approx(sum(o.time_s for o in mlp), rel=1e-12)
    assert shared.flops == pytest.approx(sum(o.flops for o in mlp)) and shared.kernels == 3
    assert sum(o.time_s for o in with_shared) - sum(o.time_s for o in without) == pytest.approx(shared.time_s)


def test_mla_decode_reads_the_latent_once_for_every_head():
    hw = load_hardware("ascend-910b2")
    cm = CostModel(hw, load_model("deepseek-v2-lite"))
    a = cm.attention_decode_op(8, 8 * 1000, 8 * 1024)
    b = cm.attention_decode_op(8, 8 * 1000, 8 * 1024 - 128)
    assert a.bytes - b.bytes == pytest.approx(128 * 576 * 2)  # 576 bf16 values a slot, not per head
    # scores over latent + RoPE key, sums over the latent: 2 x 16 heads x (576 + 512) a context token
    assert a.flops == pytest.approx(2 * 16 * (576 + 512) * 8000)


def test_the_latent_is_whole_on_every_tensor_parallel_device():
    """MLA under TP: the heads divide but every device caches the whole latent (vLLM), so KV bytes
    per token do not fall with TP as GQA's do, and decode attention goes from about 240 FLOP a byte
    (128 heads share one latent) to 30, memory-bound (16 heads)."""
    m, gqa = load_model("deepseek-v3"), load_model("llama-3.1-70b")
    s = tp_shard(m, 8)
    assert s.num_heads == 16 and s.kv_bytes_per_token() == m.kv_bytes_per_token()
    assert tp_shard(gqa, 8).kv_bytes_per_token() == gqa.kv_bytes_per_token() / 8
    hw = load_hardware("ascend-910b2")
    ctx = 64 * 8192
    whole = CostModel(hw, m).attention_decode_op(64, ctx, ctx)
    shard = CostModel(hw, s, tp=8).attention_decode_op(64, ctx, ctx)
    assert whole.flops / whole.bytes > 200 and shard.flops / shard.bytes < 40
    assert shard.bound == "memory"
    # the replicated compressions: qkv_proj (q_a + kv_a) does the whole model's work on each device
    full = next(o for o in CostModel(hw, m).layer_dense_ops(32) if o.name == "qkv_proj")
    part = next(o for o in CostModel(hw, s, tp=8).layer_dense_ops(32) if o.name == "qkv_proj")
    assert part.flops == full.flops


def test_mla_extras_run_where_their_phase_does():
    cm = CostModel(load_hardware("h200"), load_model("deepseek-v2-lite"))
    names = lambda **kw: [o.name for o in cm.ops(**kw)]  # noqa: E731
    decode = names(num_decodes=4, decode_context_tokens=400, decode_kv_slots=448)
    prefill = names(prefill_chunks=[(256, 512)])
    assert "mla_absorb" in decode and "kv_b_proj" not in decode
    assert "kv_b_proj" in prefill and "mla_absorb" not in prefill and "q_b_proj" not in prefill  # (no q_lora)
    kv_b = next(o for o in cm.ops(prefill_chunks=[(256, 512)]) if o.name == "kv_b_proj")
    # the latent of the cached context and the chunk, up to 16 heads' K (128) and V (128)
    assert kv_b.flops == pytest.approx(27 * 2 * (256 + 512) * 512 * 16 * 256)


def test_deepseek_v3_fits_eight_h200_only_with_8_bit_weights():
    hw = load_hardware("h200")
    m = tp_shard(load_model("deepseek-v3"), 8)
    assert not memory_plan(hw, m, EngineConfig(weight_dtype="bf16")).fits
    plan = memory_plan(hw, m, EngineConfig(weight_dtype="int8"))
    assert plan.fits and plan.kv_bytes_per_token == 61 * 576 * 2
    rc, _, err = run_cli("step", "--model", "deepseek-v3", "--hw", "h200", "--tp", "8")
    assert rc == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1
    rc, stdout, err = run_cli("step", "--model", "deepseek-v3", "--hw", "h200", "--tp", "8", "--ep", "8",
                              "--weight-dtype", "int8", "--batch", "32", "--json")
    assert rc == 0, err
    out = json.loads(stdout)
    ops = {o["name"] for o in out["ops"]}
    assert {"mla_absorb", "shared_experts", "moe_router", "all_reduce_mlp"} <= ops


def test_mla_decode_attention_reads_the_engines_measured_mla_kernel():
    """torch-graph names a measured MLA decode kernel (mla_gather_bmm, one layer on the H200):
    DeepSeek-V2-Lite's decode attention is that table's time at its 16 heads, not the roofline's;
    an engine without one keeps the roofline, and a GQA model keeps its own table."""
    from npusim.specs import load_engine_profile

    hw, m = load_hardware("h200"), load_model("deepseek-v2-lite")
    graph = load_engine_profile("torch-graph")
    assert graph.mla_decode_attention_impl == "mla_gather_bmm"
    cm = CostModel(hw, m, engine=graph)
    B, ctx = 64, 8192
    op = cm.attention_decode_op(B, B * ctx, B * ctx)
    measured = cm.tables.decode_attention.time("mla_gather_bmm", 16, 1, 576, 16, B, ctx)
    assert op.time_s == pytest.approx(measured, rel=1e-12)
    assert cm.decode_attention_time(B, B * ctx, B * ctx) == op.time_s  # (the hot path's twin)
    roofline = CostModel(hw, m, engine=graph.model_copy(update={"mla_decode_attention_impl": None}))
    assert roofline.attention_decode_op(B, B * ctx, B * ctx).time_s < 0.8 * op.time_s
    # the plain-PyTorch gather + bmm reads the latent at well under the HBM's bandwidth
    assert m.kv_bytes_per_token("bf16") / m.num_layers * B * ctx / op.time_s < 0.25 * hw.memory_bandwidth_gbs * 1e9
