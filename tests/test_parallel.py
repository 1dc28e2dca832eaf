"""Tensor parallelism: the shard each device holds, the collectives' cost, memory per device, and
one device unchanged."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli
from npusim.costmodel import Batch, CostModel, instance_setup
from npusim.errors import NpusimError
from npusim.specs import EngineConfig, ModelSpec, ep_shard, load_hardware, load_model, tp_shard


def _json(*args):
    rc, out, err = run_cli(*args, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_tp1_is_the_single_device_exactly():
    base = _json("step", "--hw", "h200", "--model", "llama-3.1-8b", "--batch", "16")
    one = _json("step", "--hw", "h200", "--model", "llama-3.1-8b", "--batch", "16", "--tp", "1")
    assert one == base and base["comm_ms"] == 0.0
    sim = _json("simulate", "--requests", "40")
    assert {k: v for k, v in _json("simulate", "--requests", "40", "--tp", "1").items() if k != "wall_seconds"} \
        == {k: v for k, v in sim.items() if k != "wall_seconds"}


def test_a_shard_divides_heads_mlp_and_vocabulary_and_keeps_the_hidden_size():
    m = load_model("llama-3.1-70b")
    s = tp_shard(m, 4)
    assert (s.num_heads, s.num_kv_heads, s.intermediate_size, s.hidden_size) == (16, 2, 7168, 8192)
    assert s.vocab_size * 4 >= m.vocab_size
    # the shards' weights add up to the model's (norms, a few KB, are on every device)
    assert 4 * s.weight_bytes("bf16") == pytest.approx(m.weight_bytes("bf16"), rel=1e-3)
    assert s.kv_bytes_per_token("bf16") == m.kv_bytes_per_token("bf16") / 4


def test_more_devices_than_kv_heads_replicate_one_kv_head_on_each():
    m = ModelSpec(name="gqa2", num_layers=2, hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
                  intermediate_size=4096, vocab_size=32000, max_position_embeddings=4096, source="test model")
    s = tp_shard(m, 4)
    assert (s.num_heads, s.num_kv_heads) == (4, 1)  # 4 devices hold 4 KV heads: each of the 2 twice
    assert s.kv_dim * 4 == 2 * m.kv_dim


@pytest.mark.parametrize("args, needle", [
    (["--hw", "h200", "--model", "llama-3.1-8b", "--tp", "3"], "--tp 3: llama-3.1-8b's 32 attention heads do not divide among 3"),
    (["--hw", "ascend-910", "--model", "llama-2-13b", "--tp", "8"], "--tp 8 exceeds the 4 devices of one ascend-910 node"),
    (["--hw", "h200", "--model", "qwen2.5-0.5b", "--tp", "4"], "14 attention heads do not divide among 4"),
])
def test_infeasible_layouts_say_why_in_one_line(args, needle):
    assert_one_line_error("step", args, needle)


def test_tp_with_instances_sharing_devices_is_refused():
    assert_one_line_error("simulate", ["--hw", "h200", "--tp", "2", "--instances", "2", "--requests", "5"],
                          "--tp 2 with --instances 2")


def _cost(hw="h200", tp=2, topology=None):
    h = load_hardware(hw)
    if topology:
        h = h.model_copy(update={"link_topology": topology})
    return CostModel(h, tp_shard(load_model("llama-3.1-8b"), tp), tp=tp), h


@pytest.mark.parametrize("hw", ["h200", "ascend-910b2"])
def test_all_reduce_time_follows_the_link_bandwidth_and_the_message_size(hw):
    for tp in (2, 4, 8):
        cm, h = _cost(hw, tp)
        beta = h.link_gbs * 1e9 * h.link_efficiency
        small, large = cm.collective("x", "all_reduce", 1e6), cm.collective("x", "all_reduce", 2e6)
        # slope: each device's link carries 2(N-1)/N of the message; intercept: 2 steps of latency
        assert large.time_s - small.time_s == pytest.approx(2 * (tp - 1) / tp * 1e6 / beta, rel=1e-9)
        assert 2 * small.time_s - large.time_s == pytest.approx(2 * h.link_latency_us * 1e-6, rel=1e-9)
        gather = cm.collective("x", "all_gather", 1e6)
        assert gather.time_s == pytest.approx(h.link_latency_us * 1e-6 + (tp - 1) / tp * 1e6 / beta, rel=1e-9)
    ring, h = _cost(hw, 8, "ring")
    assert ring.collective("x", "all_reduce", 0.0).time_s == 0.0
    tiny = ring.collective("x", "all_reduce", 1.0).time_s
    assert tiny == pytest.approx(2 * 7 * h.link_latency_us * 1e-6, rel=1e-3)  # a ring: 2(N-1) steps


def test_each_layer_all_reduces_twice_the_tokens_hidden_states():
    cm, h = _cost("h200", 2)
    ops = {o.name: o for o in cm.ops(num_decodes=8, decode_context_tokens=8 * 1000, decode_kv_slots=8 * 1008)}
    L, hidden = 32, 4096
    for name in ("all_reduce_attn", "all_reduce_mlp"):
        assert ops[name].bound == "comm" and ops[name].kernels == L
        assert ops[name].bytes == pytest.approx(L * 2 * (2 - 1) / 2 * 8 * hidden * 2)
    assert "logits_gather" in ops


def test_tensor_parallel_decode_is_faster_and_pays_more_in_collectives():
    one = _json("step", "--hw", "h200", "--model", "llama-3.1-8b", "--batch", "32", "--context", "2048")
    two = _json("step", "--hw", "h200", "--model", "llama-3.1-8b", "--batch", "32", "--context", "2048", "--tp", "2")
    four = _json("step", "--hw", "h200", "--model", "llama-3.1-8b", "--batch", "32", "--context", "2048", "--tp", "4")
    assert four["device_ms"] < two["device_ms"] < one["device_ms"]
    assert two["device_ms"] > one["device_ms"] / 2  # collectives and fixed costs: less than linear
    assert 0 < two["comm_share"] < four["comm_share"]
    assert two["memory"]["num_blocks"] > 2 * one["memory"]["num_blocks"]  # half the weights: room for KV


def test_a_model_that_fits_no_single_device_fits_across_several():
    rc, _, err = run_cli("step", "--hw", "h200", "--model", "llama-3.1-70b", "--json")
    assert rc == 2 and "does not fit" in err
    d = _json("step", "--hw", "h200", "--model", "llama-3.1-70b", "--tp", "2")
    assert d["memory"]["fits"] and d["memory"]["weights_gib"] == pytest.approx(131.42 / 2, rel=0.01)


def test_instance_setup_prices_the_shard():
    setup = instance_setup(load_hardware("ascend-910b2"), load_model("qwen3-32b"),
                           EngineConfig(tensor_parallel_size=4))
    assert setup.cost.tp == 4 and setup.cost.model.num_heads == 16 and setup.plan.fits
    with pytest.raises(NpusimError, match="--tp 4 with --instances 2"):
        instance_setup(load_hardware("ascend-910b2"), load_model("qwen3-32b"), EngineConfig(tensor_parallel_size=4), 2)


# --------------------------------------------------------------------------- data parallel

def test_dp1_is_one_instance_and_dp_replicas_multiply_a_saturated_throughput():
    base = _json("simulate", "--requests", "400", "--rate", "inf", "--input-len", "512", "--output-len", "64")
    assert {k: v for k, v in _json("simulate", "--requests", "400", "--rate", "inf", "--input-len", "512",
                                   "--output-len", "64", "--dp", "1").items() if k != "wall_seconds"} \
        == {k: v for k, v in base.items() if k != "wall_seconds"}
    two = _json("simulate", "--requests", "800", "--rate", "inf", "--input-len", "512", "--output-len", "64",
                "--dp", "2")
    # two devices, each with the same 400 requests as the one above: twice the tokens in the same time
    assert two["output_throughput"] == pytest.approx(2 * base["output_throughput"], rel=0.02)
    assert two["parallel"]["devices"] == 2 and [p["completed"] for p in two["per_instance"]] == [400, 400]
    assert two["energy"]["mean_power_w"] == pytest.approx(2 * base["energy"]["mean_power_w"], rel=0.05)


def test_least_outstanding_steers_around_a_busy_replica(tmp_path):
    # one long request first, then short ones: round robin still sends half to its replica
    trace = tmp_path / "t.csv"
    rows = ["0,2000,1500"] + [f"{0.5 + 0.05 * i:.2f},100,20" for i in range(40)]
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "\n".join(rows) + "\n")
    args = ("simulate", "--trace", str(trace), "--dp", "2", "--max-num-seqs", "4")
    rr = _json(*args)
    lo = _json(*args, "--router", "least-outstanding")
    assert [p["completed"] for p in rr["per_instance"]] == [21, 20]
    first, second = (p["completed"] for p in lo["per_instance"])
    assert second > first  # the replica holding the long request gets fewer of the short ones
    assert lo["mean_ttft_ms"] <= rr["mean_ttft_ms"]


@pytest.mark.parametrize("args, needle", [
    (["--dp", "2", "--instances", "2"], "dp replicas each own their devices"),
    (["--router", "least-outstanding"], "router sends requests between replicas or instances: it needs dp >= 2"),
    (["--dp", "2", "--router", "random"], "--router must be round-robin or least-outstanding or prefix-aware"),
])
def test_data_parallel_contradictions_are_refused(args, needle):
    assert_one_line_error("simulate", ["--requests", "5", *args], needle)


def test_prefix_aware_routing_keeps_a_prefix_on_one_replica_and_hits_its_cache(tmp_path):
    sc = tmp_path / "s.yaml"
    sc.write_text("dp: 2\nworkload: {num_requests: 240, rate: 6.0, shared_prefix_len: 2048, shared_prefix_groups: 40,\n"
                  "           input_len: {kind: fixed, value: 2300}, output_len: {kind: fixed, value: 64}}\n")
    rr = _json("simulate", str(sc))
    pa = _json("simulate", str(sc), "--router", "prefix-aware")
    # round robin computes each of the 40 prefixes on both replicas; prefix-aware on one
    assert pa["kv_cache"]["prefix_cache_hit_rate"] > rr["kv_cache"]["prefix_cache_hit_rate"] + 0.05
    assert pa["mean_ttft_ms"] < rr["mean_ttft_ms"]
    assert min(p["completed"] for p in pa["per_instance"]) > 0.3 * 240  # and the load still spreads



# --------------------------------------------------------------------------- expert parallel

def test_expert_parallelism_keeps_experts_whole_and_pays_for_the_busiest_device():
    hw, model = load_hardware("h200"), load_model("qwen3-30b-a3b")
    tp_only = instance_setup(hw, model, EngineConfig(tensor_parallel_size=4))
    ep = instance_setup(hw, model, EngineConfig(tensor_parallel_size=4, expert_parallel_size=4))
    assert ep.plan.weight_bytes == tp_only.plan.weight_bytes  # the same weights per device, laid out otherwise
    def gate_up(setup, tokens):
        return next(o for o in setup.cost.layer_dense_ops(tokens) if o.name == "gate_up_proj")
    # one token: 8 experts; split 4 ways each device reads a quarter of all 8; whole, the busiest
    # device holds several of them entire
    assert gate_up(ep, 1).bytes > gate_up(tp_only, 1).bytes
    # many tokens: the busiest device's share tends to the mean, a quarter of the routed work
    big = 8192
    assert gate_up(ep, big).flops == pytest.approx(2 * big * 8 / 4 * 2048 * 2 * 768, rel=0.05)
    assert gate_up(ep, big).flops > 2 * big * 8 / 4 * 2048 * 2 * 768  # (never below the mean)


@pytest.mark.parametrize("args, needle", [
    (["--model", "llama-3.1-8b", "--tp", "2", "--ep", "2"], "--ep 2: llama-3.1-8b has no experts"),
    (["--model", "qwen3-30b-a3b", "--tp", "4", "--ep", "2"], "--ep 2 with --tp 4: the experts run over the tensor-parallel group"),
    (["--model", "qwen3-30b-a3b", "--tp", "4", "--ep", "6"], "or over whole groups of data-parallel ranks (a multiple of 4)"),
])
def test_expert_parallel_layouts_that_cannot_run_say_why(args, needle):
    assert_one_line_error("step", ["--hw", "h200", *args], needle)


def test_mixtral_one_expert_per_device():
    d = _json("step", "--hw", "ascend-910b2", "--model", "mixtral-8x7b", "--tp", "8", "--ep", "8")
    assert d["ep"] == 8 and d["memory"]["fits"]


def test_analyze_prices_the_tensor_parallel_point_as_step_does():
    a = _json("analyze", "--hw", "h200", "--model", "llama-3.1-70b", "--tp", "2", "--batch", "32", "--context", "2048")
    # (analyze counts the token being generated: its context 2048 is step's 2049)
    s = _json("step", "--hw", "h200", "--model", "llama-3.1-70b", "--tp", "2", "--batch", "32", "--context", "2049")
    assert a["point"]["device_step_ms"] == pytest.approx(s["device_ms"], rel=1e-9)
    assert a["point"]["comm_ms"] == pytest.approx(s["comm_ms"], rel=1e-9)
    assert_one_line_error("analyze", ["--hw", "h200", "--model", "llama-3.1-70b", "--tp", "2", "--compare"],
                          "--compare runs the simulator on one device's grid")
    assert_one_line_error("analyze", ["--hw", "ascend-910b4", "--model", "llama-3.1-70b", "--tp", "2"],
                          "does not fit")


def test_analyze_data_parallel_replicas_multiply_the_point_and_agree_with_the_experts_ranks():
    """--dp N: N replicas of the point on devices of their own, N x its tokens/s; for an MoE model
    whose experts span the ranks (--ep = tp x dp) the same point as the implicit ranks of --ep."""
    one = _json("analyze", "--hw", "h200", "--model", "llama-3.1-8b", "--tp", "2")
    three = _json("analyze", "--hw", "h200", "--model", "llama-3.1-8b", "--tp", "2", "--dp", "3")
    assert three["point"] == one["point"]  # each replica is the point
    assert three["replicas"] == {"dp": 3, "devices": 6, "tokens_per_s": pytest.approx(3 * one["point"]["tokens_per_s"])}
    assert one["replicas"]["dp"] == 1 and one["replicas"]["devices"] == 2
    implicit = _json("analyze", "--hw", "h200", "--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "4")
    told = _json("analyze", "--hw", "h200", "--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "4", "--dp", "2")
    assert told == implicit and told["replicas"]["dp"] == 2 and told["replicas"]["devices"] == 4
    for args, needle in ((["--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "4", "--dp", "3"], "--dp must be 2, got 3"),
                         (["--model", "llama-3.1-8b", "--dp", "2", "--instances", "2"], "give one of the two"),
                         (["--model", "llama-3.1-8b", "--dp", "2", "--compare"], "with --dp, use simulate --dp"),
                         (["--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "3", "--dp", "2"], "a multiple of 2")):
        assert_one_line_error("analyze", ["--hw", "h200", *args], needle)



# --------------------------------------------------------------------------- data-parallel attention, experts over the ranks

def test_data_parallel_ranks_hold_whole_attention_and_their_share_of_the_experts():
    hw, m = load_hardware("h200"), load_model("deepseek-v2-lite")
    one = instance_setup(hw, m, EngineConfig())
    rank = instance_setup(hw, m, EngineConfig(expert_parallel_size=4))
    routed = m.num_moe_layers * m.num_experts * 3 * m.hidden_size * m.moe_intermediate_size * 2  # bf16
    # three quarters of the routed experts leave each rank; attention, shared experts, edges stay
    assert one.plan.weight_bytes - rank.plan.weight_bytes == pytest.approx(routed * 3 / 4, rel=1e-6)
    assert rank.cost.model.num_heads == m.num_heads  # (attention is whole on every rank)
    assert rank.plan.kv_bytes_per_token == one.plan.kv_bytes_per_token


def _same_expert_work(rank: CostModel, group: CostModel, T: int):
    """The ops of one MoE layer of a rank bringing T tokens (of 4 alike ranks) and of a group
    bringing 4 T, after checking that their experts' GEMMs do the same work."""
    r = {o.name: o for o in rank.layer_dense_ops(T)}
    g = {o.name: o for o in group.layer_dense_ops(4 * T)}
    for name in ("gate_up_proj", "down_proj"):
        assert r[name].flops == pytest.approx(g[name].flops, rel=1e-12)
        assert r[name].bytes == pytest.approx(g[name].bytes, rel=1e-12)
    return r, g


def test_a_rank_of_ep_sees_what_a_tp_group_sees_with_every_ranks_tokens():
    """Symmetric ranks: the busiest device's experts get the same work whether ep ranks each bring
    T tokens (data-parallel attention) or one tensor-parallel group of ep devices brings ep x T."""
    hw, m = load_hardware("h200"), load_model("qwen3-30b-a3b")
    rank = CostModel(hw, ep_shard(m, 4), tp=1, ep=4)
    group = CostModel(hw, tp_shard(m, 4), tp=4, ep=4)
    T = 32
    r, g = _same_expert_work(rank, group, T)
    # tokens cross the ranks both ways: (ep - 1)/ep of each rank's routed rows, over the node link
    sent = T * m.experts_per_token * m.hidden_size * 2
    for name in ("all_to_all_dispatch", "all_to_all_combine"):
        assert r[name].bytes == pytest.approx(sent * 3 / 4) and r[name].bound == "comm"
        assert r[name].time_s == pytest.approx(hw.link_latency_us * 1e-6 + sent * 3 / 4
                                               / (hw.link_gbs * 1e9 * hw.link_efficiency))
    assert "all_to_all_dispatch" not in g and "all_reduce_mlp" in g and "all_reduce_mlp" not in r


def test_simulate_data_parallel_experts_needs_as_many_replicas():
    assert_one_line_error("simulate", ["--hw", "h200", "--model", "qwen3-30b-a3b", "--ep", "2", "--requests", "4"],
                          "it needs --dp 2")
    rc, out, err = run_cli("simulate", "--hw", "h200", "--model", "qwen3-30b-a3b", "--ep", "2", "--dp", "2",
                           "--requests", "16", "--json")
    assert rc == 0, err
    par = json.loads(out)["parallel"]
    assert par["devices"] == 2 and par["expert_parallel_size"] == 2 and par["comm_share_of_decode_step"] > 0


def _dp_run(ep: int, prompts: list[int], out: int = 64):
    """Two data-parallel ranks of Qwen3-30B-A3B on an H200 node, one request each (round robin),
    sent at once; expert parallel over the ranks (ep 2) or every rank with all experts (ep 1)."""
    from npusim.scenario import Scenario, simulate_scenario
    from npusim.workload import WorkloadSpec
    sc = Scenario(hw="h200", model="qwen3-30b-a3b", engine=EngineConfig(expert_parallel_size=ep),
                  dp=2, workload=WorkloadSpec(input_lens=prompts, output_lens=[out] * len(prompts)), seed=0)
    return simulate_scenario(sc)


def test_expert_parallel_ranks_step_together():
    """vLLM's DP attention with EP: every rank joins every step (an idle one with a dummy batch), so
    a step lasts as long as the slowest rank's. A long prompt on rank 0, a short one on rank 1:
    in lock step the short request's first token waits for the long one's first 8k-token chunk,
    while independent replicas (ep 1) serve it at its own pace, as if the other rank were empty;
    the long request, the slowest of every step, finishes a little after it would alone: its
    experts also take the short request's tokens."""
    lock, free = _dp_run(2, [16000, 16]), _dp_run(1, [16000, 16])
    # independent replicas: the short request as if the other rank had nothing
    assert min(free.e2el.values) == pytest.approx(min(_dp_run(1, [16]).e2el.values), rel=1e-9)
    # lock step: it waits for the long prompt's first chunk, and is slower than with an idle partner
    short_alone = _dp_run(2, [16])
    assert min(lock.ttft.values) > 10 * min(short_alone.ttft.values)
    assert min(lock.e2el.values) > min(short_alone.e2el.values)
    # the long request is the slowest rank of every step; the partner's tokens (16, then one a
    # step) reach its experts too: in decode twice the tokens, up to twice the experts read
    alone = max(_dp_run(2, [16000]).e2el.values)
    assert alone < max(lock.e2el.values) < 1.1 * alone
    # two alike ranks: each as loaded as the other, both done together
    twin = _dp_run(2, [16000, 16000])
    assert min(twin.e2el.values) == max(twin.e2el.values) > max(lock.e2el.values)


def test_a_rank_without_requests_still_takes_every_step():
    """The idle rank's device runs the dummy batch of every step, from the launch of the rank that
    has the request (after its host work) to the step's end: busy exactly as long as that rank."""
    run = _dp_run(2, [512])
    busy, idle = sorted(run.instances, key=lambda i: i.stats.output_tokens, reverse=True)
    assert busy.stats.output_tokens == 64 and idle.stats.output_tokens == 0
    assert idle.busy_s == pytest.approx(busy.busy_s, rel=1e-9) and idle.busy_s > 0
    assert idle.busy_s < max(run.e2el.values)  # (the host's share of each step is not device time)


# --------------------------------------------------------------------------- EP over data-parallel ranks of TP groups

def test_a_device_of_tp_by_dp_ranks_holds_what_the_layout_says():
    """--tp 2 --ep 8: 4 ranks of 2 devices; a device holds half the attention and E/8 whole experts."""
    hw, m = load_hardware("h200"), load_model("qwen3-30b-a3b")
    mixed = instance_setup(hw, m, EngineConfig(tensor_parallel_size=2, expert_parallel_size=8))
    tp2 = instance_setup(hw, m, EngineConfig(tensor_parallel_size=2))
    routed = m.num_moe_layers * m.num_experts * 3 * m.hidden_size * m.moe_intermediate_size * 2  # bf16
    # tp 2 holds half of every expert; ep 8 an eighth of them: 1/2 - 1/8 of all routed bytes fewer
    assert tp2.plan.weight_bytes - mixed.plan.weight_bytes == pytest.approx(routed * (1 / 2 - 1 / 8), rel=1e-6)
    assert mixed.cost.model.num_heads == m.num_heads // 2
    assert mixed.plan.kv_bytes_per_token == tp2.plan.kv_bytes_per_token
    assert mixed.cost.dp_ranks == 4


def test_tp_by_dp_experts_do_the_work_of_the_whole_ep_group():
    """Symmetric ranks: the busiest device's experts get the same work whether 4 ranks of 2 devices
    each bring T tokens or one tensor-parallel group of 8 devices brings 4 T; each of a rank's
    devices sends half its rank's tokens all-to-all."""
    hw, m = load_hardware("h200"), load_model("qwen3-30b-a3b")
    mixed = CostModel(hw, ep_shard(tp_shard(m, 2), 4, 8), tp=2, ep=8)
    group = CostModel(hw, tp_shard(m, 8), tp=8, ep=8)
    T = 32
    r, g = _same_expert_work(mixed, group, T)
    sent = T / 2 * m.experts_per_token * m.hidden_size * 2
    assert r["all_to_all_dispatch"].bytes == pytest.approx(sent * 7 / 8)
    assert "all_reduce_mlp" in r and "all_reduce_attn" in r  # (the rank's own TP collectives stay)


@pytest.mark.parametrize("hw_name, model, tp, ep", [("h200", "qwen3-30b-a3b", 2, 8),
                                                     ("ascend-910b3", "qwen3-235b-a22b", 8, 16)])  # (2 nodes)
def test_uneven_ranks_experts_get_every_ranks_tokens_with_tp_groups(hw_name, model, tp, ep):
    """Ranks of tp devices bringing unequal batches: the experts of every device do the work of all
    the step's tokens (`all_tokens`, as one group of ep devices would), while what a device sends
    all-to-all follows its own rank's tokens only (1/tp of them each)."""
    hw, m = load_hardware(hw_name), load_model(model)
    mixed = instance_setup(hw, m, EngineConfig(tensor_parallel_size=tp, expert_parallel_size=ep)).cost
    group = CostModel(hw.model_copy(update={"node_devices": ep}), tp_shard(m, ep), tp=ep, ep=ep)
    T, everyone = 24, 24 + 200  # this rank 24 tokens, the others 200 between them
    r = {o.name: o for o in mixed.layer_dense_ops(T, all_tokens=everyone)}
    g = {o.name: o for o in group.layer_dense_ops(everyone)}
    alone = {o.name: o for o in mixed.layer_dense_ops(T)}
    for name in ("gate_up_proj", "down_proj"):
        assert r[name].flops == pytest.approx(g[name].flops, rel=1e-12)
        assert r[name].flops > 2 * alone[name].flops
    rows = T / tp * m.experts_per_token * m.hidden_size * 2
    assert r["all_to_all_dispatch"].bytes == pytest.approx(rows * (ep - 1) / ep)
    assert r["all_to_all_dispatch"].bytes == alone["all_to_all_dispatch"].bytes


def test_pipeline_with_data_parallel_experts_is_refused_in_one_line():
    for args in (["step", "--tp", "4", "--ep", "8", "--pp", "2"],
                 ["simulate", "--tp", "4", "--ep", "8", "--pp", "2", "--dp", "2", "--requests", "4"]):
        assert_one_line_error(args[0], ["--hw", "h200", "--model", "qwen3-30b-a3b", *args[1:]],
                              "--pp 2 with data-parallel experts (--ep 8 --tp 4)")
    with pytest.raises(NpusimError, match="ranks in lock step through pipeline stages"):
        instance_setup(load_hardware("h200"), load_model("qwen3-30b-a3b"),
                       EngineConfig(tensor_parallel_size=2, expert_parallel_size=4, pipeline_parallel_size=2))
    # instances are refused before the replica count is asked for
    assert_one_line_error("simulate", ["--hw", "h200", "--model", "qwen3-30b-a3b", "--ep", "2", "--instances", "2",
                                       "--requests", "4"], "expert-parallel ranks each own their devices")


def test_lock_step_ranks_experts_see_every_ranks_tokens():
    hw, m = load_hardware("h200"), load_model("qwen3-30b-a3b")
    cost = CostModel(hw, ep_shard(m, 4), tp=1, ep=4)
    one = Batch(num_decodes=1, decode_context_tokens=1000, decode_kv_slots=1000)
    full = Batch(num_decodes=61, decode_context_tokens=61000, decode_kv_slots=61000)
    # not given, the others are taken as loaded alike: the same as giving 4 x this rank's tokens
    assert cost.price(one) == cost.price(one, 4)
    assert cost.price(full, 4 * 61) == cost.price(full)
    # a rank of 1 token beside three of 61 does its share of the experts' work on all 184: what
    # four alike ranks of 46 tokens give each device's experts
    alone = dict((o.name, o) for o in cost.ops(1, 1000, 1000))
    shared = dict((o.name, o) for o in cost.ops(1, 1000, 1000, all_tokens=1 + 3 * 61))
    even = dict((o.name, o) for o in cost.ops(46, 46000, 46000))
    for name in ("gate_up_proj", "down_proj"):
        assert shared[name].flops == pytest.approx(even[name].flops, rel=1e-12)
        assert shared[name].bytes == pytest.approx(even[name].bytes, rel=1e-12)
        assert shared[name].flops > 20 * alone[name].flops
    assert shared["attention_decode"].time_s == alone["attention_decode"].time_s  # (its own sequences')
    assert shared["all_to_all_dispatch"].bytes == alone["all_to_all_dispatch"].bytes  # (its own tokens')
    assert cost.price(one, 1 + 3 * 61)[1] > cost.price(one)[1]
    # the sum of ops and the hot path agree under all_tokens too
    assert sum(o.time_s for o in cost.ops(1, 1000, 1000, all_tokens=184)) == pytest.approx(
        cost.step_time(1, 1000, 1000, all_tokens=184), rel=1e-12)


def test_simulate_tp_by_dp_experts_runs_every_device_in_lock_step():
    assert_one_line_error("simulate", ["--hw", "h200", "--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "4",
                                       "--requests", "4"], "it needs --dp 2")
    rc, out, err = run_cli("simulate", "--hw", "h200", "--model", "qwen3-30b-a3b", "--tp", "2", "--ep", "4",
                           "--dp", "2", "--requests", "16", "--json")
    assert rc == 0, err
    par = json.loads(out)["parallel"]
    assert par["devices"] == 4 and par["lock_step"] and par["expert_parallel_size"] == 4


def test_an_all_to_all_over_two_nodes_waits_for_the_slower_link():
    """--tp 8 --ep 16 on 8-device nodes: each device sends 7/16 of its rows within its node and
    8/16 to the other node, both at once; the slower link (between nodes) sets the time."""
    hw, m = load_hardware("ascend-910b3"), load_model("qwen3-235b-a22b")
    cost = instance_setup(hw, m, EngineConfig(tensor_parallel_size=8, expert_parallel_size=16)).cost
    T = 64
    op = next(o for o in cost.layer_dense_ops(T) if o.name == "all_to_all_dispatch")
    rows = T / 8 * m.experts_per_token * m.hidden_size * 2
    assert op.bytes == pytest.approx(rows * 15 / 16)
    remote = rows * 8 / 16 / (hw.internode_link_gbs * 1e9 * hw.link_efficiency)
    local = rows * 7 / 16 / (hw.link_gbs * 1e9 * hw.link_efficiency)
    assert remote > local
    assert op.time_s == pytest.approx((hw.link_latency_us + hw.internode_latency_us) * 1e-6 + remote, rel=1e-12)
    # nodes of 6: 16 devices are not whole nodes
    with pytest.raises(NpusimError, match="must fill whole nodes"):
        instance_setup(hw.model_copy(update={"node_devices": 6}), load_model("qwen3-30b-a3b"),
                       EngineConfig(tensor_parallel_size=2, expert_parallel_size=16))
    # a profile without a link between nodes keeps the experts in one node
    no_link = hw.model_copy(update={"internode_link_gbs": None, "internode_latency_us": None})
    with pytest.raises(NpusimError, match="no link between nodes"):
        instance_setup(no_link, m, EngineConfig(tensor_parallel_size=8, expert_parallel_size=16))


def test_tensor_parallel_over_two_nodes_reduces_hierarchically():
    """--tp 16 on 8-device nodes: reduce-scatter in each node, all-reduce of 1/8 between the two
    nodes, all-gather in each node; slower than the same collective over a 16-device node."""
    hw, m = load_hardware("ascend-910b3"), load_model("qwen3-235b-a22b")
    cost = instance_setup(hw, m, EngineConfig(tensor_parallel_size=16)).cost
    T = 64
    op = next(o for o in cost.layer_dense_ops(T) if o.name == "all_reduce_attn")
    B = T * m.hidden_size * 2
    link, inter = hw.link_gbs * 1e9 * hw.link_efficiency, hw.internode_link_gbs * 1e9 * hw.link_efficiency
    assert hw.link_topology != "ring"
    intra = 7 / 8 * B
    expect = (2 * (hw.link_latency_us * 1e-6 + intra / link)
              + 2 * (hw.link_latency_us + hw.internode_latency_us) * 1e-6 + (B / 8) / inter)
    assert op.time_s == pytest.approx(expect, rel=1e-12)
    assert op.bytes == pytest.approx(2 * intra + B / 8)
    one_node = CostModel(hw.model_copy(update={"node_devices": 16}), tp_shard(m, 16), tp=16)
    flat = next(o for o in one_node.layer_dense_ops(T) if o.name == "all_reduce_attn")
    assert op.time_s > flat.time_s
    d = _json("step", "--hw", "ascend-910b3", "--model", "qwen3-235b-a22b", "--tp", "16", "--batch", "8")
    assert d["tp"] == 16 and d["memory"]["fits"]
    assert_one_line_error("step", ["--hw", "ascend-910b3", "--model", "qwen3-235b-a22b", "--tp", "12"],
                          "across nodes it must fill whole nodes (a multiple of 8)")
    no_link = hw.model_copy(update={"internode_link_gbs": None, "internode_latency_us": None})
    with pytest.raises(NpusimError, match="no link between nodes"):
        instance_setup(no_link, m, EngineConfig(tensor_parallel_size=16))
