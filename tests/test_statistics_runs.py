"""Uncertainty end to end on tiny models and bundled data: evaluate.py's intervals and per-item files,
`analysis.compare` on real and on constructed runs, and a seeded training sweep grouped over seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from analysis import compare
from evaluation import evaluate as evaluation_run
from evaluation import predictions as prediction_files
from stats import estimates
from tests.conftest import compose_config

EVAL_TINY = ["task.source=bundled", "print_config=false", "generation.max_new_tokens=8", "logger=csv"]


def evaluate(run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config(*EVAL_TINY, *overrides, config_name="evaluate")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return evaluation_run.run(cfg)


def predictions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / prediction_files.ITEMS_FILE).read_text().splitlines()]


@pytest.mark.parametrize(
    ("task", "wilson", "bootstrapped"),
    [
        ("gsm8k", ["pass@1_strict", "pass@1_flexible"], []),
        ("classification", ["accuracy"], ["macro_f1"]),
        ("socratic_math", ["answer_correct"], ["bleu", "rouge_l", "corpus_bleu", "corpus_rouge_l"]),
    ],
)
def test_every_metric_has_its_interval_and_per_item_scores(
    tmp_path: Path, task: str, wilson: list[str], bootstrapped: list[str]
) -> None:
    results = evaluate(tmp_path, "model=tiny_llama", f"task={task}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    intervals = metrics.pop("intervals")
    assert intervals == results["intervals"] and set(wilson + bootstrapped) <= set(intervals)
    rows = predictions(tmp_path)
    assert len({row["item_id"] for row in rows}) == len(rows)
    for key, interval in intervals.items():
        assert interval["low"] <= metrics[key] == interval["value"] <= interval["high"]
        assert interval["confidence"] == 0.95 and interval["n"] > 0
        scored = [row for row in rows if row.get(interval["item_field"]) is not None]
        # 0/1 scores get Wilson; so does a graded score that came out all 0 or 1 (bootstrap: [0, 0])
        zero_one = bool(interval["item_field"]) and {row[interval["item_field"]] for row in scored} <= {0, 1}
        assert zero_one or key not in wilson
        bootstrap = "percentile bootstrap over items (2000 resamples)"
        assert interval["method"] == ("wilson" if zero_one else bootstrap)
        if interval["item_field"]:  # computable later from the per-item file alone
            again = estimates.mean_estimate(
                [row[interval["item_field"]] for row in scored], [row["cluster"] for row in scored]
            )
            assert (again.low, again.high, again.n) == (interval["low"], interval["high"], interval["n"])


def test_dialogue_turns_are_clustered_by_dialogue(tmp_path: Path) -> None:
    evaluate(tmp_path, "model=tiny_llama", "task=socratic_math", "task.eval_turns=all")
    rows = predictions(tmp_path)
    dialogues = {row["cluster"] for row in rows}
    assert len(dialogues) < len(rows)  # several teacher turns per dialogue
    bleu = json.loads((tmp_path / "metrics.json").read_text())["intervals"]["bleu"]
    assert (bleu["n"], bleu["clusters"]) == (len(rows), len(dialogues))
    assert bleu["method"] == "percentile bootstrap over clusters (2000 resamples)"


def test_compare_two_evaluations_writes_a_table_with_a_verdict(tmp_path: Path) -> None:
    for model in ("tiny_llama", "tiny_diffllama"):
        evaluate(tmp_path / model, f"model={model}", "task=gsm8k")
    compare.main(
        [str(tmp_path / "tiny_llama"), str(tmp_path / "tiny_diffllama"), "--out", str(tmp_path / "c")]
    )
    (row,) = csv.DictReader((tmp_path / "c" / "comparison.csv").open())
    a, b = (prediction_files.read(tmp_path / m).by_id() for m in ("tiny_llama", "tiny_diffllama"))
    assert (row["a"], row["b"], row["metric"]) == (
        "tiny_llama/gsm8k",
        "tiny_diffllama/gsm8k",
        "pass@1_flexible",
    )
    assert int(row["n"]) == len(a) == 8 and int(row["a_only"]) == sum(a[i] > b[i] for i in a)
    assert float(row["difference"]) == pytest.approx((sum(a.values()) - sum(b.values())) / 8)
    expected = estimates.paired(list(a.values()), [b[i] for i in a])
    assert row["verdict"] == f"no detectable difference (MDE {expected.mde:.3f})"
    assert "Holm-adjusted" in (tmp_path / "c" / "comparison.md").read_text()


def fake_run(run_dir: Path, correct: list[int], ids: list[str]) -> Path:
    """An evaluation run dir as evaluate.py writes it, with the given 0/1 scores."""
    run_dir.mkdir(parents=True)
    rows = [
        {"index": i, "item_id": item, "cluster": item, "pass@1_flexible": float(c)}
        for i, (item, c) in enumerate(zip(ids, correct, strict=True))
    ]
    (run_dir / prediction_files.ITEMS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    interval = {**estimates.wilson(sum(correct), len(correct)).as_dict(), "item_field": "pass@1_flexible"}
    results = {
        "model": run_dir.name,
        "task": "gsm8k",
        "optimized_metric": "pass@1_flexible",
        "metrics": {"pass@1_flexible": sum(correct) / len(correct)},
        "intervals": {"pass@1_flexible": interval},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_compare_names_the_better_run_and_refuses_runs_on_other_items(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ids = [f"test.jsonl:{i}" for i in range(300)]
    strong = fake_run(tmp_path / "strong", [1] * 150 + [0] * 150, ids)
    weak = fake_run(tmp_path / "weak", [1] * 100 + [0] * 200, ids)  # right only where strong is too
    same = fake_run(tmp_path / "same", [1] * 100 + [0] * 200, ids)
    compare.main([str(weak), str(strong), str(same), "--out", str(tmp_path / "c")])
    rows = {(r["a"], r["b"]): r for r in csv.DictReader((tmp_path / "c" / "comparison.csv").open())}
    assert rows["weak/gsm8k", "strong/gsm8k"]["verdict"] == "strong/gsm8k better"
    assert (rows["weak/gsm8k", "strong/gsm8k"]["a_only"], rows["weak/gsm8k", "strong/gsm8k"]["b_only"]) == (
        "0",
        "50",
    )
    assert rows["strong/gsm8k", "same/gsm8k"]["verdict"] == "strong/gsm8k better"
    assert rows["weak/gsm8k", "same/gsm8k"]["verdict"].startswith("no detectable difference (MDE ")
    assert "strong/gsm8k better" in capsys.readouterr().out
    other = fake_run(tmp_path / "other", [1] * 150 + [0] * 150, [f"dev.jsonl:{i}" for i in range(300)])
    with pytest.raises(SystemExit, match="item ids differ"):
        compare.main([str(strong), str(other), "--out", str(tmp_path / "d")])


def test_a_malformed_per_item_file_is_named_with_its_line(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", [1, 0, 1], ["a:1", "a:2", "a:3"])
    lines = (run / prediction_files.ITEMS_FILE).read_text().splitlines()
    (run / prediction_files.ITEMS_FILE).write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not a JSON line"):
        prediction_files.read(run)
    with pytest.raises(
        ValueError, match=r"metric 'bleu' has no per-item scores; those that do: \['pass@1_flexible'\]"
    ):
        prediction_files.read(run, "bleu")
