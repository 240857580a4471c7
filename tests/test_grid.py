"""The Pass@1 grid of an evaluate.py sweep: drops from the clean task, accuracy for classification, and
comparisons of models and of clean vs noisy sets paired on the same problems."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from analysis import noise_study
from evaluation import predictions, task_grid
from stats import estimates, item_scores


def test_grid_drop_is_relative_to_the_clean_score() -> None:
    results = [
        {
            "model": "m",
            "task": "gsm8k",
            "metrics": {"pass@1_strict": 0.5, "pass@1_flexible": 0.8, "num_problems": 10},
        },
        {
            "model": "m",
            "task": "gsm8k_inf",
            "metrics": {"pass@1_strict": 0.25, "pass@1_flexible": 0.6, "num_problems": 10},
        },
    ]
    clean, noisy = task_grid.performance_table(results, "gsm8k")
    assert clean["drop_abs_flexible"] is None
    assert noisy["drop_abs_strict"] == pytest.approx(0.25) and noisy["drop_rel_strict"] == pytest.approx(0.5)
    assert noisy["drop_rel_flexible"] == pytest.approx(0.25)
    assert noisy["drop_abs_flexible"] == pytest.approx(0.2)


def test_grid_over_classification_reports_accuracy_and_no_gsm8k_baseline(tmp_path: Path) -> None:
    results = [
        {
            "model": model,
            "task": task,
            "stage": "zero_shot",
            "metrics": {"accuracy": accuracy, "macro_f1": 0.2, "num_examples": 12},
        }
        for model, task, accuracy in (("a", "news", 0.5), ("a", "bbc", 0.25), ("b", "news", 0.75))
    ]
    assert task_grid.grid_baseline(results) is None
    settings = OmegaConf.create({"confidence": 0.95, "power": 0.8})
    csv_path, markdown, chart = task_grid.write_grid(results, tmp_path, None, settings)  # no per-item files
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "model",
        "dataset",
        "num_problems",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "interval",
    ]
    assert markdown.read_text().count("\n| ") == 4  # header and three rows
    assert [(r["model"], r["dataset"], float(r["accuracy"])) for r in rows] == [
        ("a", "bbc", 0.25),
        ("a", "news", 0.5),
        ("b", "news", 0.75),
    ]
    assert chart.name == "zero_shot_performance.png" and chart.stat().st_size > 1000
    with_baseline = task_grid.performance_table(results, "news")
    assert with_baseline[0]["dataset"] == "news" and with_baseline[1]["drop_abs_accuracy"] == pytest.approx(
        0.25
    )


def fake_evaluation(directory: Path, stage: str, model: str, task: str, correct: list[float]) -> dict:
    """An evaluation run dir as evaluate.py writes it: per-item scores of problems 0..n-1 and results.json."""
    directory.mkdir(parents=True)
    rows = [{"index": i, "where": f"test.jsonl:{i}", "pass@1_flexible": c} for i, c in enumerate(correct)]
    item_scores.assign_ids(rows)
    (directory / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    interval = {
        **estimates.wilson(int(sum(correct)), len(correct)).as_dict(),
        "item_field": "pass@1_flexible",
    }
    result = {
        "stage": stage,
        "model": model,
        "task": task,
        "run_dir": str(directory),
        "metrics": {"pass@1_flexible": sum(correct) / len(correct)},
        "intervals": {"pass@1_flexible": interval},
    }
    (directory / "results.json").write_text(json.dumps(result))
    return result


@pytest.mark.parametrize("robust_model", ["diff", "base"])
def test_robustness_difference_has_a_paired_interval_over_problems(tmp_path: Path, robust_model: str) -> None:
    n = 40
    noisy_of = {
        robust_model: [1.0] * n,
        ("base" if robust_model == "diff" else "diff"): [1.0] * 8 + [0.0] * (n - 8),
    }
    results = [
        fake_evaluation(tmp_path / m / "clean", "zero_shot", m, "gsm8k", [1.0] * n) for m in ("diff", "base")
    ]
    results += [
        fake_evaluation(tmp_path / m / "inf", "zero_shot", m, "gsm8k_inf", noisy_of[m])
        for m in ("diff", "base")
    ]
    settings = OmegaConf.create({"confidence": 0.95, "power": 0.8})
    [row] = noise_study.robustness(results, ["diff", "base"], "flexible", "gsm8k", settings)
    assert row["problems"] == n and row["verdict"] == f"{robust_model} more robust"
    expected = 0.8 if robust_model == "diff" else -0.8
    assert row["advantage"] == pytest.approx(expected)
    assert row["ci_low"] < expected < row["ci_high"] and (row["ci_low"] > 0 or row["ci_high"] < 0)
    advantage = (np.array(noisy_of["diff"]) - np.array(noisy_of["base"])).tolist()  # per problem
    expected_interval = stats.ttest_1samp(advantage, 0).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected_interval.low, expected_interval.high))


def test_noisy_runs_pair_with_clean_ones_only_on_the_same_problems(tmp_path: Path) -> None:
    clean = fake_evaluation(tmp_path / "clean", "zero_shot", "m", "gsm8k", [1.0] * 10)
    fewer = fake_evaluation(tmp_path / "inf", "zero_shot", "m", "gsm8k_inf", [0.0] * 8)  # another limit
    with pytest.raises(ValueError, match="item ids differ"):
        item_scores.aligned(
            predictions.read(Path(clean["run_dir"])), predictions.read(Path(fewer["run_dir"]))
        )


def test_grid_compares_models_and_drops_on_the_same_problems(tmp_path: Path) -> None:
    strong = [1.0] * 60 + [0.0] * 40
    results = [
        fake_evaluation(tmp_path / "a-clean", "zero_shot", "a", "gsm8k", strong),
        fake_evaluation(tmp_path / "a-inf", "zero_shot", "a", "gsm8k_inf", [0.0] * 100),
        fake_evaluation(tmp_path / "b-clean", "zero_shot", "b", "gsm8k", strong[:58] + [0.0] * 42),
        fake_evaluation(tmp_path / "b-inf", "zero_shot", "b", "gsm8k_inf", [0.0] * 100),
    ]
    settings = OmegaConf.create({"confidence": 0.95, "power": 0.8})
    written = task_grid.write_grid(results, tmp_path, "gsm8k", settings)
    assert {p.name for p in written} >= {"zero_shot_comparisons.csv", "zero_shot_comparisons.md"}
    with (tmp_path / "zero_shot_comparisons.csv").open() as handle:
        rows = {(r["a"], r["b"]): r for r in csv.DictReader(handle)}
    near = rows["a on gsm8k", "b on gsm8k"]  # 0.60 vs 0.58: two problems apart
    assert (near["a_only"], near["b_only"]) == ("2", "0") and near["verdict"].startswith("no detectable")
    assert rows["a on gsm8k", "a on gsm8k_inf"]["verdict"] == "a on gsm8k better"  # the noise costs 0.6
    assert float(rows["a on gsm8k", "a on gsm8k_inf"]["difference"]) == pytest.approx(0.6)
    assert rows["a on gsm8k_inf", "b on gsm8k_inf"]["verdict"].startswith("no detectable")
    table = (tmp_path / "zero_shot_performance.md").read_text()  # each score beside its Wilson interval
    assert "| a | gsm8k | - | 0.600 [0.502, 0.691] | wilson |" in table and "_low" not in table
