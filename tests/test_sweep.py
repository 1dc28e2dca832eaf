"""`npusim sweep` and `npusim capacity`: grids, seeds, executors (a real Dask LocalCluster), output
files with --resume, and the capacity answer checked by simulating either side of it."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli
from npusim.errors import NpusimError
from npusim.settings import SIMULATE_FIELDS, build_scenario
from npusim.sweep import (GRID_SETTINGS, capacity, grid_points, parse_grid, point_key, point_seed,
                          read_rows, sweep)

# small and quick: 60 requests of a 1B model
BASE = {"model": "llama-3.2-1b", "engine": "mindie", "requests": "60"}
FIXED = {"seed": None, "goodput": None}


def grid(**lists):
    return parse_grid({**BASE, **lists})


def comparable(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def test_grid_covers_every_simulate_setting():
    # every simulate flag is a grid setting (the on/off switches under their positive names),
    # except the base seed and the goodput SLOs, which are one value for the whole sweep
    renamed = {"no_paging": "paging", "no_chunked_prefill": "chunked_prefill"}
    wanted = {renamed.get(k, k) for k in SIMULATE_FIELDS} - {"seed", "goodput"}
    assert set(GRID_SETTINGS) == wanted


def test_cartesian_order_and_keys():
    g = parse_grid({"block_size": "16,32,64", "rate": "2,inf", "hw": None})
    points = grid_points(g)
    assert len(points) == 6
    assert points[0] == {"block_size": 16, "rate": 2.0} and points[1] == {"block_size": 16, "rate": math.inf}
    assert points[-1] == {"block_size": 64, "rate": math.inf}
    assert len({point_key(p) for p in points}) == 6


@pytest.mark.parametrize("lists, needle", [
    ({"block_size": "16,x"}, "--block-size: 'x' is not a whole number"),
    ({"block_size": "16,,32"}, "--block-size: an empty value"),
    ({"block_size": "16,16"}, "--block-size lists a value twice"),
    ({"instances": "0,1"}, "--instances: 0 must be >= 1"),
    ({"paging": "on,maybe"}, "--paging takes on,off"),
    ({"rate": "2,-1"}, "--rate must be > 0"),
    ({"gpu_memory_utilization": "0.9,nan"}, "--gpu-memory-utilization: 'nan' must be finite"),
])
def test_bad_grid_values_are_refused(lists, needle):
    with pytest.raises(NpusimError, match=needle.replace("(", r"\(")):
        parse_grid(lists)


def test_seeds_depend_on_the_point_not_on_the_run():
    varied = ["input_len", "block_size"]
    a = point_seed(7, {"block_size": 16, "input_len": 100}, varied)
    # engine settings and the rate do not change the seed: the requests are paired across them
    assert point_seed(7, {"block_size": 128, "input_len": 100}, varied) == a
    assert point_seed(7, {"block_size": 16, "input_len": 100, "rate": 3.0}, varied + ["rate"]) == a
    assert point_seed(7, {"block_size": 16, "input_len": 200}, varied) != a
    assert point_seed(8, {"block_size": 16, "input_len": 100}, varied) != a
    # a workload setting given one value keeps the base seed
    assert point_seed(7, {"input_len": 100}, []) == 7


def test_a_point_is_simulate_with_the_same_flags():
    rows = sweep({}, FIXED, grid(block_size="16,128", rate="4"), workers=1)
    rc, out, err = run_cli("simulate", "--model", "llama-3.2-1b", "--engine", "mindie", "--requests", "60",
                           "--block-size", "128", "--rate", "4", "--json")
    assert rc == 0, err
    ref = json.loads(out)
    row = rows[1]
    assert row["status"] == "ok" and row["block_size"] == 128
    for key in ("duration", "output_throughput", "p99_ttft_ms", "p99_tpot_ms", "mean_e2el_ms"):
        assert row[key] == ref[key], key
    assert row["kv_mean_waste_fraction"] == ref["kv_cache"]["mean_waste_fraction"]
    assert row["energy_joules"] == ref["energy"]["joules"]
    assert row["engine_max_num_seqs"] == ref["scenario"]["engine"]["max_num_seqs"]
    # smaller pages waste less of the pool (the physics the page-size study rests on)
    assert rows[0]["kv_mean_waste_fraction"] < rows[1]["kv_mean_waste_fraction"]


def test_infeasible_points_are_recorded_and_the_sweep_goes_on():
    rows = sweep({}, FIXED, parse_grid({"model": "llama-3.2-1b", "requests": "30", "engine": "vllm-ascend-graph",
                                        "block_size": "16,128"}), workers=1)
    assert [r["status"] for r in rows] == ["infeasible", "ok"]
    assert "block_size 16 is not accepted" in rows[0]["error"]


def test_contradicting_points_are_refused_before_anything_runs():
    with pytest.raises(NpusimError, match="point .*paging=off batching=static preemption=swap"):
        sweep({}, FIXED, grid(paging="off", batching="static", preemption="recompute,swap"), workers=1)


def test_local_pool_and_dask_cluster_give_identical_rows(tmp_path):
    g = grid(block_size="16,32,64,128", rate="2,inf")
    serial = sweep({}, FIXED, g, workers=1)
    pooled = sweep({}, FIXED, g, workers=2)
    dask = pytest.importorskip("distributed")
    assert dask
    on_dask = sweep({}, FIXED, g, executor="dask", workers=2)
    assert len(serial) == 8 and all(r["status"] == "ok" for r in serial)
    assert comparable(pooled) == comparable(serial)
    assert comparable(on_dask) == comparable(serial)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_adds_only_missing_points(tmp_path, suffix):
    out = str(tmp_path / f"rows{suffix}")
    first = sweep({}, FIXED, grid(block_size="16,32"), workers=1, out=out)
    ran = []
    both = sweep({}, FIXED, grid(block_size="16,32,64"), workers=1, out=out, resume=True, on_row=ran.append)
    assert [r["block_size"] for r in ran] == [64]
    assert [r["point"] for r in both] == [point_key(p) for p in grid_points(grid(block_size="16,32,64"))]
    on_disk = read_rows(out)
    assert len(on_disk) == 3
    assert on_disk[0]["output_throughput"] == pytest.approx(first[0]["output_throughput"], rel=1e-12)
    again = []
    sweep({}, FIXED, grid(block_size="16,32,64"), workers=1, out=out, resume=True, on_row=again.append)
    assert again == []  # nothing left to do


def test_resume_reruns_failed_points(tmp_path):
    out = tmp_path / "rows.csv"
    sweep({}, FIXED, grid(block_size="16,32"), workers=1, out=str(out))
    text = out.read_text().splitlines()
    header = text[0].split(",")
    cells = text[2].split(",")
    cells[header.index("status")] = "failed"
    out.write_text("\n".join([text[0], text[1], ",".join(cells)]) + "\n")
    ran = []
    sweep({}, FIXED, grid(block_size="16,32"), workers=1, out=str(out), resume=True, on_row=ran.append)
    assert [r["block_size"] for r in ran] == [32] and ran[0]["status"] == "ok"


def test_interrupted_sweep_keeps_what_finished(tmp_path):
    out = str(tmp_path / "rows.csv")
    seen = []

    def stop_after_two(row):
        seen.append(row)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep({}, FIXED, grid(block_size="16,32,64,128"), workers=1, out=out, on_row=stop_after_two)
    assert [r["block_size"] for r in read_rows(out)] == [16, 32]


@pytest.mark.parametrize("args, needle", [
    (["--out", "rows.txt"], "--out rows.txt: the file must end in .parquet or .csv"),
    (["--resume"], "--resume continues an output file: it needs --out"),
    (["--address", "tcp://127.0.0.1:1"], "--address names a Dask scheduler: it needs --executor dask"),
    (["--executor", "ray"], "--executor must be local or dask"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--block-size", "16,abc"], "--block-size: 'abc' is not a whole number"),
    (["--engine", "vllm-ascend-graph", "--block-size", "16"], "no point of the sweep ran; the first reason: block_size 16"),
])
def test_sweep_cli_refusals(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli("sweep", "--model", "llama-3.2-1b", "--requests", "20", *args)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_sweep_cli_refuses_existing_out_and_foreign_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.csv").write_text("a,b\n1,2\n")
    rc, _, err = run_cli("sweep", "--model", "llama-3.2-1b", "--requests", "20", "--out", "old.csv")
    assert rc == 2 and "old.csv exists: add --resume" in err
    rc, _, err = run_cli("sweep", "--model", "llama-3.2-1b", "--requests", "20", "--out", "old.csv", "--resume")
    assert rc == 2 and "is not an npusim sweep output" in err


def test_sweep_cli_json(tmp_path):
    rc, out, err = run_cli("sweep", "--model", "llama-3.2-1b", "--engine", "mindie", "--requests", "20",
                           "--block-size", "16,128", "--workers", "1", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["ok"] == 2 and [r["block_size"] for r in res["rows"]] == [16, 128]


# --------------------------------------------------------------------------- capacity

SLO = {"ttft": 100.0, "tpot": 5.1, "e2el": None}


def _p99s(rate, block_size):
    sc = build_scenario(None, {"model": "llama-3.2-1b", "engine": "mindie", "requests": 300,
                               "block_size": block_size, "rate": rate})
    from npusim.scenario import run_scenario
    r = run_scenario(sc)
    return r["p99_ttft_ms"], r["p99_tpot_ms"]


def test_capacity_answer_holds_on_either_side():
    res = capacity({}, FIXED, parse_grid({"model": "llama-3.2-1b", "engine": "mindie", "block_size": "16,128"}),
                   SLO, requests=300, workers=1)
    assert res["best"]["max_rate"] == max(c["max_rate"] for c in res["configs"])
    for cfg in res["configs"]:
        assert cfg["bound_by"] in ("ttft", "tpot"), cfg  # latency-bound, not memory
        ttft, tpot = _p99s(cfg["max_rate"], cfg["block_size"])
        assert ttft <= SLO["ttft"] and tpot <= SLO["tpot"]
        assert (ttft, tpot) == (cfg["ttft_p99_ms"], cfg["tpot_p99_ms"])  # the same requests
        ttft, tpot = _p99s(1.1 * cfg["max_rate"], cfg["block_size"])
        assert ttft > SLO["ttft"] or tpot > SLO["tpot"]
        rates = [e["rate"] for e in cfg["evaluations"]]
        assert rates == sorted(rates)


def test_capacity_memory_bound_and_impossible_slo():
    g = parse_grid({"model": "llama-3.2-1b", "engine": "mindie", "num_blocks": "40", "input_len": "1500",
                    "output_len": "100"})
    res = capacity({}, FIXED, g, {"ttft": 2000.0, "tpot": None, "e2el": None}, requests=100, workers=1)
    assert res["configs"][0]["bound_by"] == "memory"
    res = capacity({}, FIXED, grid(), {"ttft": None, "tpot": 0.001, "e2el": None}, requests=100, workers=1)
    cfg = res["configs"][0]
    assert res["best"] is None and cfg["bound_by"] == "infeasible" and "violated: tpot" in cfg["reason"]


def test_capacity_cli(tmp_path):
    plot = tmp_path / "cap.html"
    rc, out, err = run_cli("capacity", "--model", "llama-3.2-1b", "--engine", "mindie", "--block-size", "16,128",
                           "--slo-ttft-p99-ms", "400", "--slo-tpot-p99-ms", "12", "--requests", "200",
                           "--workers", "1", "--json", "--plot", str(plot))
    assert rc == 0, err
    res = json.loads(out)
    assert set(res["configs"][0]) >= {"max_rate", "ttft_p99_ms", "tpot_p99_ms", "goodput", "bound_by"}
    assert res["best"]["point"] in [c["point"] for c in res["configs"]]
    assert "Binomial(200, 0.01)" in res["requests_note"]
    html = plot.read_text()
    assert "block_size=16" in html and "SLO" in html


@pytest.mark.parametrize("args, needle", [
    (["--slo-ttft-p99-ms", "100", "--rate", "4"], "No such option: --rate"),
    ([], "capacity needs at least one SLO"),
    (["--slo-ttft-p99-ms", "-5"], "--slo-ttft-p99-ms must be a positive number"),
    (["--slo-ttft-p99-ms", "100", "--plot", "cap.png"], "--plot 'cap.png': give an .html file"),
    (["--slo-tpot-p99-ms", "0.001"], "no configuration meets the SLOs; the first reason: the SLOs are not met"),
])
def test_capacity_cli_refusals(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli("capacity", "--model", "llama-3.2-1b", "--requests", "100", "--workers", "1", *args)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_settings_that_do_not_apply_run_once():
    from npusim.sweep import expand

    points, dropped = expand(parse_grid({"instances": "1,2", "sharing": "time-slice,vnpu"}), {})
    assert dropped == 1
    assert points == [{"instances": 1, "sharing": None}, {"instances": 2, "sharing": "time-slice"},
                      {"instances": 2, "sharing": "vnpu"}]
    points, dropped = expand(parse_grid({"paging": "on,off", "contiguous_policy": "max,oracle",
                                         "prefix_caching": "on,off"}), {})
    assert dropped == 8 - 4
    assert {"paging": True, "contiguous_policy": None, "prefix_caching": False} in points
    assert {"paging": False, "contiguous_policy": "oracle", "prefix_caching": None} in points
    # the scenario's own instance count decides as well
    points, _ = expand(parse_grid({"sharing": "time-slice,vnpu"}), {"instances": 2})
    assert len(points) == 2


def test_paged_against_contiguous_in_one_grid():
    rows = sweep({}, FIXED, grid(paging="on,off", contiguous_policy="max,oracle", rate="inf", block_size="16"),
                 workers=1)
    assert [(r["paging"], r["contiguous_policy"]) for r in rows] == [(True, None), (False, "max"), (False, "oracle")]
    assert all(r["status"] == "ok" for r in rows)
    paged, worst, oracle = (r["kv_mean_waste_fraction"] for r in rows)
    assert paged < oracle < worst  # max reservation wastes most, paging least


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(monkeypatch):
    import npusim.scenario as scenario_module

    real = scenario_module.simulate_scenario

    def broken_at_32(sc, **kw):
        if sc.engine.block_size == 32:
            raise RuntimeError("disk on fire")
        return real(sc, **kw)

    monkeypatch.setattr(scenario_module, "simulate_scenario", broken_at_32)
    rows = sweep({}, FIXED, grid(block_size="16,32,64"), workers=1)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["error"] == "RuntimeError: disk on fire"


def test_dask_scheduler_at_an_address():
    distributed = pytest.importorskip("distributed")
    import logging

    g = grid(block_size="16,128")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster:
        remote = sweep({}, FIXED, g, executor="dask", address=cluster.scheduler_address)
    assert comparable(remote) == comparable(sweep({}, FIXED, g, workers=1))
    with pytest.raises(NpusimError, match="--workers starts a local cluster"):
        sweep({}, FIXED, g, executor="dask", address="tcp://127.0.0.1:1", workers=2)


GRID_SAMPLES = {  # a value for each grid setting -> where it must land in the point's scenario
    "hw": ("h200", lambda s: s.hw == "h200"), "model": ("llama-3.2-1b", lambda s: s.model == "llama-3.2-1b"),
    "engine": ("mindie", lambda s: s.engine.profile == "mindie"),
    "instances": ("2", lambda s: s.instances == 2),
    "sharing": ("vnpu", lambda s: s.sharing == "vnpu"), "block_size": ("32", lambda s: s.engine.block_size == 32),
    "max_num_seqs": ("7", lambda s: s.engine.max_num_seqs == 7),
    "max_num_batched_tokens": ("999", lambda s: s.engine.max_num_batched_tokens == 999),
    "gpu_memory_utilization": ("0.5", lambda s: s.engine.gpu_memory_utilization == 0.5),
    "num_blocks": ("77", lambda s: s.engine.num_blocks == 77),
    "max_model_len": ("1234", lambda s: s.engine.max_model_len == 1234),
    "weight_dtype": ("int8", lambda s: s.engine.weight_dtype == "int8"),
    "kv_dtype": ("int8", lambda s: s.engine.kv_dtype == "int8"),
    "tp": ("2", lambda s: s.engine.tensor_parallel_size == 2),
    "ep": ("2", lambda s: s.engine.expert_parallel_size == 2),
    "dp": ("3", lambda s: s.dp == 3),
    "router": ("least-outstanding", lambda s: s.router == "least-outstanding"),
    "batching": ("static", lambda s: s.engine.batching == "static"),
    "paging": ("off", lambda s: s.engine.paging is False),
    "contiguous_policy": ("oracle", lambda s: s.contiguous_policy == "oracle"),
    "chunked_prefill": ("off", lambda s: s.engine.enable_chunked_prefill is False),
    "prefix_caching": ("off", lambda s: s.engine.enable_prefix_caching is False),
    "preemption": ("swap", lambda s: s.engine.preemption_mode == "swap"),
    "requests": ("13", lambda s: s.workload.num_requests == 13),
    "input_len": ("111", lambda s: s.workload.input_len.value == 111),
    "output_len": ("22", lambda s: s.workload.output_len.value == 22),
    "rate": ("3.5", lambda s: s.workload.rate == 3.5),
    "burstiness": ("2", lambda s: s.workload.burstiness_cv == 2.0),
    "max_concurrency": ("5", lambda s: s.workload.max_concurrency == 5),
    "trace": ("t.csv", lambda s: s.workload.trace == "t.csv"),
    "shared_prefix_len": ("64", lambda s: s.workload.shared_prefix_len == 64),
    "pp": ("2", lambda s: s.engine.pipeline_parallel_size == 2),
    "expert_imbalance": ("1.5", lambda s: s.engine.expert_imbalance == 1.5),
    "cudagraph_mode": ("full_decode_only", lambda s: s.engine.cudagraph_mode == "full_decode_only"),
    "max_cudagraph_capture_size": ("64", lambda s: s.engine.max_cudagraph_capture_size == 64),
}
# settings a sample needs beside it to be a valid scenario
NEEDS = {"sharing": {"instances": "2"}, "router": {"dp": "2"}, "ep": {"tp": "2"},
         "expert_imbalance": {"tp": "2", "ep": "2"}, "contiguous_policy": {"paging": "off"}, "burstiness": {"rate": "3"},
         "preemption": {}, "trace": {}}


def test_every_grid_setting_reaches_its_scenario_field():
    from npusim.sweep import _scenario

    assert set(GRID_SAMPLES) == set(GRID_SETTINGS)
    for name, (text, landed) in GRID_SAMPLES.items():
        params = grid_points(parse_grid({**NEEDS.get(name, {}), name: text}))[0]
        sc = _scenario({"fixed": FIXED, "data": {}, "where": "t"}, params, 0)
        assert landed(sc), name
