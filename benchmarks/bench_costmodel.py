"""Cost-model evaluations per second, as the simulator calls it (target >= 50,000/s).

Run: .venv/bin/python benchmarks/bench_costmodel.py
"""

import random
import time

from npusim.costmodel import CostModel
from npusim.specs import load_hardware, load_model


def bench(label, fn, n):
    t0 = time.perf_counter()
    fn(n)
    dt = time.perf_counter() - t0
    print(f"{label:<46} {n / dt:>12,.0f} evals/s  ({dt / n * 1e6:.2f} us each)")


def main():
    cm = CostModel(load_hardware("ascend-910b2"), load_model("llama-3.1-8b"))
    rng = random.Random(0)
    batches = [rng.randint(1, 256) for _ in range(1000)]

    def decode_only(n):
        for i in range(n):
            b = batches[i % 1000]
            cm.step_time(b, b * 1500 + i % 997, b * 1536)

    def mixed(n):
        for i in range(n):
            b = batches[i % 1000]
            cm.step_time(b, b * 1500, b * 1536, ((512, 1024 + i % 2048),))

    def cold(n):  # a fresh model each time: the memo never hits
        for i in range(n):
            c = CostModel(cm.hw, cm.model)
            c.step_time(8, 8000, 8192)

    bench("decode-only batches (memo warm)", decode_only, 200_000)
    bench("decode + one prefill chunk (memo warm)", mixed, 100_000)
    bench("cold (new CostModel, first evaluation)", cold, 2_000)
    bench("full per-op breakdown (ops())", lambda n: [cm.ops(8, 8000, 8192) for _ in range(n)], 20_000)


if __name__ == "__main__":
    main()
