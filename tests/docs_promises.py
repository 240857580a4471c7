"""What each documented command promises, as checks of the files and output a run leaves in the workspace
(each `check(workspace, result)` raises AssertionError when the promise is broken)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.results import read_results
from tests.docs_workspace import Workspace


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def trained(pattern: str, **expected) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    """A train.py run under `pattern`: 2 steps (or `steps`), `final/` exported, the test stage on the last
    weights."""

    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        found = read_results(run_dir)
        assert found["global_step"] == expected.get("steps", 2) and not found["diverged"]
        assert (run_dir / "final" / "base_model.json").exists() and (
            run_dir / "metrics" / "metrics.csv"
        ).exists()
        assert found["tested"]["weights"] == "last" and {"test/loss", "test/accuracy"} & set(found["metrics"])
        for key, value in expected.items():
            if key != "steps":
                assert found[key] == value, (key, found[key])

    return check


def evaluated(
    pattern: str, stage: str, model: str, processes: int = 1
) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        found = read_results(run_dir)
        assert (found["stage"], found["model"]) == (stage, model)
        assert len(lines(run_dir / "predictions.jsonl")) == 2 and "pass@1_flexible" in found["metrics"]
        assert processes == 1 or f"scored by {processes} processes" in result.stdout + result.stderr

    return check


def swept(pattern: str, jobs: int, *files: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    """A -m sweep: `jobs` jobs that each ran, a summary row per job, and the sweep-level `files`."""

    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        sweep = workspace.newest(pattern)
        assert len(list(sweep.glob("*/results.json"))) == jobs
        for name in files:
            assert (sweep / name).stat().st_size > 0, name

    return check


def wrote(pattern: str, *files: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        for name in files:
            assert (run_dir / name).stat().st_size > 0, name

    return check


def classes_allocated(*classes: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        analysis = json.loads(workspace.newest("outputs/attention/*/*/*/attention_analysis.json").read_text())
        assert analysis["classes"] == list(classes) and analysis["num_problems"] == 2

    return check


def demo_prints_its_results(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    assert re.search(
        r"results: \S*outputs/gsm8k/smollm2_135m-lora/[^/]+/results.json", result.stdout + result.stderr
    )
    assert read_results(workspace.newest("outputs/gsm8k/smollm2_135m-lora/*"))["global_step"] == 2


def fast_dev_run(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    assert read_results(workspace.newest("outputs/gsm8k/tiny_llama-lora/*"))["global_step"] == 1


def ablation_report(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/cosmopedia/*")
    configs = csv_rows(sweep / "performance_metrics.csv")
    assert len(configs) == 6 and {row["seeds"] for row in configs} == {"2"}  # 6 configurations x 2 seeds
    assert all(
        float(row["val_loss_low"]) <= float(row["val_loss"]) <= float(row["val_loss_high"]) for row in configs
    )
    assert configs[0]["verdict_vs_baseline"] == "baseline" and all(
        row["verdict_vs_baseline"] for row in configs
    )
    assert "t interval" in (sweep / "results.md").read_text()
    assert all(
        (sweep / name).stat().st_size > 5000 for name in ("training_loss_curves.png", "final_performance.png")
    )


def grid_tables(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/eval/*")
    rows = csv_rows(sweep / "zero_shot_performance.csv")
    assert {row["model"] for row in rows} == {"tiny_diffllama", "tiny_llama"} and len(rows) == 8
    assert [r["dataset"] for r in rows[:4]] == ["gsm8k", "gsm8k_inf", "gsm8k_rcs", "gsm8k_sd"]
    assert rows[0]["drop_abs_flexible"] == ""  # the clean set is the baseline the noisy sets drop from
    for row in rows[1:4]:
        assert float(row["drop_abs_flexible"]) == pytest.approx(
            float(rows[0]["pass@1_flexible"]) - float(row["pass@1_flexible"])
        )
    assert (sweep / "zero_shot_performance.png").stat().st_size > 5000
    for row in rows:  # every score with its interval
        assert (
            float(row["pass@1_flexible_low"])
            <= float(row["pass@1_flexible"])
            <= float(row["pass@1_flexible_high"])
        )
        assert row["interval"] == "wilson"
    compared = csv_rows(sweep / "zero_shot_comparisons.csv")
    assert len(compared) == 4 + 2 * 3  # the two models on each set, each model's clean set vs its noisy ones
    assert all(row["verdict"] and row["p_holm"] and row["mde"] for row in compared)


def noise_study(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    study = workspace.newest("outputs/noise_study/diffllama_noise_quick/*")
    rows = csv_rows(study / "study_summary.csv")
    assert len(rows) == 2 * 4 * 2 and {(r["stage"], r["model"]) for r in rows} == {
        (stage, model) for stage in ("zero_shot", "sft") for model in ("tiny_diffllama", "tiny_llama")
    }
    for stage in ("zero_shot", "sft"):
        assert (
            len(csv_rows(study / f"{stage}_performance.csv")) == 8
            and (study / f"{stage}_performance.png").exists()
        )
    assert (study / "sft" / "tiny_llama" / "train" / "final" / "model.safetensors").exists()
    allocation = csv_rows(study / "attention_allocation.csv")
    assert len(allocation) == 2 * 2 * 3  # models x (base, fine-tuned) x noisy sets
    assert all(abs(sum(float(r[f"{c}_ratio"]) for c in ("KMI", "NI", "OC")) - 1) < 1e-6 for r in allocation)
    report = (study / "study_report.md").read_text()
    # one verdict per noise type
    assert report.count("| zero_shot | gsm8k_") == report.count("| sft | gsm8k_") == 3
    assert "95% paired t interval over problems" in report and "Holm-adjusted" in report
    assert (study / "zero_shot_comparisons.md").exists()


def attention_comparison(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/attention/*")
    assert (sweep / "attention_comparison.png").stat().st_size > 5000
    assert [
        json.loads((sweep / str(i) / "attention_analysis.json").read_text())["model"] for i in (0, 1)
    ] == ["tiny_diffllama", "tiny_llama"]


def saved_maps(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    from safetensors.torch import load_file

    run_dir = workspace.newest("outputs/attention/*/*/*")
    maps = load_file(run_dir / "attention_maps.safetensors")
    assert list(maps) == ["0/standard"] and maps["0/standard"].shape[:2] == (2, 4)  # [layers, heads, T, T]


def one_figure_per_prompt(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/attention/*/*/*")
    assert sorted(p.name for p in run_dir.glob("attention_text_*.png")) == [
        "attention_text_0.png",
        "attention_text_1.png",
    ]


def coupling(layer_suffix: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest("outputs/gradsim/hotpotqa/*/*")
        analysis = json.loads((run_dir / "coupling_analysis.json").read_text())
        assert analysis["pieces"] == 6 and all(name.endswith(layer_suffix) for name in analysis["layers"])
        assert (run_dir / "coupling_matrix.npy").exists() and (run_dir / "coupling_heatmap.png").exists()

    return check


def ripple(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/ripple/hotpotqa/*/*")
    assert json.loads((run_dir / "correlation_analysis.json").read_text())["edits"] == 2
    assert (run_dir / "report.md").exists() and (run_dir / "comprehensive_analysis.png").exists()


def memit_edit(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/memit/tiny_gpt2/*")
    (edit,) = lines(run_dir / "edits.jsonl")
    assert edit["target_new"] == "football" and (run_dir / "final" / "weight_deltas.safetensors").exists()


def ripple_comparison(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    rows = csv_rows(workspace.root / "outputs" / "ripple" / "comparison" / "coupling_comparison.csv")
    assert len(rows) == 2


def tensorboard_events(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/gsm8k/*")
    assert len([job for job in sweep.glob("*/tensorboard") if list(job.rglob("events.out.tfevents.*"))]) == 4


def optuna_best(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    import yaml

    sweep = workspace.newest("multirun/gsm8k/*")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (
        set(best["best_params"]) == {"optim.lr", "data.batch_size"}
        and len(list(sweep.glob("*/results.json"))) == 2
    )


def methods_table(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/classification/*")
    rows = csv_rows(sweep / "summary.csv")
    assert [next(o for o in row["overrides"].split() if o.startswith("method=")) for row in rows] == [
        f"method={m}" for m in ("full", "lora", "svd_lora", "prompt_tuning", "adapter", "projection_head")
    ]
    assert all(row["status"] == "ok" and 0 <= float(row["val/accuracy"]) <= 1 for row in rows)
    assert all((sweep / str(i) / "confusion_matrix" / "val_epoch0.png").exists() for i in range(6))


def noisy_sets(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    files = sorted((workspace.root / "data" / "noisy").glob("*.jsonl"))
    assert [f.name for f in files] == ["gsm8k_inf_test.jsonl", "gsm8k_rcs_test.jsonl", "gsm8k_sd_test.jsonl"]
    assert all(record["spans"] for record in lines(files[0]))


def socratic_json(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    dialogues = json.loads((workspace.root / "data" / "socratic.json").read_text())
    assert len(dialogues) == 3 and all(d["conversations"][0]["from"] == "user" for d in dialogues)


def lm_eval_prompts(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    rows = lines(workspace.newest("outputs/eval/gsm8k/*/*") / "predictions.jsonl")
    assert all(row["prompt"].count("Question:") == 6 and row["prompt"].endswith("\nAnswer:") for row in rows)


def judged(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    metrics = json.loads((workspace.newest("outputs/eval/classification/*/*") / "metrics.json").read_text())
    assert "judge_accuracy" in metrics and "judge_agreement" in metrics


def fsdp_tested(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    found = read_results(workspace.newest("outputs/gsm8k/tiny_llama-lora/*"))
    assert (
        found["tested"] == {"weights": "last", "global_step": found["global_step"]}
        and "test/loss" in found["metrics"]
    )
    assert (Path(found["final_dir"]) / "adapter_model.safetensors").exists()


def sbatch_script(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8"} <= set(result.stdout.splitlines())


def compared_runs(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    (row,) = csv_rows(workspace.newest("outputs/compare/*") / "comparison.csv")
    assert (row["a"], row["b"], row["n"]) == ("tiny_diffllama/gsm8k", "tiny_llama/gsm8k", "2")
    assert row["verdict"].startswith("no detectable difference (MDE ")  # two problems tell nothing apart
    assert "| tiny_diffllama/gsm8k | tiny_llama/gsm8k |" in result.stdout


def grouped_over_seeds(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    """Two configurations of three seeds each, with the t interval of each metric over its seeds."""
    from stats import seed_statistics

    sweep = workspace.newest("multirun/gsm8k/*")
    grouped = {row["configuration"]: row for row in csv_rows(sweep / "summary_by_config.csv")}
    assert set(grouped) == {"optim.lr=0.0001", "optim.lr=0.0003"}  # as Hydra records the overrides
    jobs = [read_results(job) for job in sorted(sweep.glob("[0-9]*"))]
    for lr, row in grouped.items():
        assert (row["seeds"], row["seed_values"]) == ("3", "0 1 2")
        losses = [job["metrics"]["val/loss"] for job in jobs if lr in job["overrides"]]
        assert len(set(losses)) == 3  # each seed its own data order, initialisation and dropout
        summary = seed_statistics.over_seeds(losses)
        assert float(row["val/loss"]) == pytest.approx(summary["mean"])
        assert (float(row["val/loss_low"]), float(row["val/loss_high"])) == pytest.approx(
            (summary["low"], summary["high"])
        )
    assert sorted(row["tied_with_best"] for row in grouped.values())[0] == "best"
    assert {row["tied_with_best"] for row in grouped.values()} <= {"best", "yes", "no"}
    assert "## Configurations over seeds (val/loss)" in (sweep / "summary.md").read_text()
