"""The seed article's study: the physics that the verdicts rest on."""

import json

import pytest

from conftest import run_cli
from npusim.seed import ARTICLE, bounds, run_seed


@pytest.fixture(scope="module")
def seed_result():
    return run_seed(requests=4)


def test_article_configurations_are_reproduced(seed_result):
    rows = {r["name"]: r for r in seed_result["scenarios"]}
    assert set(rows) == set(ARTICLE)
    for row in rows.values():
        assert {"name", "instances", "paging", "feasible", "reason", "throughput_tok_s",
                "latency_ms_per_token", "memory_gb", "tokens_per_joule"} <= set(row)
    single = rows["single, paging"]
    assert single["feasible"] and single["model"] == "llama-2-13b"


def test_batch1_decode_latency_never_beats_weights_over_bandwidth(seed_result):
    floor_ms = bounds(1, True, 0.98)["t_floor_ms"]
    assert floor_ms == pytest.approx(26.03e9 / 1.2e12 * 1e3, rel=0.01)  # ~21.7 ms
    for row in seed_result["scenarios"]:
        if row["feasible"]:
            assert row["latency_ms_per_token"] >= floor_ms
            assert row["throughput_tok_s"] <= row["max_batch"] * 1e3 / floor_ms


def test_two_13b_instances_do_not_fit_in_32_gb(seed_result):
    dual = next(r for r in seed_result["scenarios"] if r["instances"] == 2)
    assert dual["feasible"] is False
    assert "2 instances x 24.24 GiB weights = 48.49 GiB vs 32 GiB" in dual["reason"]
    for key in ("throughput_tok_s", "latency_ms_per_token", "memory_gb", "tokens_per_joule"):
        assert dual[key] is None


def test_every_table_figure_is_judged_against_a_bound(seed_result):
    claims = seed_result["claims"]
    table = [c for c in claims if c["claim"].split(":")[0] in ARTICLE]
    assert len(table) == 12
    for c in table:
        assert set(c) >= {"claim", "seed_value", "npusim_value", "bound", "plausible", "why"}
        # every figure of the article's table is beyond what the device and model allow
        assert c["plausible"] is False, c
    mem = next(c for c in table if c["claim"].startswith("single, paging: memory"))
    assert mem["bound"] == pytest.approx(26.03, rel=0.01) and mem["seed_value"] == 12.0


def test_text_claims(seed_result):
    text = {c["claim"]: c for c in seed_result["claims"]}
    cut = text["paging cuts peak memory by more than 50 % for L > 4096"]
    assert cut["plausible"] is False and cut["bound"] < 0.5
    bw = text["throughput is bandwidth-limited for L > 8192"]
    assert bw["plausible"] is True and "every context length" in bw["why"]
    page = text["page size around P = 256 suits long inputs"]
    assert page["npusim_value"] != 256


def test_alternatives_include_a_feasible_dual_instance_study(seed_result):
    duals = [a for a in seed_result["alternatives"] if a["instances"] == 2 and a["feasible"]]
    assert duals, "some smaller or quantised model must fit twice on a 910"
    for a in duals:
        assert a["throughput_tok_s"] > 0 and a["memory_gb"] < 32 * 1.074
    infeasible = [a for a in seed_result["alternatives"] if not a["feasible"]]
    for a in infeasible:
        assert a["reason"] and a["throughput_tok_s"] is None


def test_seed_cli_json_and_table():
    rc, out, err = run_cli("seed", "--requests", "2", "--no-alternatives", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert [s["name"] for s in d["scenarios"]] == list(ARTICLE)
    assert d["alternatives"] == []
    rc, out, err = run_cli("seed", "--requests", "2", "--no-alternatives")
    assert rc == 0
    assert "art" in out and "sim" in out and "Claims:" in out and "impossible" in out
    rc, _, err = run_cli("seed", "--gpu-memory-utilization", "0")
    assert rc == 2 and "--gpu-memory-utilization" in err
