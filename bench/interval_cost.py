"""What the uncertainty costs: the intervals and paired comparisons of a 1,319-problem, 4-model GSM8K grid
against the evaluation that produced it, and a bootstrap over 10,000 items.

Sides, each in a fresh process, in shuffled order per round (`--rounds`):
- `evaluation`: the evaluation itself: `--model` (SmolLM2-135M-Instruct, the embedded default) generating for
  GSM8K test problems as evaluate.py does (continuous batching, greedy, `--max-new-tokens`, batch
  `--batch-size`); each timed step is one batch. Its per-problem cost, times 1,319 x 4, is the grid's
  evaluation time.
- `grid_statistics`: everything the statistics add to that grid: the per-metric intervals of 4 x 4 runs of
  1,319 problems (`item_scores.intervals`) and the grid's tables with the paired comparisons and Holm verdicts
  (`task_grid.write_grid`), on per-item scores written as evaluate.py writes them; each timed step is one
  whole grid.
- `bootstrap_10k`: a percentile bootstrap (2,000 resamples) of the mean over 10,000 items, clustered in pairs.

Prints every side's median step time with its spread (min, max over steps and rounds), then

    ratio stats_time_vs_eval = <grid statistics / grid evaluation> (goal <= 0.01)
    ratio bootstrap_10k_vs_1s = <bootstrap seconds / 1 s> (goal <= 1.0)

    python bench/interval_cost.py [--rounds 3] [--batches 3] [--batch-size 8] [--max-new-tokens 256]
    python bench/interval_cost.py --quick   # tiny_llama, one batch, one grid, one round: checks the script
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402

PROBLEMS, MODELS, TASKS = 1319, 4, ("gsm8k", "gsm8k_inf", "gsm8k_rcs", "gsm8k_sd")


def evaluation_steps(model_name: str, batches: int, batch_size: int, max_new_tokens: int) -> dict:
    """Seconds per batch of evaluate.py's generation on GSM8K test problems (first batch untimed)."""
    from hydra import compose, initialize_config_dir

    import datamodules
    from modeling import models
    from modeling.generation import generate

    test = bench_data.path("gsm8k", "test.jsonl")
    data = [f"task.data_files={{train: {test}, test: {test}}}"] if test else ["task.source=bundled"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model={model_name}", *data])
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    task = datamodules.build_task(cfg, tokenizer)
    style = task.prompt_format
    records = task.evaluation_records()[: (batches + 1) * batch_size]
    prompts = [style.prompt(record, []) for record in records]
    stops = style.stop_strings(list(cfg.generation.stop_strings))
    times = []
    for start in range(0, len(prompts), batch_size):
        began = time.perf_counter()
        generate(
            model,
            tokenizer,
            prompts[start : start + batch_size],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            stop_strings=stops,
            do_sample=False,
            num_samples=1,
        )
        times.append(time.perf_counter() - began)
    return {"step_seconds": times[1:], "items_per_step": batch_size}


def fake_grid(folder: Path) -> list[dict]:
    """4 models x 4 tasks of 1,319 problems: run dirs with predictions.jsonl and results.json as evaluate.py
    writes them (scores drawn at accuracies near 0.3), without their intervals."""
    rng = random.Random(0)
    results = []
    for model in range(MODELS):
        for task in TASKS:
            run_dir = folder / f"m{model}-{task}"
            run_dir.mkdir()
            rows = []
            for i in range(PROBLEMS):
                score = float(rng.random() < 0.25 + 0.02 * model)
                rows.append(
                    {
                        "index": i,
                        "where": f"gsm8k/test.jsonl:{i + 1}",
                        "generation": "...",
                        "pass@1_strict": score,
                        "pass@1_flexible": score,
                    }
                )
            (run_dir / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            results.append(
                {
                    "model": f"m{model}",
                    "task": task,
                    "stage": "zero_shot",
                    "run_dir": str(run_dir),
                    "grid_baseline": "gsm8k",
                    "rows": rows,
                }
            )
    return results


def grid_statistics_steps(steps: int) -> dict:
    """Seconds per whole grid: every run's intervals, then the grid tables with the paired comparisons."""
    from omegaconf import OmegaConf

    from evaluation import task_grid
    from stats import comparisons, item_scores

    settings = comparisons.default_settings()
    times = []
    with tempfile.TemporaryDirectory() as folder:
        runs = fake_grid(Path(folder))
        for _ in range(steps + 1):
            began = time.perf_counter()
            for run in runs:
                rows = run["rows"]
                item_scores.assign_ids(rows)
                metrics = {
                    k: sum(r[k] for r in rows) / len(rows) for k in ("pass@1_strict", "pass@1_flexible")
                }
                fields = {k: k for k in metrics}
                run["metrics"] = {**metrics, "num_problems": len(rows)}
                run["intervals"] = item_scores.intervals(rows, metrics, fields, {}, settings)
                with (Path(run["run_dir"]) / "predictions.jsonl").open("w") as handle:
                    handle.writelines(json.dumps(row) + "\n" for row in rows)
                (Path(run["run_dir"]) / "results.json").write_text(
                    json.dumps({k: v for k, v in run.items() if k != "rows"})
                )
            results = [{k: v for k, v in run.items() if k != "rows"} for run in runs]
            task_grid.write_grid(results, Path(folder), "gsm8k", OmegaConf.create(dict(settings)))
            times.append(time.perf_counter() - began)
    return {"step_seconds": times[1:], "items_per_step": PROBLEMS * MODELS * len(TASKS)}


def bootstrap_steps(steps: int) -> dict:
    """Seconds per percentile bootstrap (2,000 resamples) of a mean over 10,000 items in 5,000 clusters."""
    from stats import estimates

    rng = np.random.default_rng(0)
    scores, clusters = rng.random(10_000), np.repeat(np.arange(5_000), 2)
    times = []
    for step in range(steps + 1):
        began = time.perf_counter()
        estimates.mean_estimate(scores, clusters, seed=step)
        times.append(time.perf_counter() - began)
    return {"step_seconds": times[1:], "items_per_step": 10_000}


def run_side(side: str, args: argparse.Namespace) -> dict:
    """One side in a fresh process; its JSON result."""
    command = [
        __file__,
        "--side",
        side,
        *[
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("side", "rounds", "quick") and v is not None  # quick mode passes by its variable
        ],
    ]
    output = quick.run_python(command).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--grid-steps", type=int, default=5)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    bench_data.add_option(parser)
    args = quick.parse(
        parser, model="tiny_llama", rounds=1, batches=1, batch_size=2, max_new_tokens=4, grid_steps=1
    )
    bench_data.announce("GSM8K")
    if args.side:  # a child: time one side and print its result as the last line
        sides = {
            "evaluation": lambda: evaluation_steps(
                args.model, args.batches, args.batch_size, args.max_new_tokens
            ),
            "grid_statistics": lambda: grid_statistics_steps(args.grid_steps),
            "bootstrap_10k": lambda: bootstrap_steps(args.grid_steps),
        }
        print(json.dumps(sides[args.side]()))
        return
    measured: dict[str, list[float]] = {"evaluation": [], "grid_statistics": [], "bootstrap_10k": []}
    items = {}
    order = list(measured)
    for round_number in range(args.rounds):
        random.Random(round_number).shuffle(order)
        for side in order:
            result = run_side(side, args)
            measured[side] += result["step_seconds"]
            items[side] = result["items_per_step"]
            print(f"round {round_number}: {side} steps {[round(t, 4) for t in result['step_seconds']]}")
    median = {side: float(np.median(times)) for side, times in measured.items()}
    for side, times in measured.items():
        print(
            f"{side}: median {median[side]:.4f} s per step of {items[side]} items "
            f"(min {min(times):.4f}, max {max(times):.4f}, {len(times)} steps)"
        )
    grid_evaluation = median["evaluation"] / items["evaluation"] * PROBLEMS * MODELS * len(TASKS)
    print(
        f"grid evaluation (estimated from the median batch): {grid_evaluation:.0f} s; "
        f"grid statistics: {median['grid_statistics']:.2f} s"
    )
    print(f"ratio stats_time_vs_eval = {median['grid_statistics'] / grid_evaluation:.3g} (goal <= 0.01)")
    print(f"ratio bootstrap_10k_vs_1s = {median['bootstrap_10k']:.3f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
