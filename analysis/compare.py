"""Paired comparison of evaluation runs on the same items:

    python -m analysis.compare RUN_DIR_A RUN_DIR_B [RUN_DIR_C ...] [--metric pass@1_flexible] [--out DIR]

`--metric` may be given several times, or as `all` (every metric of the first run with per-item scores: each
benchmark of a `task=lm_eval` run, pass@k and maj@k), Holm-adjusting across every row of the table.

Every two runs (A before B in the order given) are compared on the items both scored, read from each run's
predictions.jsonl: difference of means with its paired interval, exact McNemar for 0/1 scores (items that
flipped each way), the minimum detectable effect at this n, and a verdict Holm-adjusted across the table
(stats/comparisons.py). Runs whose item ids differ are refused. Writes `comparison.csv` and `comparison.md`
into `--out` (default `outputs/compare/<time>`) and prints the markdown table. The interval level, power and
seed come from conf/statistics/default.yaml (`--confidence`, `--power` override them).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from evaluation import predictions
from runtime.results import read_results
from stats import comparisons, tables


def compare(
    run_dirs: list[Path], out_dir: Path, settings: DictConfig, metrics: list[str] | None = None
) -> list[Path]:
    """Compare every two of `run_dirs` on each of `metrics` (default: the first run's optimized metric; `all`:
    every metric it has per-item scores for); write the table into `out_dir`."""
    if len(run_dirs) < 2:
        raise ValueError(f"analysis.compare needs at least two run dirs, got {len(run_dirs)}")
    if metrics == ["all"]:
        metrics = predictions.item_metrics(run_dirs[0])
    chosen = metrics or [predictions.read(run_dirs[0]).metric]
    labels = _labels(run_dirs)
    pairs, named = [], []
    for metric in chosen:
        runs = [predictions.read(run_dir, metric) for run_dir in run_dirs]
        for i, j in itertools.combinations(range(len(runs)), 2):
            pairs.append((runs[i], runs[j]))
            named.append((labels[i], labels[j]))
    rows = comparisons.table(pairs, named, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_note = "\n".join(f"- {label}: {run_dir}" for label, run_dir in zip(labels, run_dirs, strict=True))
    return tables.write(
        rows,
        out_dir / "comparison.csv",
        f"Paired comparison on {', '.join(chosen)}",
        f"{runs_note}\n\n{comparisons.note(settings)}",
    )


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short names for the runs: `model/task` (`+ckpt` when fine-tuned) where those tell them apart, else the
    shortest tail of each path that does."""
    described = []
    for run_dir in run_dirs:
        results = read_results(run_dir)
        described.append(
            f"{results.get('model')}/{results.get('task')}" + ("+ckpt" if results.get("ckpt") else "")
        )
    if len(set(described)) == len(described):
        return described
    parts = [Path(run_dir).resolve().parts for run_dir in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run_dir) for run_dir in run_dirs]


def main(argv: list[str] | None = None) -> None:
    """Command line: compare the run dirs given, print the table and where it was written."""
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="evaluate.py run dirs")
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="a metric with per-item scores (default: the headline); repeat it, or `all`",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the table goes")
    parser.add_argument("--confidence", type=float, default=None)
    parser.add_argument("--power", type=float, default=None)
    arguments = parser.parse_args(argv)
    settings = comparisons.default_settings()
    for key in ("confidence", "power"):
        if getattr(arguments, key) is not None:
            settings[key] = getattr(arguments, key)
    out_dir = arguments.out or Path("outputs/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    try:
        paths = compare(arguments.run_dirs, out_dir, settings, arguments.metric)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"analysis.compare: {error}")
    print(paths[1].read_text())
    print("written:", *paths)


if __name__ == "__main__":
    main()
