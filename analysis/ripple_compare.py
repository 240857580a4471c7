"""Comparing ripple studies across models (`python -m analysis.ripple_compare <run dir>...`): each run's
coupling/ripple correlation side by side, a verdict on whether the hypothesis holds for every model, one
figure."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from analysis.ripple import ripple_pairs
from figures import analysis as plots


def load_run(run_dir: Path) -> dict[str, Any]:
    """One finished ripple run: its analysis, the GradSim matrix and the per-pair values."""
    missing = [
        n
        for n in (
            "correlation_analysis.json",
            "coupling_matrix.npy",
            "ripple_experiments.json",
            "knowledge_pieces.json",
        )
        if not (run_dir / n).exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: not a finished `python -m analysis.ripple` run (missing {', '.join(missing)})"
        )
    matrix = np.load(run_dir / "coupling_matrix.npy")
    chains = [p["chain"] for p in json.loads((run_dir / "knowledge_pieces.json").read_text())]
    experiments = json.loads((run_dir / "ripple_experiments.json").read_text())
    analysis = json.loads((run_dir / "correlation_analysis.json").read_text())
    return {
        "analysis": analysis,
        "matrix": matrix,
        "pairs": ripple_pairs(experiments, matrix, chains),
        "chains": chains,
    }


def comparison_rows(runs: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """One row per run: coupling and ripple statistics, the Spearman correlation with its CI, the verdict."""
    rows = []
    for label, run_data in zip(labels, runs, strict=True):
        matrix, pairs, analysis = run_data["matrix"], run_data["pairs"], run_data["analysis"]
        spearman = analysis["correlation"]["all"]["spearman"] or {
            "r": float("nan"),
            "p": float("nan"),
            "ci": [float("nan")] * 2,
        }
        upper = matrix[np.triu_indices(len(matrix), k=1)]
        rows.append(
            {
                "model": label,
                "pieces": len(matrix),
                "edits": analysis["edits"],
                "edit_success_rate": analysis["edit_success_rate"],
                "gradsim_mean": float(upper.mean()),
                "gradsim_median": float(np.median(upper)),
                "gradsim_within_chain": float(pairs["gradsim"][pairs["within"]].mean())
                if pairs["within"].any()
                else None,
                "gradsim_across_chain": float(pairs["gradsim"][~pairs["within"]].mean())
                if (~pairs["within"]).any()
                else None,
                "ripple_mean": float(pairs["ripple"].mean()),
                "ripple_median": float(np.median(pairs["ripple"])),
                "spearman_r": spearman["r"],
                "spearman_p": spearman["p"],
                "spearman_ci_low": spearman["ci"][0],
                "spearman_ci_high": spearman["ci"][1],
                "hypothesis_held": analysis["correlation"]["hypothesis_held"],
            }
        )
    return rows


def compare(run_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write coupling_comparison.{csv,md,png} for several ripple runs; return the rows and the verdict."""
    runs = [load_run(Path(d)) for d in run_dirs]
    names = [r["analysis"]["model"] for r in runs]
    labels = [
        name if names.count(name) == 1 else f"{name} ({Path(d).name})"
        for name, d in zip(names, run_dirs, strict=True)
    ]
    rows = comparison_rows(runs, labels)
    held = sum(row["hypothesis_held"] for row in rows)
    verdict = (
        "held for every model"
        if held == len(rows)
        else "held for no model"
        if held == 0
        else f"inconsistent: held for {held} of {len(rows)} models"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "coupling_comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Knowledge coupling across models",
        "",
        "| model | pieces | edits | edit success | GradSim mean (within / across chain) | ripple mean | "
        "Spearman r [CI] (p) | hypothesis |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        within = "-" if row["gradsim_within_chain"] is None else f"{row['gradsim_within_chain']:.3f}"
        across = "-" if row["gradsim_across_chain"] is None else f"{row['gradsim_across_chain']:.3f}"
        lines.append(
            f"| {row['model']} | {row['pieces']} | {row['edits']} | {row['edit_success_rate']:.0%} | "
            f"{row['gradsim_mean']:.3f} ({within} / {across}) | {row['ripple_mean']:.3f} | "
            f"{row['spearman_r']:.3f} [{row['spearman_ci_low']:.3f}, {row['spearman_ci_high']:.3f}] "
            f"({row['spearman_p']:.3g}) | "
            f"{'held' if row['hypothesis_held'] else 'not supported'} |"
        )
    lines += [
        "",
        f"Across architectures the hypothesis (higher GradSim -> stronger ripple) **{verdict}**.",
        "",
    ]
    (out_dir / "coupling_comparison.md").write_text("\n".join(lines))
    plots.coupling_comparison(
        [r["matrix"] for r in runs], [r["pairs"] for r in runs], rows, out_dir / "coupling_comparison.png"
    )
    return {"rows": rows, "verdict": verdict}


def main(argv: list[str]) -> None:
    """`python -m analysis.ripple_compare <run dir>... [--out DIR]`."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.ripple_compare", description="Compare ripple runs across models"
    )
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("outputs/ripple/comparison"))
    arguments = parser.parse_args(argv)
    result = compare(arguments.run_dirs, arguments.out)
    print(
        f"{len(result['rows'])} models; hypothesis {result['verdict']}; tables and figure in {arguments.out}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
