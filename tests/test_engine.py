"""The discrete-event simulator: behaviour, conservation, physics, determinism."""

import json
import math

import pytest

from conftest import assert_one_line_error, run_cli
from npusim.costmodel import CostModel
from npusim.scenario import Scenario, run_scenario, simulate_scenario
from npusim.specs import EngineConfig, load_hardware, load_model
from npusim.workload import LengthDist, WorkloadSpec


def scenario(n=40, prompt=256, output=64, rate=math.inf, **kw) -> Scenario:
    engine = kw.pop("engine", {})
    wl = dict(num_requests=n, rate=rate, input_len=LengthDist(kind="fixed", value=prompt),
              output_len=LengthDist(kind="fixed", value=output))
    wl.update(kw.pop("workload", {}))
    return Scenario(engine=EngineConfig(**engine), workload=WorkloadSpec(**wl), **kw)


def strip(result):
    return {k: v for k, v in result.items() if k != "wall_seconds"}


def test_same_seed_same_result_and_other_seed_differs():
    sc = Scenario(workload=WorkloadSpec(num_requests=60, rate=6.0, input_len=LengthDist(kind="sharegpt"),
                                        output_len=LengthDist(kind="sharegpt")), seed=3)
    a, b = run_scenario(sc), run_scenario(sc)
    assert json.dumps(strip(a), sort_keys=True) == json.dumps(strip(b), sort_keys=True)
    c = run_scenario(sc.model_copy(update={"seed": 4}))
    assert strip(c)["total_input_tokens"] != strip(a)["total_input_tokens"]


def test_conservation_every_request_completes_or_is_rejected():
    sc = scenario(n=50, prompt=1000, output=100, rate=20.0, engine=dict(max_model_len=1050))
    sc.workload.input_len = LengthDist(kind="uniform", low=100, high=1100)
    r = run_scenario(sc)
    assert r["completed"] + len(r["rejected"]) == 50
    assert r["rejected"], "prompts above 950 tokens cannot fit max_model_len 1050"
    for item in r["rejected"]:
        assert "exceeds max_model_len 1050" in item["reason"]


def test_one_request_alone_takes_the_sum_of_its_iterations():
    P, O = 700, 20
    sc = scenario(n=1, prompt=P, output=O, engine=dict(block_size=128))
    r = run_scenario(sc)
    eng = r["scenario"]["engine"]
    cm = CostModel(load_hardware(sc.hw), load_model(sc.model), graph_mode=eng["cudagraph_mode"],
                   capture_tokens=eng["max_cudagraph_capture_size"])
    # the device's engine replays graphs: a decode iteration is its host work, one graph launch and
    # the device time of its kernels; the prefill, above the capture size, is launched eagerly
    assert cm.engine.execution == "graph" and P > cm.capture_tokens
    host = cm.host_overhead_s + cm.host_per_sequence_s + cm.graph_launch_s
    prefill = cm.step_time(prefill_chunks=[(P, 0)])
    assert cm.launch_mode(P, True) == "eager"
    expected = cm.host_overhead_s + cm.host_per_sequence_s + max(
        prefill + cm.dispatch_s, cm.kernels_per_iteration(False, True) * cm.dispatch_s)
    ttft = expected
    for k in range(1, O):  # decode k writes token P+k-1 and attends to P+k tokens
        ctx = P + k
        expected += cm.step_time(1, ctx, -(-ctx // 128) * 128) + host
    assert r["mean_e2el_ms"] == pytest.approx(expected * 1e3, rel=1e-9)
    assert r["mean_ttft_ms"] == pytest.approx(ttft * 1e3, rel=1e-9)


def test_chunked_prefill_splits_long_prompts():
    sc = scenario(n=1, prompt=5000, output=2, engine=dict(max_num_batched_tokens=2048))
    r = run_scenario(sc)
    cm = CostModel(load_hardware(sc.hw), load_model(sc.model))
    # each chunk is above the capture size, so launched eagerly: the device waits for the first
    # launch, then for the slower of the launches and the kernels
    launches = cm.kernels_per_iteration(False, True) * cm.dispatch_s
    chunks = sum(cm.host_overhead_s + cm.host_per_sequence_s
                 + max(cm.step_time(prefill_chunks=[c]) + cm.dispatch_s, launches)
                 for c in ((2048, 0), (2048, 2048), (904, 4096)))
    assert r["mean_ttft_ms"] == pytest.approx(chunks * 1e3, rel=1e-9)


def test_throughput_saturates_at_the_cost_model_bound():
    P, O, S = 128, 128, 64
    out = []
    for rate in (2.0, 8.0, 32.0, math.inf):
        r = run_scenario(scenario(n=400, prompt=P, output=O, rate=rate, engine=dict(max_num_seqs=S)))
        out.append(r["output_throughput"])
    # more offered load, more throughput, until the device saturates (all-at-once arrivals run in
    # synchronised waves, so they may come out a little below a high finite rate)
    assert out[0] < out[1] < out[2]
    assert out[3] >= 0.9 * out[2]
    cm = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.1-8b"))
    # Upper bound: a full batch of S decodes at the shortest context, every step
    bound = S / (cm.step_time(S, S * (P + 1), S * 256) + cm.host_overhead_s)
    assert out[-1] <= bound
    assert out[-1] >= 0.75 * bound
    assert out[0] == pytest.approx(2.0 * O, rel=0.15)  # light load: throughput follows the offered load


def test_littles_law_holds_for_the_measured_queue():
    sc = Scenario(workload=WorkloadSpec(num_requests=600, rate=9.0, input_len=LengthDist(kind="sharegpt"),
                                        output_len=LengthDist(kind="sharegpt")), seed=1)
    r = run_scenario(sc)
    inst = r["per_instance"][0]
    lam = r["completed"] / r["duration"]
    W = r["mean_e2el_ms"] / 1e3
    assert inst["mean_in_system"] == pytest.approx(lam * W, rel=0.05)


def test_memory_pressure_preempts_and_waste_stays_bounded():
    sc = scenario(n=60, prompt=512, output=512, engine=dict(num_blocks=40, block_size=128, max_num_seqs=64))
    r = run_scenario(sc)
    kv = r["kv_cache"]
    assert r["completed"] == 60
    assert kv["preemptions"] > 0
    assert kv["peak_used_fraction"] <= 1.0
    assert kv["mean_waste_fraction"] < 0.25  # only the tails of last pages (and the watermark)
    easy = run_scenario(scenario(n=60, prompt=512, output=512, engine=dict(block_size=128, max_num_seqs=64)))
    assert easy["kv_cache"]["preemptions"] == 0
    assert easy["output_throughput"] > r["output_throughput"]


def test_swap_preemption_moves_pages_to_host():
    sc = scenario(n=40, prompt=512, output=512, engine=dict(num_blocks=30, preemption_mode="swap"))
    r = run_scenario(sc)
    assert r["completed"] == 40
    assert r["kv_cache"]["swaps"] > 0
    assert r["kv_cache"]["swaps"] % 2 == 0  # everything swapped out came back in


def test_prefix_caching_hits_and_cuts_ttft():
    base = scenario(n=80, prompt=2048, output=16, rate=4.0, engine=dict(enable_prefix_caching=False),
                    workload=dict(shared_prefix_len=1536, shared_prefix_groups=2))
    off = run_scenario(base)
    on = run_scenario(base.model_copy(update={"engine": EngineConfig(enable_prefix_caching=True)}))
    assert on["kv_cache"]["prefix_cache_hit_rate"] > 0.5
    assert off["kv_cache"]["prefix_cache_hit_rate"] is None
    assert on["mean_ttft_ms"] < 0.6 * off["mean_ttft_ms"]


def test_static_contiguous_baseline_is_slower_and_wastes_more():
    # outputs of different lengths: a static batch runs until its longest member is done
    varied = dict(output_len=LengthDist(kind="uniform", low=16, high=512))
    paged = run_scenario(scenario(n=200, prompt=512, workload=varied))
    static = run_scenario(scenario(n=200, prompt=512, workload=varied,
                                   engine=dict(paging=False, max_model_len=4096)))
    assert static["completed"] == 200
    # 4096 slots reserved per request: only capacity // 4096 requests fit in a batch
    assert static["per_instance"][0]["max_batch"] <= static["kv_cache"]["capacity_tokens"] // 4096
    assert static["kv_cache"]["mean_waste_fraction"] > 0.5  # reserves 4096 slots for 768 tokens
    assert paged["kv_cache"]["mean_waste_fraction"] < 0.2
    assert static["output_throughput"] < paged["output_throughput"]


def test_time_sliced_instances_slow_each_other_and_vnpu_splits_cores():
    one = run_scenario(scenario(n=40, prompt=256, output=128))
    two = run_scenario(scenario(n=40, prompt=256, output=128, instances=2, sharing="time-slice"))
    vnpu = run_scenario(scenario(n=40, prompt=256, output=128, instances=2, sharing="vnpu"))
    assert two["mean_tpot_ms"] > 1.5 * one["mean_tpot_ms"]
    assert [p["completed"] for p in two["per_instance"]] == [20, 20]
    assert [p["ai_cores"] for p in vnpu["per_instance"]] == [12, 12]
    assert vnpu["mean_tpot_ms"] > one["mean_tpot_ms"]


def test_max_concurrency_caps_requests_in_flight():
    r = run_scenario(scenario(n=100, prompt=128, output=64, workload=dict(max_concurrency=8)))
    assert r["completed"] == 100
    assert r["per_instance"][0]["max_batch"] <= 8


def test_energy_is_between_idle_and_tdp():
    r = run_scenario(scenario(n=30, prompt=256, output=64, rate=2.0))
    hw = load_hardware("ascend-910b2")
    p = r["energy"]["mean_power_w"]
    assert hw.idle_w < p < hw.tdp_w
    assert r["energy"]["tokens_per_joule"] == pytest.approx(r["total_output_tokens"] / r["energy"]["joules"])


def test_simulate_json_contract_and_default_scenario():
    rc, out, err = run_cli("simulate", "--requests", "30", "--json")
    assert rc == 0, err
    d = json.loads(out)
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "kv_cache", "energy", "rejected",
                "per_instance", "wall_seconds"):
        assert key in d
    for m in ("ttft", "tpot", "itl", "e2el"):
        for s in ("mean", "median", "p99"):
            assert f"{s}_{m}_ms" in d
    assert set(d["kv_cache"]) >= {"block_size", "num_blocks", "peak_used_fraction", "mean_used_fraction",
                                  "mean_waste_fraction", "preemptions", "swaps", "prefix_cache_hit_rate"}
    assert set(d["energy"]) == {"joules", "tokens_per_joule", "mean_power_w"}
    assert d["completed"] == 30


def test_scenario_yaml_and_flags_override(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("hw: h100-sxm\nmodel: llama-3.2-1b\nengine: {block_size: 16}\n"
                 "workload: {num_requests: 12, rate: .inf}\n")
    rc, out, err = run_cli("simulate", str(p), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["hw"] == "h100-sxm" and d["kv_cache"]["block_size"] == 16 and d["completed"] == 12
    rc, out, _ = run_cli("simulate", str(p), "--requests", "5", "--block-size", "32", "--json")
    d = json.loads(out)
    assert d["completed"] == 5 and d["kv_cache"]["block_size"] == 32


def test_report_is_one_self_contained_html(tmp_path):
    out = tmp_path / "r.html"
    rc, stdout, err = run_cli("simulate", "--requests", "20", "--report", str(out))
    assert rc == 0, err
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "Plotly" in text and "<script src=" not in text  # plotly inlined, nothing fetched
    assert "KV cache: used fraction" in text and "who holds which page" in text and "TTFT" in text
    # the settings, every result line with its unit, and the block map's free pages counted
    assert "Engine: vllm-ascend-graph (graph), paged, block 128" in text and "Workload: 20 requests" in text
    assert "<td>Mean TTFT</td>" in text and "<td>ms</td>" in text and "Time per Output Token" in text
    import re
    held = re.search(r"(\d+) of (\d+) held by (\d+) requests", text)
    assert held and int(held.group(1)) < int(held.group(2)) and "grey = free" in text


@pytest.mark.parametrize("args, needle", [
    (["--rate", "-1"], "--rate must be > 0"),
    (["--rate", "fast"], "--rate must be a number"),
    (["--block-size", "0"], "block_size must be > 0"),
    (["--block-size", "100"], "block_size 100 is not accepted"),
    (["--requests", "0"], "--requests"),
    (["--sharing", "mps"], "--sharing must be time-slice or vnpu"),
    (["--model", "llama-3.1-70b"], "does not fit"),
    (["--hw", "ascend-910", "--model", "llama-2-13b", "--instances", "2"], "does not fit"),
    (["--trace", "/nonexistent/trace.csv"], "trace file not found"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be <= 1"),
    (["--max-model-len", "99999999"], "exceeds llama-3.1-8b's context of 131072 tokens"),
    (["--max-model-len", "131072", "--hw", "ascend-910b4"], "exceeds the KV pool"),
])
def test_simulate_bad_input_is_one_line(args, needle):
    assert_one_line_error("simulate", ["--requests", "5", *args], needle)


def test_malformed_trace_names_the_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,100,10\n0.5,abc,10\n")
    rc, _, err = run_cli("simulate", "--trace", str(p))
    assert rc == 2 and "line 3" in err and "t.csv" in err
    p.write_text("time,prompt\n0,1\n")
    rc, _, err = run_cli("simulate", "--trace", str(p))
    assert rc == 2 and "line 1: missing column" in err


def test_trace_replay_takes_the_first_rows(tmp_path):
    p = tmp_path / "t.csv"
    rows = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    rows += [f"{0.25 * i},{100 + i},{10 + i}" for i in range(20)]
    p.write_text("\n".join(rows) + "\n")
    rc, out, err = run_cli("simulate", "--trace", str(p), "--requests", "5", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["completed"] == 5
    assert d["total_input_tokens"] == sum(100 + i for i in range(5))
    assert d["total_output_tokens"] == sum(10 + i for i in range(5))
    assert d["duration"] > 1.0  # the last of them arrives at t = 1 s


def test_a_per_request_export_of_a_bench_run_replays_closed_loop(tmp_path):
    """A `vllm bench serve --max-concurrency 3` run exported one row per request (start_time,
    input_len, output_len): every request is sent at once, at most 3 are in flight."""
    p = tmp_path / "bench.csv"
    rows = ["request,start_time,input_len,output_len"]
    rows += [f"{i},0.0,{200 + 10 * i},{20 + i}" for i in range(12)]
    p.write_text("\n".join(rows) + "\n")
    rc, out, err = run_cli("simulate", "--trace", str(p), "--max-concurrency", "3", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["completed"] == 12 and d["max_concurrent_requests"] == 3
    assert d["total_input_tokens"] == sum(200 + 10 * i for i in range(12))
    rc, out, err = run_cli("simulate", "--trace", str(p), "--json")
    assert rc == 0, err
    free = json.loads(out)
    assert free["max_concurrent_requests"] == 12 and free["duration"] < d["duration"]
    # the two names of one column at once are refused, naming both
    p.write_text("arrived_at,start_time,input_len,output_len\n0,0,10,10\n")
    rc, _, err = run_cli("simulate", "--trace", str(p))
    assert rc == 2 and "arrived_at and start_time" in err and "line 1" in err


@pytest.mark.parametrize("engine, workload", [
    ({}, dict(rate=6.0)),
    ({"block_size": 16, "profile": "mindie"}, dict(rate=12.0, burstiness_cv=3.0)),
    ({"paging": False, "batching": "continuous", "max_model_len": 4096}, dict(rate=6.0)),
    ({"num_blocks": 300}, dict(rate=math.inf)),
    ({"num_blocks": 120, "preemption_mode": "swap"}, dict(rate=math.inf)),
    ({"enable_prefix_caching": True, "max_num_batched_tokens": 512}, dict(rate=8.0, shared_prefix_len=600)),
    ({}, dict(max_concurrency=12)),
])
def test_decode_set_sums_match_its_members(monkeypatch, engine, workload):
    """The decode set is kept as sums and advanced lazily; before and after every iteration they
    must equal what its members, brought up to date one by one, add up to, the KV pool must hold
    what each member has been told of, and the allocator's own invariants must hold."""
    from npusim.sched import ContinuousScheduler

    real = ContinuousScheduler.check
    sizes = []

    def check_and_count(self, batch=None):
        real(self, batch)
        sizes.append(self.decoding.n)

    monkeypatch.setattr(ContinuousScheduler, "check", check_and_count)
    wl = dict(num_requests=150, input_len=LengthDist(kind="sharegpt"), output_len=LengthDist(kind="sharegpt"))
    wl.update(workload)
    sc = Scenario(engine=EngineConfig(**engine), workload=WorkloadSpec(**wl), seed=2)
    run = simulate_scenario(sc, check_invariants=True)
    assert run.completed == 150
    assert max(sizes) > 5  # the set was exercised
    assert len(sizes) == 2 * sum(i.stats.iterations for i in run.instances)  # around every iteration


def test_token_budget_must_cover_every_running_sequence():
    assert_one_line_error("simulate", ["--requests", "5", "--max-num-batched-tokens", "128"],
                          "max_num_batched_tokens (128) must be >= max_num_seqs (256)")


def test_a_shared_prefix_longer_than_the_first_chunk_is_served_from_the_cache():
    """Regression: the prefix-cache hit was taken out of a chunk already cut to the token budget,
    leaving a 0-token chunk. Hits are looked up first, then the budget applies (as vLLM)."""
    rc, out, err = run_cli("simulate", "--prefix-caching", "--shared-prefix-len", "3000",
                           "--input-len", "4000", "--output-len", "8", "--max-num-batched-tokens",
                           "1024", "--max-num-seqs", "8", "--rate", "0.05", "--requests", "3", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["completed"] == 3
    # 31 full 128-token blocks per prompt; the 2nd and 3rd find the prefix's 23 blocks cached
    assert d["kv_cache"]["prefix_cache_hit_rate"] == pytest.approx(46 / 93)
    # the first request prefills 4 chunks, the others 2 (1024 + 32 new tokens): a shorter TTFT
    assert d["median_ttft_ms"] < 0.7 * d["p99_ttft_ms"]


def test_a_decode_member_leaving_after_taking_its_next_page_gives_the_page_back():
    """Regression: a member granted its next page and then preempted in the same round drove its
    pool count below zero and crashed. The page taken ahead goes back when it leaves."""
    from types import SimpleNamespace

    from npusim.sched.decode_set import DecodeSet
    from npusim.sched.pools import PagedPool
    from npusim.sched.request import Request
    from npusim.workload import RequestSpec

    plan = SimpleNamespace(num_blocks=4, block_bytes=1.0)
    pool = PagedPool(plan, EngineConfig(profile="vllm", block_size=16, watermark=0.0,
                                        enable_prefix_caching=False))
    r = Request(RequestSpec(id=0, arrival=0.0, prompt_len=16, output_len=40))
    assert pool.admit(r, 16)
    r.num_computed = 16
    dset = DecodeSet(pool)
    dset.join(r, it=0)  # iteration 1 writes token 16: the first of a new page
    assert dset.due_pages(1) == [r] and dset.grant_page(r, 1)
    assert pool.kv.num_free_blocks == 2 and dset.kv_slots == 32
    dset.leave(r, it=0)  # preempted before iteration 1 ran
    assert pool.kv.num_free_blocks == 3 and pool.held(r) == 16 and r.kv_tokens == r.num_computed == 16
    assert dset.n == dset.context_tokens == dset.kv_slots == dset.untold == 0


def test_swap_preemption_under_a_tight_pool_keeps_every_invariant():
    sc = Scenario(engine=EngineConfig(profile="mindie", block_size=16, num_blocks=120,
                                      max_num_batched_tokens=256, max_num_seqs=8, preemption_mode="swap"),
                  workload=WorkloadSpec(num_requests=60, rate=20.0, input_len=LengthDist(kind="sharegpt"),
                                        output_len=LengthDist(kind="sharegpt")))
    run = simulate_scenario(sc, check_invariants=True)
    assert run.completed + len(run.rejected) == 60
    inst = run.instances[0]
    assert inst.stats.preemptions > 0 and inst.swaps == 2 * inst.stats.preemptions  # out, then back in


def test_request_latencies_past_the_exact_limit_keep_quantiles_to_a_tenth_of_a_percent():
    """A million-request run keeps fixed-size summaries: exact values up to a limit, then 0.1 %
    bins whose median and p99 stay within 0.1 % of the exact ones; mean and std stay exact."""
    import random
    import statistics

    from npusim.engine import LatencySummary
    from npusim.scenario import _ms_stats

    rng = random.Random(5)
    values = [rng.lognormvariate(-3, 0.8) for _ in range(5000)]
    small, big = LatencySummary(exact_limit=10_000), LatencySummary(exact_limit=1000)
    for v in values:
        small.add(v)
        big.add(v)
    assert small.exact and not big.exact and big.values is None
    exact, binned = _ms_stats(small, "x"), _ms_stats(big, "x")
    for key in ("median_x_ms", "p99_x_ms"):
        assert binned[key] == pytest.approx(exact[key], rel=1e-3)
        assert binned[key] != exact[key]  # it is the binned path
    assert binned["mean_x_ms"] == pytest.approx(statistics.fmean(values) * 1e3, rel=1e-12)
    assert binned["std_x_ms"] == pytest.approx(statistics.pstdev(values) * 1e3, rel=1e-9)


def test_goodput_counts_requests_meeting_every_slo_as_vllm_bench_serve():
    base = scenario(n=40, prompt=256, output=32, rate=10.0)
    from npusim.scenario import GoodputSLO
    loose = run_scenario(base.model_copy(update={"goodput": GoodputSLO(ttft_ms=1e6, tpot_ms=1e6)}))
    assert loose["request_goodput"] == pytest.approx(loose["request_throughput"])
    tight = run_scenario(base.model_copy(update={"goodput": GoodputSLO(ttft_ms=1e-3)}))
    assert tight["request_goodput"] == 0.0
    assert run_scenario(base)["request_goodput"] is None  # no SLO, no goodput
    # TPOT of a one-token output is 0, so it meets any TPOT objective
    one = run_scenario(scenario(n=10, prompt=256, output=1, rate=10.0, goodput={"tpot_ms": 1e-6}))
    assert one["request_goodput"] == pytest.approx(one["request_throughput"])


def test_goodput_flag_takes_vllm_bench_serve_syntax_or_says_how():
    rc, out, err = run_cli("simulate", "--requests", "20", "--goodput", "ttft:5000", "--goodput", "tpot:500", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["scenario"]["goodput"] == {"ttft_ms": 5000.0, "tpot_ms": 500.0, "e2el_ms": None}
    assert d["request_goodput"] == pytest.approx(d["request_throughput"])
    for args, needle in ((["--goodput", "ttft:5", "tpot:5"], "one SLO per flag"),
                         (["--goodput", "ttft:0"], "must be > 0"), (["--goodput", "itl:5"], "takes ttft:MS"),
                         (["--goodput", "ttft:5 ttft:6"], "gives ttft twice")):
        assert_one_line_error("simulate", ["--requests", "5", *args], needle)


def test_max_concurrent_requests_and_itl_spread():
    burst = run_scenario(scenario(n=30, prompt=128, output=8))  # all at once
    assert burst["max_concurrent_requests"] == 30
    capped = run_scenario(scenario(n=30, prompt=128, output=8, workload={"max_concurrency": 4}))
    assert capped["max_concurrent_requests"] == 4
    # one request alone: its inter-token latencies are its decode iterations, exactly
    P, O = 30000, 300  # long enough that attention, not its least kernel time, sets the step
    sc = scenario(n=1, prompt=P, output=O)
    r = run_scenario(sc)
    cm = CostModel(load_hardware(sc.hw), load_model(sc.model))
    host = cm.host_overhead_s + cm.host_per_sequence_s + cm.graph_launch_s
    steps = [cm.step_time(1, P + k, -(-(P + k) // 128) * 128) + host for k in range(1, O)]
    import statistics
    assert r["mean_itl_ms"] == pytest.approx(statistics.fmean(steps) * 1e3, rel=1e-9)
    assert statistics.pstdev(steps) > 0
    assert r["std_itl_ms"] == pytest.approx(statistics.pstdev(steps) * 1e3, rel=1e-3, abs=1e-6)


def test_overload_is_flagged_when_the_arrivals_outrun_the_service():
    from conftest import run_cli

    def load(*args):
        rc, out, err = run_cli("simulate", *args, "--json")
        assert rc == 0, err
        return json.loads(out)

    light = load("--model", "llama-3.2-1b", "--requests", "400", "--rate", "2")
    assert not light["load"]["overloaded"] and light["load"]["served_fraction"] > 0.9
    assert light["load"]["offered_rate"] == pytest.approx(2, rel=0.15)
    # the default scenario at 4x its rate, long enough for a steady state to be judged: after the
    # warm-up, under 90 % of the arrivals complete
    heavy = load("--rate", "32", "--requests", "1500")
    assert heavy["load"]["overloaded"] and heavy["load"]["served_fraction"] < 0.9
    assert heavy["load"]["in_system_second_half"] >= heavy["load"]["in_system_first_half"]
    # a burst too short for a steady state: judged by the queue at its last arrival
    burst = load("--model", "llama-3.2-1b", "--requests", "400", "--rate", "400")
    assert burst["load"]["overloaded"] and burst["load"]["served_fraction"] is None
    assert burst["request_throughput"] < 0.5 * burst["load"]["offered_rate"]
    at_once = load("--model", "llama-3.2-1b", "--requests", "400", "--rate", "inf")
    assert not at_once["load"]["overloaded"] and at_once["load"]["offered_rate"] is None
    rc, out, _ = run_cli("simulate", "--rate", "32", "--requests", "1500")
    assert "warning: overloaded: after the warm-up" in out
