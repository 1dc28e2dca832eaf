"""Waste of paged vs contiguous KV allocation on the real Azure conversation trace (skips when
../shared/data is absent) and on a small synthetic trace of our own (always runs)."""


from conftest import shared_trace
from npusim.kvstudy import format_study, waste_study


def _by_name(rows):
    return {r["allocator"]: r for r in rows}


def test_waste_on_the_azure_conversation_trace():
    trace = shared_trace("splitwise_conv.csv")
    rows = _by_name(waste_study(str(trace), requests=2000))
    p16, p128 = rows["paged, block 16"], rows["paged, block 128"]
    cmax, coracle = rows["contiguous, max reservation"], rows["contiguous, oracle reservation"]
    # vLLM: paging wastes under 4 %, contiguous reservation 60-80 %
    assert p16["waste_fraction"] < 0.04
    assert p16["waste_fraction"] < p128["waste_fraction"] < 0.10  # bigger pages, bigger tails
    assert 0.6 <= cmax["waste_fraction"] <= 0.8
    # the oracle reserves exactly prompt + output: it wastes only what is not generated yet
    assert p128["waste_fraction"] < coracle["waste_fraction"] < cmax["waste_fraction"]
    assert "paged, block 16" in format_study(list(rows.values()))


def test_waste_ordering_on_a_small_synthetic_trace(tmp_path):
    p = tmp_path / "t.csv"
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    for i in range(120):
        lines.append(f"{i * 0.05:.2f},{200 + (i * 37) % 900},{20 + (i * 53) % 300}")
    p.write_text("\n".join(lines) + "\n")
    rows = _by_name(waste_study(str(p), max_model_len=2048))
    assert rows["paged, block 16"]["waste_fraction"] < rows["paged, block 128"]["waste_fraction"]
    assert rows["paged, block 128"]["waste_fraction"] < rows["contiguous, max reservation"]["waste_fraction"]
    assert rows["contiguous, max reservation"]["waste_fraction"] > 0.5
    for r in rows.values():
        assert r["completed"] == 120 and r["rejected"] == 0
