"""Replay published `vllm bench serve` results and print npusim's prediction beside each.

    python benchmarks/validate_serving.py [--cases benchmarks/serving_cases.yaml]

For every case (see serving_cases.yaml: source, server, workload, what the source does not say)
it simulates the same workload against the same server and prints predicted vs measured duration,
mean TTFT, mean TPOT and output throughput (tokens/s), with the engine profile used, then the median absolute error per metric,
over all cases, per device family (GPU, Ascend) and apart for GPUStack's runs (an independent
check). No case was used for fitting.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from npusim.scenario import Scenario, simulate_scenario, summarize
from npusim.specs import EngineConfig
from npusim.workload import WorkloadSpec

METRICS = ("duration", "mean_ttft_ms", "mean_tpot_ms", "output_throughput")


def predict(case: dict) -> dict:
    # (dp, router: data-parallel ranks behind vLLM's load balancer, where the case has them)
    sc = Scenario(hw=case["hw"], model=case["model"], engine=EngineConfig(**case["engine"]),
                  workload=WorkloadSpec(**case["workload"]), dp=case.get("dp", 1),
                  **({"router": case["router"]} if "router" in case else {}), seed=0)
    return summarize(simulate_scenario(sc), sc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=str(Path(__file__).with_name("serving_cases.yaml")))
    args = ap.parse_args()
    cases = yaml.safe_load(Path(args.cases).read_text())["cases"]
    errors: dict[str, list[float]] = {m: [] for m in METRICS}
    # (the same per device family: GPU and Ascend runs apart)
    by_family: dict[tuple[str, str], list[float]] = {}
    print(f"{'case':50s} {'hw / engine':32s} {'metric':13s} {'predicted':>10s} {'measured':>10s} {'error':>8s}")
    for case in cases:
        got = predict(case)
        where = f"{case['hw']} / {got['engine_profile']}"
        for m in METRICS:
            if m not in case["measured"]:
                continue
            want, have = case["measured"][m], got[m]
            err = (have - want) / want
            errors[m].append(abs(err))
            family = "Ascend" if case["hw"].startswith("ascend") else "GPU"
            by_family.setdefault((family, m), []).append(abs(err))
            # GPUStack's runs are kept apart as an independent check (issue 10)
            check = "GPUStack" if case["name"].startswith("gpustack-") else "other"
            by_family.setdefault((f"{family}, {check}", m), []).append(abs(err))
            print(f"{case['name']:50s} {where:32s} {m:13s} {have:10.2f} {want:10.2f} {err:+8.1%}")
        print(f"{'':50s} host-bound iterations predicted: {got['host_bound_iteration_fraction']:.0%}")
        print(f"{'':50s} assumed: {' '.join(str(case.get('assumed', 'nothing')).split())}")
    print()
    for m, e in errors.items():
        if e:
            print(f"{m:13s} median |error| {statistics.median(e):6.1%} over {len(e)} case(s), max {max(e):6.1%}")
    print()
    for (family, m), e in sorted(by_family.items()):
        print(f"{family:16s} {m:17s} median |error| {statistics.median(e):6.1%} over {len(e)} case(s), "
              f"max {max(e):6.1%}")


if __name__ == "__main__":
    main()
