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


def sim_table(at: AppTest):
    """The simulation's results table (section, metric, value, unit), or None."""
    found = [d.value for d in at.dataframe if list(d.value.columns) == ["section", "metric", "value", "unit"]]
    return found[0] if found else None


def number(text: str) -> float:
    """'1,454.9 tokens/s' -> 1454.9"""
    return float(text.split()[0].replace(",", ""))


def test_default_page_matches_the_analytical_model():
    at = start()
    s = settings(at)
    p = analytical_point(s.pop("hw"), s.pop("model"), **s)
    assert p.feasible
    assert number(metric(at, "Decode tok/s")) == pytest.approx(p.tokens_per_s, abs=0.051)
    assert number(metric(at, "TPOT")) == pytest.approx(p.tpot_ms, abs=0.0051)
    assert metric(at, "Bound") == p.bound
    assert number(metric(at, "Max batch")) == p.max_batch
    assert number(metric(at, "KV capacity")) == p.num_blocks * p.block_size
    assert not at.error
    assert at.success and p.regime in at.success[0].value
    # per-op, memory, batch-sweep, page-size and roofline charts (tabs render all)
    assert len(at.get("plotly_chart")) == 5
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
    assert not any("tok/s" in label or label.startswith(("TPOT", "TTFT")) for label in labels)
    assert number(metric(at, "Max batch")) == 0


def test_batch_beyond_memory_names_the_cap():
    at = start()
    at.number_input(key="batch").set_value(5000)
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and "max batch" in errors[0]
    assert not any("tok/s" in m.label for m in at.metric)
    assert len(at.get("plotly_chart")) == 2  # memory, the batch sweep up to the cap (no page size fits)
    infos = [i.value for i in at.info]
    assert any("What would fit" in i and "batch" in i for i in infos)


def test_block_sizes_offered_are_those_the_device_accepts():
    at = start()
    ascend = [int(b) for b in at.selectbox(key="block_size").options]
    assert ascend == [128]  # vllm-ascend's attention takes 128 only
    at.selectbox(key="hw").set_value("h100-sxm")
    at.run()
    assert not at.exception
    h100 = [int(b) for b in at.selectbox(key="block_size").options]
    assert 16 in h100 and 128 in h100 and 8 not in h100 and 256 not in h100  # vLLM FlashAttention
    assert metric(at, "Decode tok/s")


def test_simulate_button_shows_a_results_table():
    at = start()
    at.slider(key="sim_requests").set_value(50)
    at.button(key="simulate").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error
    table = sim_table(at)
    assert table is not None
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
    assert sim_table(at) is None


def test_new_hardware_resets_engine_and_block_size_to_its_own():
    at = start()
    at.selectbox(key="hw").set_value("h100-sxm")
    at.run()
    at.selectbox(key="block_size").set_value(16)
    at.run()
    at.selectbox(key="hw").set_value("h200")
    at.run()
    assert not at.exception
    # h200's engine (vllm) recommends 16 as well; back to an Ascend device: 128, whatever was set
    assert at.selectbox(key="engine").value == "vllm"
    at.selectbox(key="hw").set_value("ascend-910b2")
    at.run()
    assert at.selectbox(key="engine").value == "vllm-ascend-graph"
    assert int(at.selectbox(key="block_size").value) == 128


def test_engine_choice_sets_the_pages_and_the_numbers():
    at = start()
    base = number(metric(at, "Decode tok/s"))
    at.selectbox(key="engine").set_value("mindie")
    at.run()
    assert [int(b) for b in at.selectbox(key="block_size").options] == [16, 32, 64, 128]
    s = settings(at)
    p = analytical_point(s.pop("hw"), s.pop("model"), engine="mindie", **s)
    assert number(metric(at, "Decode tok/s")) == pytest.approx(p.tokens_per_s, abs=0.051) != base


def test_the_url_carries_the_settings_and_bad_values_are_named():
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.query_params["model"] = "llama-3.2-1b"
    at.query_params["batch"] = "8"
    at.query_params["hw"] = "h200"
    at.query_params["block_size"] = "32"
    at.query_params["colour"] = "blue"
    at.run()
    assert not at.exception
    assert at.selectbox(key="model").value == "llama-3.2-1b" and int(at.number_input(key="batch").value) == 8
    assert at.selectbox(key="hw").value == "h200" and int(at.selectbox(key="block_size").value) == 32
    warnings = [w.value for w in at.warning]
    assert any("colour is not a setting" in w for w in warnings)
    # and the page writes its state back into the URL
    assert at.query_params["model"] == ["llama-3.2-1b"] or at.query_params["model"] == "llama-3.2-1b"
    at2 = AppTest.from_file(str(APP), default_timeout=30)
    at2.query_params["batch"] = "many"
    at2.query_params["model"] = "gpt-5"
    at2.run()
    warnings = [w.value for w in at2.warning]
    assert any("batch='many' is not a int" in w for w in warnings)
    assert any("model='gpt-5' is not one of the choices" in w for w in warnings)


def test_pinned_configuration_is_compared_with_the_current_one():
    at = start()
    at.button(key="pin").click()
    at.run()
    at.selectbox(key="weight_dtype").set_value("int8")
    at.run()
    assert not at.exception
    frames = [d.value for d in at.dataframe if "A (pinned)" in d.value.columns]
    assert frames
    row = frames[0][frames[0]["metric"] == "Max batch that fits"].iloc[0]
    assert number(row["B (now)"]) > number(row["A (pinned)"])  # int8 weights leave room for more KV
    sharing = [d.value for d in at.dataframe if "layout" in d.value.columns and "fits" in d.value.columns][0]
    assert list(sharing["layout"]) == ["1 instance", "2 instances, time-sliced", "2 vNPUs"]


def test_simulation_warns_when_overloaded_and_offers_downloads():
    # the default page: 8 requests/s offered to a batch of 32 serves about 4.7
    at = start()
    at.button(key="simulate").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(w.value.startswith("Overloaded") for w in at.warning)
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download JSON", "Download CSV", "Download HTML report"]


def test_hardware_tab_shows_every_number_with_its_source():
    at = start()
    tables = [d.value for d in at.dataframe if list(d.value.columns) == ["field", "value", "kind", "source"]]
    assert len(tables) == 2  # the device and the engine
    hw = tables[0]
    assert {"memory_bandwidth_gbs", "matmul_tflops_bf16", "default_engine"} <= set(hw["field"])
    assert hw["source"].str.len().min() >= 1


def test_uploads_are_size_limited_and_checked_by_the_loaders():
    """save_upload (app.py's functions, without running its page) keeps files by content hash."""
    import types

    module = types.ModuleType("app_functions")
    exec(compile(APP.read_text().replace("\nmain()\n", "\n"), str(APP), "exec"), module.__dict__)

    class Upload:
        def __init__(self, name, data):
            self.name, self._data = name, data

        def getvalue(self):
            return self._data

    from npusim.errors import NpusimError
    from npusim.specs import load_model

    config = (Path(__file__).parent / "fixtures" / "qwen3-tiny-config.json").read_bytes()
    path = module.save_upload("model", Upload("mine.json", config))
    assert path.endswith("mine.json") and load_model(path).num_layers > 0
    assert module.save_upload("model", Upload("mine.json", config)) == path  # the same content, the same file
    with pytest.raises(NpusimError, match="over the 1 MiB limit for a hardware file"):
        module.save_upload("hardware", Upload("big.yaml", b"x" * (2 << 20)))


def test_unloaded_ttft_is_on_the_headline():
    from npusim.analysis import unloaded_ttft

    at = start()
    s = settings(at)
    want = unloaded_ttft(s["hw"], s["model"], prompt=s["context"], block_size=s["block_size"])
    assert number(metric(at, "TTFT, unloaded")) == pytest.approx(want["ttft_ms"], abs=0.051)


def test_capacity_tab_finds_the_highest_load():
    at = start()
    at.selectbox(key="model").set_value("llama-3.2-1b")
    at.run()
    at.checkbox(key="cap_modes").uncheck()
    at.number_input(key="cap_requests").set_value(100)
    at.number_input(key="slo_tpot").set_value(8.0)
    at.button(key="capacity").click()
    at.run(timeout=120)
    assert not at.exception, [e.value for e in at.exception]
    tables = [d.value for d in at.dataframe if "max rate (req/s)" in d.value.columns]
    assert tables and len(tables[0]) == 1
    assert number(tables[0]["max rate (req/s)"].iloc[0]) > 0
    assert any(s.value.startswith("Most load:") for s in at.success)


def test_tensor_parallel_makes_a_model_fit_that_one_device_cannot_hold():
    at = start()
    at.selectbox(key="hw").set_value("h200")
    at.selectbox(key="model").set_value("llama-3.1-70b")
    at.run()
    assert any("What would fit" in i.value and "2 devices (tensor parallel)" in i.value for i in at.info)
    at.number_input(key="tp").set_value(2)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    p = analytical_point("h200", "llama-3.1-70b", batch=32, context=2048, block_size=16, tp=2)
    assert p.feasible
    assert number(metric(at, "Decode tok/s")) == pytest.approx(p.tokens_per_s, abs=0.051)
    assert at.query_params["tp"] in ("2", ["2"])
