"""What finding a model's structure costs, against loading the model it is found in.

    python bench/structure_discovery.py [--repeats 3] [--model smollm2_135m]
    python bench/structure_discovery.py --quick   # one repeat, tiny_llama for the ratio: checks the script

Discovery (modeling/discovery.py) runs once per loaded model: two one-row forward passes of six
tokens through the embeddings and the decoder blocks, with hooks on the blocks' modules (each block's
position mixer is found, so a hybrid's attention blocks are found wherever they sit). Measured on
`--model`, the embedded SmolLM2-135M-Instruct by default (load: its cached safetensors, `models.build`),
and on the tiny from-scratch models (load: built from config). Prints each side's best time and

    ratio discovery_vs_load = <discovery / load on --model> (goal <= 0.05)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import quick  # noqa: E402

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
    parser.add_argument("--model", default="smollm2_135m")
    args = quick.parse(parser, repeats=1, model="tiny_llama")

    print(f"{'model':16s} {'load s':>8s} {'discovery s':>12s} {'share':>7s}")
    for name in TINY:
        load, discovery = measure(models.load_config(name), args.repeats)
        print(f"{name:16s} {load:8.3f} {discovery:12.4f} {discovery / load:7.1%}")
    loaded = models.load_config(args.model)
    models.build(
        loaded
    )  # the first build of a GGUF file dequantises it once; every later one reads the cache
    load, discovery = measure(loaded, args.repeats)
    print(f"{args.model:16s} {load:8.3f} {discovery:12.4f} {discovery / load:7.1%}")
    print(f"ratio discovery_vs_load = {discovery / load:.3f} (goal <= 0.05)")


if __name__ == "__main__":
    main()
