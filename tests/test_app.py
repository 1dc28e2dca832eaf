"""The Streamlit dashboard, run headless with AppTest: no exceptions, numbers that match the
analytical model, errors (not tracebacks) for configurations that do not fit, and a simulation."""

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from npusim.analysis import analytical_point  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "app.py"


def start() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def settings(at: AppTest) -> dict:
    """The sidebar's current values, as analytical_point takes them."""
    return dict(
        hw=at.selectbox(key="hw").value,
        model=at.selectbox(key="model").value,
        batch=int(at.number_input(key="batch").value),
        context=int(at.number_input(key="context").value),
        instances=int(at.slider(key="instances").value),
        sharing=at.selectbox(key="sharing").value,
        block_size=int(at.selectbox(key="block_size").value),
        weight_dtype=at.selectbox(key="weight_dtype").value,
        kv_dtype=at.selectbox(key="kv_dtype").value,
        gpu_memory_utilization=float(at.slider(key="gpu_memory_utilization").value),
    )


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label.startswith(label)]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def number(text: str) -> float:
    """'1,454.9 tokens/s' -> 1454.9"""
    return float(text.split()[0].replace(",", ""))


def test_default_page_matches_the_analytical_model():
    at = start()
    s = settings(at)
    p = analytical_point(s.pop("hw"), s.pop("model"), **s)
    assert p.feasible
    assert number(metric(at, "Decode throughput")) == pytest.approx(p.tokens_per_s, abs=0.051)
    assert number(metric(at, "TPOT")) == pytest.approx(p.tpot_ms, abs=0.0051)
    assert metric(at, "Bound") == p.bound
    assert number(metric(at, "Max batch")) == p.max_batch
    assert number(metric(at, "KV capacity")) == p.num_blocks * p.block_size
    assert not at.error
    assert at.success and p.regime in at.success[0].value
    # per-op, memory and batch-sweep charts
    assert len(at.get("plotly_chart")) == 3
    assert any("npusim hw show" in c.value for c in at.caption)


@pytest.mark.parametrize("hw, model, instances", [
    ("ascend-910", "llama-3.1-70b", 1),
    ("ascend-910", "llama-2-13b", 2),
])
def test_configuration_that_does_not_fit_shows_an_error_and_no_throughput(hw, model, instances):
    at = start()
    at.selectbox(key="hw").set_value(hw)
    at.selectbox(key="model").set_value(model)
    at.slider(key="instances").set_value(instances)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert errors and "GiB" in errors[0]
    s = settings(at)
    p = analytical_point(s.pop("hw"), s.pop("model"), **s)
    assert not p.feasible and p.reason in errors[0]  # npusim's own numbers, none invented
    labels = [m.label for m in at.metric]
    assert not any("throughput" in label.lower() or label == "TPOT" for label in labels)
    assert number(metric(at, "Max batch")) == 0


def test_batch_beyond_memory_names_the_cap():
    at = start()
    at.number_input(key="batch").set_value(5000)
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and "max batch" in errors[0]
    assert not any("throughput" in m.label.lower() for m in at.metric)
    assert len(at.get("plotly_chart")) == 2  # memory and the batch sweep up to the cap


def test_block_sizes_offered_are_those_the_device_accepts():
    at = start()
    ascend = [int(b) for b in at.selectbox(key="block_size").options]
    assert ascend == [128]  # vllm-ascend's attention takes 128 only
    at.selectbox(key="hw").set_value("h100-sxm")
    at.run()
    assert not at.exception
    h100 = [int(b) for b in at.selectbox(key="block_size").options]
    assert 16 in h100 and 128 in h100 and 8 not in h100 and 256 not in h100  # vLLM FlashAttention
    assert metric(at, "Decode throughput")


def test_simulate_button_shows_a_results_table():
    at = start()
    at.slider(key="sim_requests").set_value(50)
    at.button(key="simulate").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error
    assert len(at.dataframe) == 1
    table = at.dataframe[0].value
    metrics = set(table["metric"])
    # every line the CLI prints (npusim.text), the KV waste, preemptions and energy among them
    for name in ("Successful requests", "Output token throughput", "Mean TTFT", "P99 TPOT", "Mean ITL",
                 "Mean waste fraction", "Peak waste fraction", "Preemptions / swaps", "Energy", "Mean power"):
        assert name in metrics
    assert len(table) >= 36
    completed = table.loc[table["metric"] == "Successful requests", "value"].iloc[0]
    assert completed == "50"


def test_simulate_on_a_configuration_that_does_not_fit_shows_an_error():
    at = start()
    at.selectbox(key="hw").set_value("ascend-910")
    at.selectbox(key="model").set_value("llama-3.1-70b")
    at.run()
    at.button(key="simulate").click()
    at.run()
    assert not at.exception
    assert any(e.value.startswith("Cannot simulate") and "GiB" in e.value for e in at.error)
    assert not at.dataframe
