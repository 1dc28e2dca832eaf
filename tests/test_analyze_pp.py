"""`analyze --pp`: steady decode through pipeline stages, against the step pricing and physics."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from npusim.analysis import analytical_point, decode_batch, instance_engine
from npusim.costmodel import Batch, instance_setup
from npusim.errors import NpusimError
from npusim.specs import load_hardware, load_model


def _stages(hw, model, pp, micro, context):
    setup = instance_setup(hw, model, instance_engine(batch=micro * pp, block_size=16, weight_dtype="bf16",
                                                      kv_dtype="bf16", utilization=0.9, pp=pp))
    return setup.cost.price_stages(Batch(**decode_batch(batch=micro, context=context, block_size=16)))


def test_pipeline_point_is_the_micro_batch_period():
    """pp micro-batches in flight: a token of each every max(one pass, pp x the slowest stage)."""
    hw, model = load_hardware("h200"), load_model("llama-3.1-70b")
    p = analytical_point(hw, model, batch=64, context=2048, pp=2)
    host, stages, _, _ = _stages(hw, model, 2, 32, 2048)
    one = host + sum(stages)
    period = max(one, 2 * max(stages))
    assert p.feasible and p.pp == 2 and p.micro_batch == 32 and len(p.stage_ms) == 2
    assert p.tpot_ms == pytest.approx(period * 1e3, rel=1e-9)
    assert p.tokens_per_s == pytest.approx(64 / period, rel=1e-9)
    assert p.bubble == pytest.approx(1 - sum(stages) / period, rel=1e-9)
    assert 0 <= p.bubble < 1


def test_two_stages_fit_what_one_device_does_not():
    """70B in bf16 does not fit one H200; over two stages it does, and more sequences in flight
    give more throughput (decode is memory-bound on the weights, read once a pass)."""
    hw, model = load_hardware("h200"), load_model("llama-3.1-70b")
    one = analytical_point(hw, model, batch=32, context=2048)
    assert not one.feasible and "GiB > usable" in one.reason
    two = analytical_point(hw, model, batch=32, context=2048, pp=2)
    assert two.feasible
    # more in flight, more throughput: the decode is memory-bound on the weights
    four = analytical_point(hw, model, batch=64, context=2048, pp=2)
    assert four.tokens_per_s > two.tokens_per_s


def test_pp1_is_the_single_device_point_exactly():
    hw, model = load_hardware("h200"), load_model("llama-3.1-8b")
    a = analytical_point(hw, model, batch=16, context=1024)
    b = analytical_point(hw, model, batch=16, context=1024, pp=1)
    assert a == b


def test_pipeline_refusals():
    hw, model = load_hardware("h200"), load_model("llama-3.1-8b")
    with pytest.raises(NpusimError, match="micro-batches"):
        analytical_point(hw, model, batch=3, context=1024, pp=2)
    with pytest.raises(NpusimError, match="instance"):
        analytical_point(hw, model, batch=4, context=1024, pp=2, instances=2)


def test_cli_analyze_pp_json_and_errors():
    code, out, err = run_cli("analyze", "--model", "llama-3.1-70b", "--hw", "h200", "--pp", "2", "--batch", "64",
                             "--context", "2048", "--json")
    assert code == 0, err
    point = json.loads(out)["point"]
    assert point["pp"] == 2 and point["micro_batch"] == 32 and len(point["stage_ms"]) == 2
    for extra, words in ((["--batch", "5"], ("--batch 5", "--pp 2")), (["--batch", "4", "--compare"], ("--pp",)),
                         (["--batch", "4", "--instances", "2"], ("--instances",))):
        code, out, err = run_cli("analyze", "--model", "llama-3.1-8b", "--hw", "h200", "--pp", "2", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
