"""Hardware profiles, model zoo and spec validation."""

import math

import pytest
import yaml

from npusim.errors import NpusimError
from npusim.specs import (ENGINE_NUMBER_FIELDS, LAYER_OPS, MODEL_OP_KERNELS, MODEL_ZOO, NUMBER_FIELDS, OPTIONAL_NUMBER_FIELDS, HW_PROFILE_DIR,
                          STEP_OPS, EngineConfig, check_block_size, known_engines, known_hardware,
                          load_engine_profile, load_hardware, load_model, resolve_engine)

REQUIRED_PROFILES = {"ascend-910", "ascend-910b1", "ascend-910b2", "ascend-910b3", "ascend-910b4",
                     "ascend-310p3", "h100-sxm", "h200", "a100-sxm-80g"}


def test_every_required_profile_exists():
    assert REQUIRED_PROFILES <= set(known_hardware())


@pytest.mark.parametrize("name", sorted(REQUIRED_PROFILES))
def test_profile_loads_with_a_source_for_every_number(name):
    hw = load_hardware(name)
    # every number has a source; only the optional ones may be left out
    assert set(hw.provenance) <= set(NUMBER_FIELDS)
    assert set(NUMBER_FIELDS) - set(hw.provenance) <= set(OPTIONAL_NUMBER_FIELDS)
    for field, prov in hw.provenance.items():
        assert prov.kind in ("datasheet", "derived", "third-party", "calibrated", "assumed"), field
        assert len(prov.source) >= 3, field
        value = getattr(hw, field)
        assert math.isfinite(value) and value >= 0, field
    assert load_engine_profile(hw.default_engine).name == hw.default_engine
    assert hw.idle_w < hw.tdp_w


@pytest.mark.parametrize("name", known_engines())
def test_engine_profile_loads_with_a_source_for_every_number(name):
    e = load_engine_profile(name)
    # every op of every model counted; the ops of some models only (MLA, MoE) where measured
    assert set(e.kernels) - set(MODEL_OP_KERNELS) == set(LAYER_OPS) | set(STEP_OPS)
    given = {f for f in ENGINE_NUMBER_FIELDS if getattr(e, f) is not None}  # (some are optional)
    assert set(e.provenance) == (given | {f"kernels.{o}" for o in e.kernels}
                                 | {f"kernel_floor_us.{o}" for o in e.kernel_floor_us}
                                 | {f"scheduler_defaults.{k}" for k in e.scheduler_defaults})
    for prov in e.provenance.values():
        assert len(prov.source) >= 3
    assert e.kv_block_sizes.accepts(e.kv_block_sizes.recommended)
    # a graph that captures every step replays its kernels: nothing is dispatched one by one (vLLM's
    # graph modes launch the steps they did not capture eagerly)
    if e.execution == "graph" and e.max_capture_tokens is None:
        assert e.dispatch_per_kernel_us == 0 and e.graph_mode == "full"
    if e.max_capture_tokens is not None:
        assert e.dispatch_per_kernel_us > 0
    if e.execution == "eager":
        assert e.dispatch_per_kernel_us > 0 and e.graph_launch_us == 0


def test_ascend_cube_peak_matches_core_count_and_clock():
    # cube peak = cores x 16x16x16 MACs x 2 flops x clock
    for name in ("ascend-910b1", "ascend-910b2", "ascend-910b3"):
        hw = load_hardware(name)
        assert hw.matmul_tflops_fp16 == pytest.approx(hw.ai_cores * 4096 * 2 * hw.clock_ghz / 1e3, rel=1e-3)
    assert load_hardware("ascend-910b2").matmul_tflops_fp16 == pytest.approx(353.9, abs=0.1)


def test_profile_by_path_and_unknown_name(tmp_path):
    src = HW_PROFILE_DIR / "ascend-910.yaml"
    p = tmp_path / "my-npu.yaml"
    p.write_text(src.read_text())
    assert load_hardware(str(p)).name == "ascend-910"
    with pytest.raises(NpusimError, match="unknown hardware 'nope'.*ascend-910b2"):
        load_hardware("nope")


def _profile_with(tmp_path, **changes):
    data = yaml.safe_load((HW_PROFILE_DIR / "ascend-910b2.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_bad_profile_values_name_the_field(tmp_path):
    p = _profile_with(tmp_path, memory_bandwidth_gbs={"value": -5, "kind": "datasheet", "source": "x sheet"})
    with pytest.raises(NpusimError, match=r"memory_bandwidth_gbs must be > 0, got -5"):
        load_hardware(str(p))
    p = _profile_with(tmp_path, tdp_w=400)
    with pytest.raises(NpusimError, match=r"tdp_w must be a mapping"):
        load_hardware(str(p))
    p = _profile_with(tmp_path, clock_ghz={"value": 1.8, "kind": "guess", "source": "me"})
    with pytest.raises(NpusimError, match=r"clock_ghz"):
        load_hardware(str(p))
    p = _profile_with(tmp_path, l2_mib=None)
    with pytest.raises(NpusimError, match=r"l2_mib is required"):
        load_hardware(str(p))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nai_cores: {value: 3\nvendor: y\n")
    with pytest.raises(NpusimError, match=r"broken.yaml: malformed YAML at line \d+"):
        load_hardware(str(p))


def test_llama_31_8b_counts():
    m = load_model("llama-3.1-8b")
    assert m.num_params == pytest.approx(8.03e9, rel=0.002)
    assert m.kv_bytes_per_token("bf16") == 128 * 1024
    assert m.kv_bytes_per_token("int8") == 64 * 1024
    assert m.weight_bytes("bf16") == pytest.approx(2 * m.num_params)


def test_llama_2_13b_counts():
    m = load_model("llama-2-13b")
    assert m.num_params == pytest.approx(13.0e9, rel=0.01)
    assert m.kv_bytes_per_token("bf16") == 800 * 1024
    assert m.weight_bytes("bf16") / 1e9 == pytest.approx(26.0, rel=0.01)


def test_tied_embeddings_are_counted_once():
    m = load_model("llama-3.2-1b")
    assert m.num_params == pytest.approx(1.236e9, rel=0.002)


def test_weight_only_quantisation_shrinks_linear_layers_only():
    m = load_model("llama-3.1-8b")
    bf16, int8, int4 = (m.weight_bytes(d) for d in ("bf16", "int8", "int4"))
    assert int4 < int8 < bf16
    # embeddings and LM head (2 x 0.525 B params) stay 16-bit
    assert int8 > bf16 / 2 + 1.0e9
    assert int4 == pytest.approx(bf16 / 4 + 0.75 * 2 * 2 * 0.525e9, rel=0.03)


def test_every_zoo_model_loads():
    for name in MODEL_ZOO:
        m = load_model(name)
        assert m.num_params > 4e8
        assert m.num_heads % m.num_kv_heads == 0


def test_zoo_parameter_counts_match_the_published_sizes():
    # Qwen2.5-0.5B: 0.49 B with tied embeddings (Qwen's model card); Llama-3.1-8B: 8.03 B
    assert load_model("qwen2.5-0.5b").num_params / 1e9 == pytest.approx(0.494, abs=0.002)
    assert load_model("llama-3.1-8b").num_params / 1e9 == pytest.approx(8.03, abs=0.01)


def test_hf_config_by_path(fixtures):
    m = load_model(str(fixtures / "qwen3-tiny-config.json"))
    assert m.num_layers == 28 and m.num_kv_heads == 8 and m.head_dim == 128
    assert m.tie_word_embeddings
    assert m.kv_bytes_per_token() == 2 * 28 * 8 * 128 * 2


def test_hf_config_errors(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "gpt2", "hidden_size": 8}')
    with pytest.raises(NpusimError, match="model_type must be one of"):
        load_model(str(p))
    p.write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(NpusimError, match="num_hidden_layers is required"):
        load_model(str(p))
    p.write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, '
                 '"num_attention_heads": 4, "num_key_value_heads": 3, "intermediate_size": 128, "vocab_size": 100}')
    with pytest.raises(NpusimError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        load_model(str(p))
    p.write_text('{"model_type": "llama",')
    with pytest.raises(NpusimError, match="malformed JSON at line 1"):
        load_model(str(p))
    with pytest.raises(NpusimError, match="unknown model 'gpt-5'.*llama-3.1-8b"):
        load_model("gpt-5")


def test_block_size_rules_belong_to_the_engine():
    asc = load_engine_profile("vllm-ascend-graph")  # vllm-ascend's attention takes 128 only
    check_block_size(asc, 128)
    for bad in (16, 100, 0, 256):
        with pytest.raises(NpusimError, match="block_size"):
            check_block_size(asc, bad)
    mindie = load_engine_profile("mindie")  # multiples of 16 up to 128
    check_block_size(mindie, 16)
    with pytest.raises(NpusimError, match="not accepted by mindie"):
        check_block_size(mindie, 136)
    gpu = load_engine_profile("vllm")
    check_block_size(gpu, 16)
    with pytest.raises(NpusimError, match="allowed: 16, 32, 64, 128"):
        check_block_size(gpu, 256)


def test_a_named_engine_gives_its_defaults_and_a_device_names_its_engine():
    h200, asc = load_hardware("h200"), load_hardware("ascend-910b2")
    profile, cfg = resolve_engine(h200, EngineConfig())
    assert profile.name == h200.default_engine == "vllm" and cfg.block_size == 16
    profile, cfg = resolve_engine(asc, EngineConfig())
    assert profile.name == "vllm-ascend-graph" and cfg.block_size == 128
    profile, cfg = resolve_engine(asc, EngineConfig(profile="mindie", block_size=32))
    assert profile.name == "mindie" and cfg.block_size == 32
    with pytest.raises(NpusimError, match="unknown engine 'nope'"):
        resolve_engine(asc, EngineConfig(profile="nope"))


def test_engine_profile_without_a_source_or_with_an_unknown_op_is_refused(tmp_path):
    from npusim.specs import ENGINE_PROFILE_DIR
    data = yaml.safe_load((ENGINE_PROFILE_DIR / "vllm.yaml").read_text())
    no_source = dict(data, kernels={**data["kernels"], "rope": {"value": 1, "kind": "assumed"}})
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump(no_source))
    with pytest.raises(NpusimError, match="kernels.rope"):
        load_engine_profile(str(p))
    unknown = dict(data, kernels={**data["kernels"], "flux": {"value": 1, "kind": "assumed", "source": "x y z"}})
    p.write_text(yaml.safe_dump(unknown))
    with pytest.raises(NpusimError, match="unknown op.*flux"):
        load_engine_profile(str(p))
    missing = dict(data, kernels={k: v for k, v in data["kernels"].items() if k != "silu_mul"})
    p.write_text(yaml.safe_dump(missing))
    with pytest.raises(NpusimError, match="no count given for silu_mul"):
        load_engine_profile(str(p))


def test_partition_shares_cores_and_bandwidth():
    hw = load_hardware("ascend-910b2")
    half = hw.partition(12, 0.5)
    assert half.matmul_tflops_bf16 == pytest.approx(hw.matmul_tflops_bf16 / 2)
    assert half.memory_gib == pytest.approx(32)
    # 12 cores x 57.6 GB/s = 691 GB/s < half of 1600
    assert half.memory_bandwidth_gbs == pytest.approx(12 * 57.6)
    with pytest.raises(NpusimError, match="cores must be in 1..24"):
        hw.partition(30, 0.5)


def test_engine_config_validation():
    with pytest.raises(Exception):
        EngineConfig(block_size=0)
    with pytest.raises(Exception):
        EngineConfig(gpu_memory_utilization=1.5)


def test_an_engine_gives_its_real_scheduler_defaults_by_device_and_flags_override_them():
    h200, a100, asc = load_hardware("h200"), load_hardware("a100-sxm-80g"), load_hardware("ascend-910b2")
    _, cfg = resolve_engine(h200, EngineConfig())  # vLLM V1's API server on a >= 70 GiB device
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (1024, 8192)
    assert cfg.enable_prefix_caching is True and cfg.watermark == 0.0 and cfg.gpu_memory_utilization == 0.9
    _, cfg = resolve_engine(a100, EngineConfig())  # 80 GiB, but vLLM keeps A100s on the small values
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (256, 2048)
    _, cfg = resolve_engine(asc, EngineConfig())  # vllm-ascend: vLLM's rule on a 64 GiB NPU
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.block_size) == (256, 2048, 128)
    _, cfg = resolve_engine(asc, EngineConfig(max_num_seqs=64, enable_prefix_caching=False, watermark=0.02))
    assert (cfg.max_num_seqs, cfg.enable_prefix_caching, cfg.watermark) == (64, False, 0.02)
    with pytest.raises(NpusimError, match=r"max_num_batched_tokens \(2048\) must be >= max_num_seqs \(4096\)"):
        resolve_engine(asc, EngineConfig(max_num_seqs=4096))


@pytest.mark.parametrize("name", ["vllm", "torch-graph", "torch-compile", "mindie", "vllm-ascend-graph"])
def test_engine_show_lists_every_sourced_number_with_its_value(name):
    """Regression: `engine show` died on any profile with per-op or scheduler numbers."""
    from conftest import run_cli
    from npusim.specs import load_engine_profile

    p = load_engine_profile(name)
    rc, out, err = run_cli("engine", "show", name)
    assert rc == 0, err
    assert f"kernels.{'qkv_proj'}" in out and "scheduler_defaults.max_num_seqs" in out
    assert str(p.kernels["qkv_proj"]) in out.split("kernels.qkv_proj", 1)[1].split("\n")[0]
