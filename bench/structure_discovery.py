"""What finding a model's structure costs, against loading the model it is found in.

    python bench/structure_discovery.py [--repeats 3]

Discovery (modeling/discovery.py) runs once per loaded model: two one-row forward passes of six
tokens through the embeddings and the decoder blocks, with hooks on the blocks' modules (each block's
position mixer is found, so a hybrid's attention blocks are found wherever they sit). Measured on the
embedded SmolLM2-135M-Instruct (load: its cached safetensors through `models.build`) and on the tiny
from-scratch models (load: built from config). Prints each side's best time and

    ratio discovery_vs_load = <discovery / load on SmolLM2> (goal <= 0.05)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling import discovery, models  # noqa: E402

TINY = ["tiny_llama", "tiny_diffllama", "tiny_qwen2", "tiny_gpt2"]


def best(seconds: list[float]) -> float:
    return min(seconds)


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def measure(cfg, repeats: int) -> tuple[float, float]:
    """(best load seconds, best discovery seconds) of the model `cfg` describes."""
    loads, discoveries = [], []
    for _ in range(repeats):
        seconds, (model, _) = timed(lambda: models.build(cfg))
        loads.append(seconds)
        discoveries.append(timed(lambda model=model: discovery.discover(model))[0])
    return best(loads), best(discoveries)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"{'model':16s} {'load s':>8s} {'discovery s':>12s} {'share':>7s}")
    for name in TINY:
        load, discovery = measure(models.load_config(name), args.repeats)
        print(f"{name:16s} {load:8.3f} {discovery:12.4f} {discovery / load:7.1%}")
    smollm = models.load_config("smollm2_135m")
    models.build(smollm)  # the first build dequantises the GGUF file once; every later one reads the cache
    load, discovery = measure(smollm, args.repeats)
    print(f"{'smollm2_135m':16s} {load:8.3f} {discovery:12.4f} {discovery / load:7.1%}")
    print(f"ratio discovery_vs_load = {discovery / load:.3f} (goal <= 0.05)")


if __name__ == "__main__":
    main()
