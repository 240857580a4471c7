"""evaluate.py with `generation.backend=vllm` against lmlab's own generation: the same model, problems,
prompts, stop strings and extraction; vLLM only picks the tokens.

Both sides are whole `python evaluate.py` commands (model load or engine start-up, generation, scoring) run by
`--python`, an interpreter that has vLLM (`make vllm-venv` builds `.venv-vllm` with vLLM's CPU build; on a GPU
node, `pip install -e '.[vllm]'`), each in a fresh process, the sides in an order shuffled per round (seeded);
`--model` (SmolLM2-135M-Instruct, or e.g. a merged export) on the first `--problems` GSM8K test problems
(`--data DIR`'s, or the bundled sample's), greedy, `--max-new-tokens`. Prints each side's median wall time
with its range, the share of completions identical to lmlab's, and

    ratio vllm_vs_lmlab = <lmlab seconds / vLLM seconds> (goal >= 1.0)
    ratio vllm_identical_share = <identical completions / problems> (goal >= 1.0)

    python bench/eval_vllm.py [--python .venv-vllm/bin/python] [--problems 16] [--max-new-tokens 128]
                              [--rounds 2] [--model 'model=hf_causal_lm model.path=merged'] [--data DIR]
    python bench/eval_vllm.py --quick   # the tests' stand-in engine on a saved tiny model: checks the script
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from helpers import bench_data, quick  # noqa: E402

from bench.eval_data_parallel import evaluate  # noqa: E402

SIDES = ("lmlab", "vllm")


def has_vllm(python: str) -> bool:
    """Whether `python` can import vLLM."""
    probe = [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def compare(
    python: str,
    problems: int,
    max_new_tokens: int,
    rounds: int,
    root: Path,
    model_overrides: tuple[str, ...] = ("model=smollm2_135m",),
    env: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Both sides `rounds` times (shuffled per round): their wall seconds, and how many of vLLM's completions
    equal lmlab's."""
    name, *common = model_overrides
    order, seconds, completions = random.Random(seed), {side: [] for side in SIDES}, {}
    for round_number in range(rounds):
        sides = list(SIDES)
        order.shuffle(sides)
        for side in sides:
            wall, completions[side] = evaluate(
                1,
                problems,
                max_new_tokens,
                root / f"round{round_number}_{side}",
                name.removeprefix("model="),
                (*common, f"generation.backend={side}"),
                python,
                env,
            )
            seconds[side].append(wall)
            print(f"round {round_number}: {side} {wall:.1f} s", flush=True)
    same = sum(a == b for a, b in zip(completions["lmlab"], completions["vllm"], strict=True))
    return {
        "problems": len(completions["lmlab"]),  # fewer than asked where the data has fewer
        "identical": same,
        "seconds": {side: [round(s, 1) for s in times] for side, times in seconds.items()},
        "ratio": statistics.median(seconds["lmlab"]) / statistics.median(seconds["vllm"]),
    }


def saved_tiny_model(folder: Path) -> tuple[str, str]:
    """tiny_llama saved with save_pretrained to `folder`; the overrides that load it."""
    from hydra import compose, initialize_config_dir

    from modeling import models

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["model=tiny_llama"])
    model, tokenizer = models.build(cfg.model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return f"model.path={folder}", "model.architecture=null"


def stand_in_engine(folder: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """The model overrides and environment that run `generation.backend=vllm` on the tests' stand-in engine
    (tests/fixtures/vllm_stand_in: vLLM's interface over transformers) with tiny_llama saved to `folder`."""
    stand_in = ROOT / "tests" / "fixtures" / "vllm_stand_in"
    env = {"PYTHONPATH": str(stand_in), "VLLM_STAND_IN_LOG": str(folder / "requests.jsonl")}
    return ("model=tiny_llama", *saved_tiny_model(folder)), env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--model",
        default="model=smollm2_135m",
        help="the model's overrides, space-separated (a merged export: 'model=hf_causal_lm model.path=DIR')",
    )
    bench_data.add_option(parser)
    args = quick.parse(parser, problems=2, max_new_tokens=4, rounds=1)
    bench_data.announce("GSM8K")
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            model, env = stand_in_engine(Path(scratch) / "tiny")
        elif has_vllm(args.python):
            model, env = tuple(args.model.split()), None
        else:
            print(f"{args.python} cannot import vLLM: make vllm-venv (CPU build) or pip install -e '.[vllm]'")
            print("ratio vllm_vs_lmlab = nan (goal >= 1.0)")
            print("ratio vllm_identical_share = nan (goal >= 1.0)")
            return
        result = compare(
            args.python, args.problems, args.max_new_tokens, args.rounds, Path(scratch), model, env
        )
    print(
        f"{' '.join(model)}, {result['problems']} GSM8K problems, greedy, max_new_tokens "
        f"{args.max_new_tokens}, {args.rounds} rounds, whole evaluate.py commands by {args.python}"
    )
    for side, times in result["seconds"].items():
        print(f"{side}: median {statistics.median(times):.1f} s (min {min(times):.1f}, max {max(times):.1f})")
    print(f"identical completions: {result['identical']}/{result['problems']}")
    print(f"ratio vllm_vs_lmlab = {result['ratio']:.2f} (goal >= 1.0)")
    print(f"ratio vllm_identical_share = {result['identical'] / result['problems']:.2f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
