"""Review of the serving core, cost model and calibration: targeted checks and property tests.

Tests named after a bug found in review (piecewise dispatch, attention below the measured range,
zero-size inputs, overlapping traces, unfused GEMMs, swap-in round trips) failed before its fix and
guard against its return."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from npusim.costmodel import Batch, CostModel
from npusim.engine import LatencyHistogram, LatencySummary
from npusim.kv import PagedKVCache
from npusim.scenario import Scenario, simulate_scenario, summarize
from npusim.specs import (ENGINE_PROFILE_DIR, LAYER_OPS, MODEL_OP_KERNELS, STEP_OPS, EngineConfig, engine_profile_from_mapping,
                          known_engines, load_engine_profile, load_hardware, load_model)
from npusim.workload import LengthDist, WorkloadSpec

ZOO = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "llama-2-7b", "llama-2-13b",
       "qwen2.5-7b", "qwen3-8b", "qwen3-32b"]


# =========================================================================== paged allocator

class _SlowOnly(PagedKVCache):
    """The same allocator with every append taken through `_append_slow` (no decode fast paths)."""

    def append_slots(self, req_id, num_tokens=1):
        try:
            req = self._reqs[req_id]
        except KeyError:
            raise self._missing(req_id) from None
        return self._append_slow(req, num_tokens)


def _state(c: PagedKVCache):
    return (
        tuple(c._free), tuple(c._ref), tuple(c._cached), tuple(c._block_hash),
        tuple(sorted(c._hash_to_block.items())), c._filled,
        tuple(sorted((k, tuple(r.table), r.num_tokens, r.fast_limit) for k, r in c._reqs.items())),
        tuple(sorted((k, r.num_tokens) for k, r in c._swapped.items())), c._host_used,
        c.cow_copies, c.swaps_out, c.swaps_in, c.evictions, c.prefix_queries, c.prefix_hits, c._shared,
    )


def _both(a, b, name, *args):
    """Call `name` on both allocators: same result or same exception type, same state after."""
    outs = []
    for c in (a, b):
        before = _state(c)
        try:
            outs.append(("ok", getattr(c, name)(*args)))
        except ValueError:
            outs.append(("err", None))
            assert _state(c) == before, f"a refused {name}{args} changed the allocator"
    assert outs[0] == outs[1], (name, args, outs)
    a.check()
    b.check()
    assert _state(a) == _state(b), f"fast and slow append paths diverged after {name}{args}"
    return outs[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(1, 24), bs=st.sampled_from([1, 2, 3, 4, 16]), prefix=st.booleans(),
    host=st.integers(0, 16), watermark=st.sampled_from([0.0, 0.1]), data=st.data(),
)
def test_append_fast_paths_leave_the_same_state_as_the_slow_path(num_blocks, bs, prefix, host, watermark, data):
    """Every allocator operation, on an allocator with the decode fast paths and on one whose
    appends all go through `_append_slow`: identical block tables, refcounts, free stack, LRU,
    hashes, filled-slot counter and fast limits after each step, and `check()` holds in both.
    Covers trim (valid and refused) on shared, hashed and swapped requests, fork then free, and
    swap after trim."""
    a = PagedKVCache(num_blocks, bs, watermark=watermark, enable_prefix_caching=prefix, num_host_blocks=host)
    b = _SlowOnly(num_blocks, bs, watermark=watermark, enable_prefix_caching=prefix, num_host_blocks=host)
    next_id = 0
    for _ in range(data.draw(st.integers(5, 45), label="steps")):
        on_dev = sorted(a._reqs)
        swapped = sorted(a._swapped)
        op = data.draw(st.sampled_from(["alloc", "alloc", "append", "append", "append", "trim", "fork",
                                        "free", "swap_out", "swap_in"]))
        if op == "alloc" or not (on_dev or swapped):
            n = data.draw(st.integers(1, 4 * bs + 2))
            group = data.draw(st.sampled_from([None, 0, 0, 1]))
            hashes = None if group is None else [hash(("g", group, i)) for i in range(n // bs)]
            _both(a, b, "allocate", next_id, n, hashes)
            next_id += 1
        elif op == "append" and on_dev:
            r = data.draw(st.sampled_from(on_dev))
            n = data.draw(st.sampled_from([0, 1, 1, 1, 2, bs - 1, bs, bs + 1, 2 * bs + 1]))
            _both(a, b, "append_slots", r, max(0, n))
        elif op == "trim" and on_dev:
            r = data.draw(st.sampled_from(on_dev))
            n = data.draw(st.integers(0, a.num_tokens(r)))
            _both(a, b, "trim", r, n)
        elif op == "fork" and on_dev:
            _both(a, b, "fork", data.draw(st.sampled_from(on_dev)), next_id)
            next_id += 1
        elif op == "free":
            _both(a, b, "free", data.draw(st.sampled_from(on_dev + swapped)))
        elif op == "swap_out" and on_dev:
            r = data.draw(st.sampled_from(on_dev))
            if a.can_swap_out(r):
                _both(a, b, "swap_out", r)
        elif op == "swap_in" and swapped:
            r = data.draw(st.sampled_from(swapped))
            if a.can_swap_in(r):
                _both(a, b, "swap_in", r)


def test_trim_gives_back_the_page_taken_ahead_and_the_counter_follows():
    c = PagedKVCache(8, 4)
    c.allocate("a", 8)  # two full blocks
    assert c.append_slots("a", 1)  # a page taken for the next token
    assert c.num_used_blocks == 3 and c.filled_slots == 9
    c.trim("a", 1)
    c.check()
    assert c.num_used_blocks == 2 and c.filled_slots == 8 and c.num_tokens("a") == 8
    # inside a block: the slots go back, the block stays
    c.append_slots("a", 3)
    c.trim("a", 2)
    c.check()
    assert c.num_used_blocks == 3 and c.filled_slots == 9


def test_trim_refuses_a_shared_partial_block_but_takes_back_whole_pages_above_a_shared_full_one():
    c = PagedKVCache(10, 4)
    c.allocate("p", 6)
    c.fork("p", "c")  # the partly filled last block is shared now
    before = _state(c)
    with pytest.raises(ValueError, match="shared"):
        c.trim("c", 1)
    assert _state(c) == before
    # the child copies its last block on write, then takes a page of its own
    c.append_slots("c", 3)  # 9 tokens: copy of block 1, then a fresh block 2
    c.check()
    c.trim("c", 1)  # back to 8: the fresh page goes, the copied block stays, full
    c.check()
    assert c.num_tokens("c") == 8
    # trimming to a page boundary under a shared FULL block is fine
    c2 = PagedKVCache(10, 4)
    c2.allocate("p", 8)
    c2.fork("p", "c")
    c2.append_slots("c", 1)
    c2.trim("c", 1)
    c2.check()
    assert c2.block_table("c") == c2.block_table("p")
    c2.free("c")
    c2.free("p")
    c2.check()
    assert c2.num_free_blocks == 10 and c2.filled_slots == 0


def test_trim_with_prefix_caching_then_swap_keeps_the_invariants():
    c = PagedKVCache(12, 4, enable_prefix_caching=True, num_host_blocks=8)
    hashes = [11, 12]
    c.allocate("a", 8, hashes)  # both blocks registered
    c.append_slots("a", 1)
    with pytest.raises(ValueError, match="prefix hash"):
        c.trim("a", 2)  # would cut into a registered block
    c.trim("a", 1)
    c.check()
    c.swap_out("a")
    c.check()
    assert c.num_cached_blocks == 2 and c.filled_slots == 0
    c.swap_in("a")
    c.check()
    assert c.num_tokens("a") == 8
    c.append_slots("a", 1)
    c.trim("a", 1)
    c.free("a")
    c.check()


def test_the_unshared_release_shortcut_after_a_fork_then_free():
    c = PagedKVCache(6, 4)
    c.allocate("a", 5)
    c.free("a")  # the shortcut: nothing was ever shared
    c.check()
    c.allocate("p", 5)
    c.fork("p", "k")
    c.free("k")  # the refcount path from now on
    c.check()
    assert c.num_used_blocks == 2
    c.append_slots("p", 4)
    c.free("p")
    c.check()
    assert c.num_free_blocks == 6 and c.filled_slots == 0


# =========================================================================== latency summaries

def test_latency_summary_is_exact_up_to_its_limit_and_binned_past_it():
    s = LatencySummary(exact_limit=5)
    for x in (0.1, 0.2, 0.3, 0.4, 0.5):
        s.add(x)
    assert s.exact and list(s.values) == [0.1, 0.2, 0.3, 0.4, 0.5] and s.hist is None
    s.add(0.6)
    assert not s.exact and s.values is None
    assert s.hist.n == s.n == 6
    assert s.hist.total == pytest.approx(2.1) and s.total == pytest.approx(2.1)
    s.add(0.7)
    assert s.hist.n == 7
    # quantiles from the bins stay within the bin width of the exact ones
    assert s.hist.quantile(0.5) == pytest.approx(0.4, rel=1e-3)
    assert s.hist.quantile(1.0) == pytest.approx(0.7, rel=1e-3)
    assert s.hist.quantile(0.0) == pytest.approx(0.1, rel=1e-3)


def test_latency_histogram_counts_and_orders_its_bins():
    h = LatencyHistogram()
    for x, k in ((0.0, 2), (1e-6, 1), (0.999, 1), (1.0, 1), (1.001, 1), (5.0, 3)):
        h.add(x, k)
    centres, counts = h.bins()
    assert centres == sorted(centres) and sum(counts) == h.n == 9
    assert h.quantile(0.0) == 0.0
    assert h.quantile(1.0) == pytest.approx(5.0, rel=1e-3)
    assert h.mean() == pytest.approx((1e-6 + 0.999 + 1.0 + 1.001 + 15.0) / 9)


# =========================================================================== cost model

@pytest.mark.parametrize("engine,hw", [("vllm", "h200"), ("vllm-eager", "h200"), ("torch-graph", "h200"),
                                       ("torch-eager", "h200"), ("mindie", "ascend-910b2"),
                                       ("vllm-ascend-eager", "ascend-910b2")])
def test_price_of_an_empty_batch_is_host_and_swap_only(engine, hw):
    cm = CostModel(load_hardware(hw), load_model("llama-3.2-1b"), engine=engine)
    assert cm.price(Batch())[:3] == (cm.host_overhead_s, 0.0, 0.0)
    host, device, swap, _ = cm.price(Batch(swap_bytes=2e9))
    assert (host, device) == (cm.host_overhead_s, 0.0)
    assert swap == pytest.approx(2e9 / cm.host_link_bytes_per_s)


@pytest.mark.parametrize("engine, model", [("vllm", "qwen3-8b"), ("vllm-eager", "qwen3-8b"), ("torch-graph", "qwen3-8b"),
                                           ("torch-eager", "qwen3-8b"), ("vllm-eager", "deepseek-v2-lite"),
                                           ("vllm", "deepseek-v3")])
def test_price_is_host_times_of_the_step(engine, model):
    cm = CostModel(load_hardware("h200"), load_model(model), engine=engine)
    for b in (Batch(num_decodes=3, decode_context_tokens=3000, decode_kv_slots=3 * 1008),
              Batch(prefill_chunks=[(700, 0)]),
              Batch(num_decodes=2, decode_context_tokens=100, decode_kv_slots=128, prefill_chunks=[(64, 32)],
                    swap_bytes=1e6)):
        device = cm.step_time(b.num_decodes, b.decode_context_tokens, b.decode_kv_slots, b.prefill_chunks)
        kernels = cm.kernels_per_iteration(bool(b.num_decodes), bool(b.prefill_chunks))
        ops = cm.ops(b.num_decodes, b.decode_context_tokens, b.decode_kv_slots, b.prefill_chunks)
        assert sum(o.kernels for o in ops) == kernels
        host, held = cm.host_times(b.num_decodes + len(b.prefill_chunks), device, bool(b.num_decodes),
                                   bool(b.prefill_chunks), b.num_tokens)
        p = cm.price(b)
        assert p[0] == pytest.approx(host) and p[1] == pytest.approx(held)
        assert p[2] == pytest.approx(b.swap_bytes / cm.host_link_bytes_per_s)


def _piecewise_profile():
    data = yaml.safe_load((ENGINE_PROFILE_DIR / "vllm-eager.yaml").read_text())
    data["name"] = "vllm-piecewise"
    data["execution"] = "piecewise"
    data["graph_launch_us"] = {"value": 20.0, "kind": "assumed", "source": "a test value"}
    return engine_profile_from_mapping(data, "vllm-piecewise")


def test_piecewise_decode_only_iteration_dispatches_only_decode_attention():
    cm = CostModel(load_hardware("h200"), load_model("llama-3.2-1b"), engine=_piecewise_profile())
    L = cm.model.num_layers
    tiny = 1e-6  # a device step far below the launches: the host sets the pace
    _, held = cm.host_times(1, tiny, True, False)
    expected = (L + 1) * cm.graph_launch_s + L * cm.kernels["attention_decode"] * cm.dispatch_s
    assert held == pytest.approx(expected)


def test_piecewise_host_times_never_below_the_device():
    cm = CostModel(load_hardware("h200"), load_model("llama-3.2-1b"), engine=_piecewise_profile())
    for device in (1e-6, 1e-3, 1.0):
        host, held = cm.host_times(4, device, True, True)
        assert held >= device and host == pytest.approx(cm.host_overhead_s + 4 * cm.host_per_sequence_s)


# =========================================================================== calibration tables

def _h200(model="llama-3.1-8b", engine="torch-graph"):
    return CostModel(load_hardware("h200"), load_model(model), engine=engine)


def test_decode_attention_from_the_table_never_below_its_kernels_least_times():
    cm = _h200()
    least = cm.kernels["attention_decode"] * cm.floor["attention_decode"]
    for ctx in (1, 16, 100, 300):
        slots = -(-ctx // cm.block_size) * cm.block_size
        assert cm.decode_attention_time(1, ctx, slots) >= least, ctx


def test_decode_attention_table_is_monotone_finite_and_nonnegative_over_batch_and_context():
    cm = _h200()
    prev_c = None
    for ctx in (1, 16, 511, 512, 513, 700, 1024, 3000, 8192, 8193, 50_000, 10**6):
        row = []
        for b in (1, 2, 3, 4, 7, 16, 100, 128, 129, 500):
            slots = b * -(-ctx // cm.block_size) * cm.block_size
            t = cm.decode_attention_time(b, b * ctx, slots)
            assert math.isfinite(t) and t >= 0, (b, ctx, t)
            row.append(t)
        assert row == sorted(row), ctx  # more sequences never cost less
        if prev_c is not None:
            assert all(t >= p * (1 - 1e-9) for t, p in zip(row, prev_c)), ctx  # more context never less
        prev_c = row


def test_decode_attention_table_over_zero_slots_is_finite_not_a_crash():
    cm = _h200()
    least = cm.kernels["attention_decode"] * cm.floor["attention_decode"]
    for b in (1, 2, 7):  # a decode always reads >= 1 slot; over none it costs no more than its launches' floor
        t = cm.decode_attention_time(b, 0, 0)
        assert math.isfinite(t) and least <= t <= cm.decode_attention_time(b, b * 16, b * 16)


def test_gemm_table_is_finite_and_positive_for_absurd_shapes():
    cm = _h200()
    g = cm.tables.gemm
    for m in (0, 1, 3, 8191, 8192, 8193, 10**6):
        for n, k in ((4096, 4096), (7, 3), (128256, 4096), (10**6, 10**5)):
            t = g.time(m, n, k, cm._gemm_roofline)
            assert math.isfinite(t) and t > 0, (m, n, k, t)
    # past the largest measured M, time grows with M
    assert g.time(10**6, 4096, 4096, cm._gemm_roofline) > g.time(8192, 4096, 4096, cm._gemm_roofline)


def test_prefill_attention_table_is_flat_below_and_linear_above_its_measured_range():
    cm = _h200()
    m = cm.model
    tab = cm.tables.prefill_attention
    key = min(tab.curves, key=lambda g: (math.log(g[2] / m.head_dim)) ** 2 + (math.log(g[0] / m.num_heads)) ** 2
              + (math.log(g[1] / m.num_kv_heads)) ** 2)
    fs, _ = tab.curves[key]
    lo = tab.time(m.num_heads, m.num_kv_heads, m.head_dim, fs[0])
    assert tab.time(m.num_heads, m.num_kv_heads, m.head_dim, fs[0] / 1000) == pytest.approx(lo)
    hi = tab.time(m.num_heads, m.num_kv_heads, m.head_dim, fs[-1])
    assert tab.time(m.num_heads, m.num_kv_heads, m.head_dim, 4 * fs[-1]) == pytest.approx(4 * hi)
    for c in (1, 2, 100, 8192, 100_000):
        t = cm.attention_prefill_op([(c, 0)]).time_s
        assert math.isfinite(t) and t > 0


def test_a_zero_token_chunk_is_priced_on_a_calibrated_device_as_on_the_roofline():
    roof = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.2-1b"))
    assert roof.price(Batch(prefill_chunks=[(0, 100), (1, 0)]))[1] > 0
    assert _h200("llama-3.2-1b").price(Batch(prefill_chunks=[(0, 100), (1, 0)]))[1] > 0


# =========================================================================== engine profiles

@pytest.mark.parametrize("name", known_engines())
def test_every_engine_profile_loads_with_a_kernel_count_for_every_op(name):
    p = load_engine_profile(name)
    # every op of every model counted; the ops of some models only (MLA, MoE) where measured
    assert set(p.kernels) - set(MODEL_OP_KERNELS) == set(LAYER_OPS) | set(STEP_OPS)
    assert all(isinstance(v, int) and v >= 0 for v in p.kernels.values())
    assert all(v > 0 for v in p.kernel_floor_us.values())
    assert p.kv_block_sizes.accepts(p.kv_block_sizes.recommended)
    # every op that does work launches a kernel somewhere (GEMMs and attention cannot be fused away)
    for op in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "attention_decode", "attention_prefill",
               "lm_head"):
        assert p.kernels[op] >= 1, (name, op)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_step_with_torch_graph_on_h200_prices_every_zoo_model(phase):
    for model in ZOO:
        for size in ("1", str(min(4097, load_model(model).max_position_embeddings - 1))):
            flag = ["--context", size] if phase == "decode" else ["--prompt", size]
            rc, out, err = run_cli("step", "--engine", "torch-graph", "--hw", "h200", "--model", model,
                                   "--phase", phase, "--batch", "3", *flag, "--json")
            if load_model(model).weight_bytes("bf16") > load_hardware("h200").memory_bytes * 0.9:
                assert rc == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1, (model, err)
                continue
            assert rc == 0, (model, err)
            d = json.loads(out)
            assert d["engine"] == "torch-graph" and d["execution"] == "graph"
            assert math.isfinite(d["device_ms"]) and d["device_ms"] > 0
            assert d["iteration_ms"] >= d["device_ms"]
            assert all(o["time_ms"] >= 0 and math.isfinite(o["time_ms"]) for o in d["ops"])
            assert sum(o["kernels"] for o in d["ops"]) == d["kernels"]


# =========================================================================== engine calibration

def _event(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7, "args": {}}


_NORM = ("void at::native::vectorized_layer_norm_kernel<bf16>", 5.0)
_GEMM = ("nvjet_sm90_tst_64x8_TNT", 15.0)
_ADD = ("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>", 1.0)
_LAYER = [_NORM, _GEMM, ("void at::native::elementwise_kernel<mul>", 2.0),
          ("void at::native::elementwise_kernel<neg>", 2.0), ("void at::native::CatArrayBatchedCopy<bf16>", 2.0),
          ("void at::native::index_elementwise_kernel<index_put>", 3.0),
          ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16", 25.0), _GEMM, _ADD, _NORM,
          ("nvjet_sm90_tst_128x8_TNT", 50.0), ("void at::native::elementwise_kernel<silu>", 3.0),
          ("void at::native::elementwise_kernel<mul>", 3.0), ("nvjet_sm90_tst_128x8_TNT", 30.0), _ADD]


def _write_trace(tmp_path, layer, layers, advance):
    kernels = [("void at::native::indexSelectSmallIndex<bf16>", 8.0)] + layer * layers
    kernels += [_NORM, ("nvjet_sm90_tst_lm_head_TNT", 200.0), ("void at::native::vectorized_elementwise_kernel<copy>", 1.0)]
    t, events = 0.0, []
    for name, dur in kernels:
        events.append(_event(name, t, dur))
        t += advance(dur)
    p = tmp_path / "step.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return p


def test_engine_calibration_of_a_clean_graph_trace_gives_positive_floors(tmp_path):
    from npusim.engine_calibration import calibrate_engine

    path = _write_trace(tmp_path, _LAYER, 2, lambda d: d + 0.5)
    model = load_model("llama-3.1-8b").model_copy(update={"num_layers": 2})
    mapping, report = calibrate_engine(path, model, load_engine_profile("vllm"), name="x", batch=8, context=2048)
    prof = engine_profile_from_mapping(mapping, "x")
    assert report["kernels_per_layer"] == len(_LAYER)
    assert all(v > 0 for v in prof.kernel_floor_us.values())


def test_engine_calibration_of_overlapping_kernels_never_gives_negative_floors_or_times(tmp_path):
    from npusim.engine_calibration import calibrate_engine

    path = _write_trace(tmp_path, _LAYER, 2, lambda d: 0.4 * d)  # each kernel starts before the last ends
    model = load_model("llama-3.1-8b").model_copy(update={"num_layers": 2})
    mapping, _ = calibrate_engine(path, model, load_engine_profile("vllm"), name="x", batch=8, context=2048)
    prof = engine_profile_from_mapping(mapping, "x")
    assert all(v >= 0 for v in prof.kernel_floor_us.values()), prof.kernel_floor_us
    cm = CostModel(load_hardware("h200"), model, engine=prof)
    assert all(o.time_s >= 0 for o in cm.ops(1, 100, 112))


def test_engine_calibration_refuses_or_counts_right_a_layer_with_more_than_four_gemms(tmp_path):
    from npusim.engine_calibration import calibrate_engine
    from npusim.errors import NpusimError

    unfused = [_NORM, _GEMM, _GEMM, _GEMM, ("void at::native::elementwise_kernel<mul>", 2.0),
               ("void at::native::index_elementwise_kernel<index_put>", 3.0),
               ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16", 25.0), _GEMM, _ADD, _NORM, _GEMM,
               _GEMM, ("void at::native::elementwise_kernel<silu>", 3.0), _GEMM, _ADD]
    path = _write_trace(tmp_path, unfused, 4, lambda d: d + 0.5)
    model = load_model("llama-3.1-8b").model_copy(update={"num_layers": 4})
    try:
        _, report = calibrate_engine(path, model, load_engine_profile("vllm"), name="x", batch=1, context=512)
    except NpusimError:
        return  # refused: fine
    assert report["kernels_per_layer"] == len(unfused)


# =========================================================================== the simulator

def _scenario(profile, hw, *, instances=1, sharing="time-slice", n=24, seed=1, **eng):
    engine = dict(profile=profile, max_num_seqs=6, num_blocks=60, max_num_batched_tokens=256)
    engine.update(eng)
    return Scenario(hw=hw, model="llama-3.2-1b", engine=EngineConfig(**engine),
                    workload=WorkloadSpec(num_requests=n, rate=math.inf,
                                          input_len=LengthDist(kind="uniform", low=5, high=300),
                                          output_len=LengthDist(kind="uniform", low=1, high=60)),
                    instances=instances, sharing=sharing, seed=seed)


@pytest.mark.parametrize("profile,hw", [("vllm-eager", "h200"), ("torch-eager", "h200"),
                                        ("vllm-ascend-eager", "ascend-910b2"), ("torch-graph", "h200")])
@pytest.mark.parametrize("k,sharing", [(2, "time-slice"), (3, "time-slice"), (2, "vnpu")])
def test_instances_are_never_busier_than_the_run(profile, hw, k, sharing):
    sc = _scenario(profile, hw, instances=k, sharing=sharing, block_size=16 if "ascend" not in hw else 128)
    rec = simulate_scenario(sc, check_invariants=True)
    assert rec.completed + len(rec.rejected) == sc.workload.num_requests and rec.completed
    for inst in rec.instances:
        assert 0 <= inst.busy_s <= rec.duration * (1 + 1e-12)
        assert inst.swap_s <= inst.busy_s
    if sharing == "time-slice":  # one device, iterations take turns on it
        assert sum(i.busy_s for i in rec.instances) <= rec.duration * (1 + 1e-12)
    s = summarize(rec, sc)
    assert s["energy"]["mean_power_w"] <= rec.hw.tdp_w * (1 + 1e-12)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_every_output_token_after_the_first_is_one_inter_token_latency(mode):
    """Preempted, recomputed and swapped requests included: ITL samples = sum(output - 1)."""
    sc = _scenario("vllm", "h200", instances=2, n=30, num_blocks=25, preemption_mode=mode, block_size=16)
    rec = simulate_scenario(sc, check_invariants=True)
    assert sum(i.stats.preemptions for i in rec.instances) > 0  # the pools are tight
    assert rec.itl.n == rec.total_output_tokens - rec.completed
    assert rec.ttft.n == rec.e2el.n == rec.completed


@pytest.mark.parametrize("profile,hw", [("vllm", "h200"), ("vllm-eager", "h200"), ("torch-graph", "h200"),
                                        ("torch-eager", "h200"), ("mindie", "ascend-910b2"),
                                        ("vllm-ascend-graph", "ascend-910b2")])
def test_same_seed_same_result_on_every_engine(profile, hw):
    bs = 128 if "ascend" in hw or profile == "mindie" else 16
    sc = _scenario(profile, hw, instances=2, enable_prefix_caching=True, block_size=bs, num_blocks=40)
    sc.workload.shared_prefix_len = 150
    runs = [json.dumps(summarize(simulate_scenario(sc), sc), sort_keys=True) for _ in range(2)]
    assert runs[0] == runs[1]


def test_a_swapped_in_request_computes_before_it_is_swapped_out_again(monkeypatch):
    from npusim.sched import pools

    events = []
    real_in, real_out = pools.PagedPool.swap_in, pools.PagedPool.swap_out

    def swap_in(self, r, then_append=0):
        moved = real_in(self, r, then_append)
        if moved is not None:
            events.append(("in", r.id, r.num_computed, r.out_done))
        return moved

    def swap_out(self, r):
        moved = real_out(self, r)
        if moved is not None:
            events.append(("out", r.id, r.num_computed, r.out_done))
        return moved

    monkeypatch.setattr(pools.PagedPool, "swap_in", swap_in)
    monkeypatch.setattr(pools.PagedPool, "swap_out", swap_out)
    sc = Scenario(hw="h200", model="llama-3.2-1b",
                  engine=EngineConfig(profile="vllm", block_size=16, num_blocks=30, max_num_seqs=8,
                                      max_num_batched_tokens=256, preemption_mode="swap", watermark=0.0,
                                      enable_prefix_caching=False),
                  workload=WorkloadSpec(num_requests=30, rate=math.inf,
                                        input_len=LengthDist(kind="uniform", low=10, high=200),
                                        output_len=LengthDist(kind="uniform", low=1, high=150)), seed=20)
    simulate_scenario(sc, check_invariants=True)
    assert any(e[0] == "in" for e in events)
    last_in, wasted = {}, []
    for e in events:
        if e[0] == "in":
            last_in[e[1]] = e
        elif e[1] in last_in and last_in.pop(e[1])[2:] == e[2:]:
            wasted.append(e[1])
    assert not wasted, f"{len(wasted)} swap-ins swapped straight back out: {wasted[:10]}"
