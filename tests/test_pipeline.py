"""Pipeline parallelism (--pp): the layers split as vLLM splits them, stage times that add up to
the whole step, each stage's memory, and a pipeline that overlaps its stages only when it has
more than one batch in flight."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from npusim.costmodel import Batch, instance_setup, memory_plan
from npusim.scenario import Scenario, simulate_scenario, summarize
from npusim.specs import EngineConfig, load_hardware, load_model, pp_layers, pp_stage_weight_bytes, pp_stages


@pytest.mark.parametrize("layers, pp, want", [
    (32, 2, [16, 16]), (61, 4, [15, 15, 16, 15]), (80, 3, [27, 27, 26]), (10, 4, [2, 3, 3, 2]), (5, 5, [1] * 5)])
def test_layers_split_as_vllm_splits_them(layers, pp, want):
    # vllm/distributed/utils.py get_pp_indices: equal shares, the remainder on the stages before the last
    assert pp_layers(layers, pp) == want


def test_more_stages_than_layers_is_refused():
    rc, _, err = run_cli("step", "--model", "llama-3.2-1b", "--hw", "h200", "--pp", "17")
    assert rc == 2 and "--pp 17 exceeds the 16 layers" in err and len(err.strip().splitlines()) == 1


def test_dense_layers_fall_on_the_first_stages():
    assert pp_stages(load_model("deepseek-v3"), 4) == [(12, 3), (15, 0), (16, 0), (15, 0)]
    assert pp_stages(load_model("deepseek-v3"), 61)[:4] == [(0, 1), (0, 1), (0, 1), (1, 0)]
    assert pp_stages(load_model("llama-3.1-8b"), 2) == [(0, 16), (0, 16)]


@pytest.mark.parametrize("model, weight_dtype", [("llama-3.1-8b", "bf16"), ("llama-3.2-1b", "int8"),
                                                 ("deepseek-v2-lite", "int4")])
def test_stage_weights_add_up_to_the_model(model, weight_dtype):
    m = load_model(model)
    w = pp_stage_weight_bytes(m, weight_dtype, 3)
    tied_copy = m.embedding_params * 2.0 if m.tie_word_embeddings else 0.0  # the last stage's LM head
    assert sum(w) == pytest.approx(m.weight_bytes(weight_dtype) + tied_copy, rel=1e-12)
    assert w[0] > w[1] and w[2] > w[1]  # the embedding on the first, the head on the last


@pytest.mark.parametrize("model, pp", [("llama-3.1-8b", 2), ("qwen3-30b-a3b", 3), ("deepseek-v2-lite", 4)])
def test_stage_times_add_up_to_the_step(model, pp):
    hw, m = load_hardware("h200"), load_model(model)
    one = instance_setup(hw, m, EngineConfig()).cost
    cm = instance_setup(hw, m, EngineConfig(pipeline_parallel_size=pp)).cost
    for kw in (dict(num_decodes=9, decode_context_tokens=9000, decode_kv_slots=9008),
               dict(prefill_chunks=[(700, 0), (100, 300)]),
               dict(num_decodes=3, decode_context_tokens=300, decode_kv_slots=320, prefill_chunks=[(256, 64)])):
        stages = cm.stage_times(**kw)
        assert len(stages) == pp
        assert sum(stages) == pytest.approx(cm.step_time(**kw), rel=1e-12)
        assert sum(o.time_s for o in cm.ops(**kw)) == pytest.approx(cm.step_time(**kw), rel=1e-12)
        tokens = kw.get("num_decodes", 0) + sum(c for c, _ in kw.get("prefill_chunks", []))
        # the whole step is one device's plus the hand-overs between stages
        assert cm.step_time(**kw) == pytest.approx(one.step_time(**kw) + (pp - 1) * cm.pp_send_op(tokens).time_s,
                                                   rel=1e-12)
        batch = Batch(**kw)
        kernels = cm.kernels_per_iteration(bool(batch.num_decodes), bool(batch.prefill_chunks))
        assert kernels == sum(o.kernels for o in cm.ops(**kw))


def test_a_stage_holds_its_layers_and_the_tightest_sets_the_pool():
    hw, m = load_hardware("h200"), load_model("llama-3.1-70b")
    assert not memory_plan(hw, m, EngineConfig()).fits  # 131 GiB of weights on one 139 GiB device
    plan = memory_plan(hw, m, EngineConfig(pipeline_parallel_size=2))
    assert plan.fits and "of 2, 40 layers, the tightest" in plan.verdict
    assert plan.kv_bytes_per_token == pytest.approx(m.kv_bytes_per_token() / 2)
    w = pp_stage_weight_bytes(m, "bf16", 2)
    # each stage's blocks from its own weights: the pool is the fewer
    per_stage = [int((plan.usable_bytes - x - plan.activation_bytes - plan.reserve_bytes) // plan.block_bytes) for x in w]
    assert plan.num_blocks == min(per_stage) and plan.weight_bytes in w


def _run(pp: int, dp: int = 1, router: str | None = None, **workload):
    extra = {"router": router} if router else {}
    sc = Scenario(hw="h200", model="llama-3.1-8b", engine=EngineConfig(pipeline_parallel_size=pp), dp=dp, **extra,
                  workload={"num_requests": 24, "input_len": {"value": 256}, "output_len": {"value": 64}, **workload})
    return sc, simulate_scenario(sc)


@pytest.mark.parametrize("router", ["round-robin", "least-outstanding"])
def test_replicas_of_a_pipeline_each_pass_their_own_stages(router):
    """dp = 2 pipelines of 2 stages: every replica's two virtual engines get requests, and with all
    48 requests at once the pair finishes in about the time one pipeline takes for half of them."""
    _, one = _run(2, num_requests=24, rate="inf")
    sc, two = _run(2, dp=2, router=router, num_requests=48, rate="inf")
    assert len(two.instances) == 4 and two.completed == 48
    assert all(i.completed > 0 for i in two.instances)
    # replica r is virtual engines 2r, 2r + 1: each replica got half the requests
    assert [two.instances[0].completed + two.instances[1].completed,
            two.instances[2].completed + two.instances[3].completed] == [24, 24]
    # separate stages: twice the requests on twice the devices take the same time (not twice)
    assert two.duration == pytest.approx(one.duration, rel=0.05)
    from npusim.scenario import summarize
    res = summarize(two, sc)
    assert res["parallel"]["devices"] == 4


def test_one_request_gets_no_overlap_and_many_fill_the_pipeline():
    # alone, each decode passes both stages in turn: TPOT is host + both stages, every stage half idle
    sc, run = _run(2, num_requests=4, max_concurrency=1, rate="inf")
    cm = run.instances[0].setup.cost
    host, stages, _, _ = cm.price_stages(Batch(num_decodes=1, decode_context_tokens=300, decode_kv_slots=304))
    assert run.tpot.total / run.tpot.n == pytest.approx(host + sum(stages), rel=0.02)
    busy = sum(i.busy_s for i in run.instances)
    assert busy < 1.0 * run.duration  # one stage at a time, at most
    # many at once: two virtual engines keep both stages busy at the same time
    sc, run = _run(2, rate="inf")
    busy = sum(i.busy_s for i in run.instances)
    assert 1.5 * run.duration < busy <= 2 * run.duration + 1e-9
    result = summarize(run, sc)
    assert result["parallel"]["devices"] == 2 and result["parallel"]["pipeline_parallel_size"] == 2
    # two devices' idle power all along
    assert result["energy"]["joules"] >= 2 * load_hardware("h200").idle_w * run.duration


def test_virtual_engines_split_the_blocks():
    sc, run = _run(2, rate="inf")
    plan = memory_plan(load_hardware("h200"), load_model("llama-3.1-8b"), EngineConfig(pipeline_parallel_size=2))
    assert [i.capacity_tokens for i in run.instances] == [plan.num_blocks // 2 * plan.block_size] * 2
    assert sum(i.completed for i in run.instances) == 24


@pytest.mark.parametrize("args, needle", [
    (["--pp", "8", "--tp", "2", "--hw", "ascend-310p3"],
     "--pp 8 x --tp 2 = 16 devices exceed the 2 of one ascend-310p3 node"),
    (["--pp", "2", "--instances", "2"], "--pp 2 with --instances 2"),
])
def test_infeasible_pipelines_say_why(args, needle):
    hw = [] if "--hw" in args else ["--hw", "h200"]
    rc, _, err = run_cli("simulate", *hw, "--model", "llama-3.1-8b", "--requests", "4", *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_step_reports_each_stage():
    rc, out, err = run_cli("step", "--hw", "h200", "--model", "llama-3.1-70b", "--pp", "2", "--batch", "16",
                           "--json")
    assert rc == 0, err
    r = json.loads(out)
    p = r["pipeline"]
    assert p["stage_layers"] == [40, 40] and r["devices"] == 2
    assert sum(p["stage_ms"]) == pytest.approx(r["iteration_ms"] - 1.0 - 0.0, rel=0.01)  # (the vllm profile's 1 ms host)
    assert p["tokens_per_s_one_batch"] == pytest.approx(16 / (r["iteration_ms"] / 1e3), rel=1e-9)
    # two batches in flight at most double it (limited by the slower stage)
    assert p["tokens_per_s_one_batch"] < p["tokens_per_s_pipelined"] <= 2 * p["tokens_per_s_one_batch"] + 1e-9
    assert p["tokens_per_s_pipelined"] <= 16 / (max(p["stage_ms"]) / 1e3) + 1e-9
    assert 0.45 < p["bubble_one_batch"] < 0.55


def test_a_pipeline_over_two_nodes_hands_over_between_them_on_the_scale_out_link():
    """Stage i runs on devices i*tp ..: with 8 GPUs a node, TP 8 x PP 2 puts each stage on a node
    of its own, and its hand-over goes over the InfiniBand link (50 GB/s, the profile's latency)
    instead of NVLink; TP 4 x PP 4 leaves the node once, between stages 1 and 2."""
    from npusim.costmodel import CostModel
    from npusim.specs import load_hardware, load_model, tp_shard
    hw = load_hardware("h200")
    m = load_model("llama-3.1-70b")
    cm = CostModel(hw, tp_shard(m, 8), tp=8, pp=2)
    assert cm.cross_node == [True]
    op = next(o for o in cm.ops(num_decodes=32, decode_context_tokens=32 * 2048, decode_kv_slots=32 * 2048)
              if o.name == "pp_send")
    nbytes = 2.0 * 32 * m.hidden_size * 2
    assert op.bytes == nbytes
    # the library's per-message cost, the network's latency, and the bytes at the scale-out link
    assert op.time_s == pytest.approx((hw.link_latency_us + hw.internode_latency_us) * 1e-6
                                      + nbytes / (hw.internode_link_gbs * 1e9 * hw.link_efficiency))
    four = CostModel(hw, tp_shard(m, 4), tp=4, pp=4)
    assert four.cross_node == [False, True, False]
    inside, across = four.pp_send_op(32).time_s, four.pp_send_op(32, cross_node=True).time_s
    assert across > inside
    for name in ("ascend-910b3", "ascend-910c-die", "a100-sxm-80g"):  # never cheaper than inside a node
        other = load_hardware(name)
        c = CostModel(other, tp_shard(load_model("llama-3.1-8b"), 2), tp=2, pp=2)
        for tokens in (1, 8192):
            assert c.pp_send_op(tokens, cross_node=True).time_s > c.pp_send_op(tokens).time_s, (name, tokens)
    stages = four.stage_times(num_decodes=32, decode_context_tokens=32 * 2048, decode_kv_slots=32 * 2048)
    assert sum(stages) == pytest.approx(four.step_time(num_decodes=32, decode_context_tokens=32 * 2048,
                                                       decode_kv_slots=32 * 2048), rel=1e-12)
    plain = CostModel(hw, tp_shard(m, 4), tp=4, pp=4)
    plain.cross_node = [False, False, False]  # the same stages, every hand-over inside a node
    assert four.step_time(32, 32 * 2048, 32 * 2048) - plain.step_time(32, 32 * 2048, 32 * 2048) == \
        pytest.approx(across - inside, rel=1e-9)


def test_pipelines_beyond_a_node_need_the_link_and_whole_tp_groups(tmp_path):
    import yaml
    from conftest import assert_one_line_error
    from npusim.specs import HW_PROFILE_DIR
    assert_one_line_error("step", ["--hw", "ascend-310p3", "--model", "llama-3.1-8b", "--tp", "2", "--pp", "4"],
                          "no link between nodes (internode_link_gbs)")
    data = yaml.safe_load((HW_PROFILE_DIR / "h200.yaml").read_text())
    data["node_devices"]["value"] = 6  # a node of six: a TP-4 stage cannot sit in whole nodes
    data["calibration_files"] = []
    p = tmp_path / "six.yaml"
    p.write_text(yaml.safe_dump(data))
    assert_one_line_error("step", ["--hw", str(p), "--model", "llama-3.1-8b", "--tp", "4", "--pp", "2"],
                          "straddle two nodes")


def test_the_link_between_nodes_is_given_whole():
    import yaml
    from npusim.errors import NpusimError
    from npusim.specs import HW_PROFILE_DIR, hardware_from_mapping
    data = yaml.safe_load((HW_PROFILE_DIR / "h200.yaml").read_text())
    del data["internode_latency_us"]
    with pytest.raises(NpusimError, match="internode_link_gbs and internode_latency_us come together"):
        hardware_from_mapping(data, "my.yaml")
