"""The published serving cases that benchmarks/validate_serving.py replays: each names its source
and what it had to assume, compares only metrics npusim reports, and describes a server that fits
every request of its workload."""

from pathlib import Path

import yaml

from npusim.costmodel import instance_setup
from npusim.specs import EngineConfig, load_hardware, load_model

CASES = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_cases.yaml"
METRICS = {"duration", "mean_ttft_ms", "mean_tpot_ms", "output_throughput"}


def test_every_serving_case_is_sourced_and_describes_a_server_that_fits():
    cases = yaml.safe_load(CASES.read_text())["cases"]
    assert len({c["name"] for c in cases}) == len(cases) >= 3
    for c in cases:
        assert c["source"].strip() and c["assumed"].strip(), c["name"]
        assert c["measured"] and set(c["measured"]) <= METRICS, c["name"]
        assert all(v > 0 for v in c["measured"].values()), c["name"]
        setup = instance_setup(load_hardware(c["hw"]), load_model(c["model"]), EngineConfig(**c["engine"]))
        assert setup.plan.fits, c["name"]
        w = c["workload"]
        longest = w["input_len"]["value"] + w["output_len"]["value"]
        assert longest <= setup.usable_blocks * setup.engine.block_size, c["name"]
