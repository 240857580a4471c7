"""What docs/rl.md promises of its commands (objective=grpo|dpo, the preference builder, the robustness
recipe), and the file its DPO command reads (data/pairs.jsonl)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from runtime.results import logged_rows, read_results
from tests.docs_promises import csv_rows
from tests.docs_workspace import Step, Workspace

Promise = Callable[[Workspace, subprocess.CompletedProcess], None]


def write_inputs(root: Path) -> None:
    """data/pairs.jsonl and data/pairs_test.jsonl: preference pairs whose responses sit in `better` / `worse`
    columns."""
    rows = [
        {"prompt": f"What is {a} plus {a}?", "better": f"It is {2 * a}.", "worse": f"It is {2 * a + 1}."}
        for a in range(1, 13)
    ]
    for name, part in (("pairs", rows[:8]), ("pairs_test", rows[8:])):
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))


def trained(pattern: str, objective: str, **config: object) -> Promise:
    """A train.py run of `objective` under `pattern`: two steps, exported, tested, with its objective's
    metrics (GRPO: the reward, Pass@1 with its Wilson interval; DPO: the implicit rewards), each `config` key
    as the run's config has it."""

    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        found = read_results(run_dir)
        assert (found["objective"], found["global_step"]) == (objective, 2)
        assert (run_dir / "final" / "base_model.json").exists()
        metrics = found["metrics"]
        if objective == "grpo":
            assert {"train/reward", "train/frac_reward_zero_std", "train/completion_length"} <= {
                key for row in logged_rows(run_dir) for key in row
            }
            assert metrics["test/pass@1_low"] <= metrics["test/pass@1"] <= metrics["test/pass@1_high"]
        else:
            assert {"train/rewards/margin", "test/rewards/accuracy", "test/loss"} <= set(metrics)
        saved = OmegaConf.load(run_dir / "config.yaml")
        for key, value in config.items():
            assert OmegaConf.select(saved, key) == value, (key, OmegaConf.select(saved, key))

    return check


def preference_set(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/preferences/gsm8k/*/*")
    found = read_results(run_dir)
    assert (run_dir / "preferences.jsonl").exists() and found["problems"] == 2
    for share in ("solve_rate", "problems_with_a_pair"):
        assert found[share]["method"] == "wilson" and found[share]["low"] <= found[share]["high"]


def robustness_models(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    jobs = [read_results(workspace.root / "outputs" / "robustness" / str(i)) for i in range(2)]
    assert [job["objective"] for job in jobs] == ["sft", "grpo"]


def robustness_grid(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    grid = workspace.root / "outputs" / "robustness" / "eval"
    jobs = {i: read_results(grid / str(i)) for i in range(8)}
    assert [(jobs[i]["task"], Path(jobs[i]["ckpt"]).name) for i in (2, 3)] == [
        ("gsm8k_inf", "0"),
        ("gsm8k_inf", "1"),
    ]
    assert len(csv_rows(grid / "sft_performance.csv")) == 8  # two models x four sets, each with its interval


def robustness_compared(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    (row,) = csv_rows(workspace.newest("outputs/compare/*") / "comparison.csv")
    assert row["n"] == "2" and row["verdict"].startswith("no detectable difference")


SCENARIOS: dict[str, list[Step]] = {
    "grpo_and_dpo": [
        Step("python train.py objective=grpo task=gsm8k method=lora", trained("outputs/gsm8k/*/*", "grpo")),
        Step(
            "python train.py objective=grpo task=gsm8k_inf method=lora objective.num_generations=8 "
            "data.batch_size=16 objective.loss_type=dr_grpo objective.beta=0.04",
            trained("outputs/gsm8k_inf/*/*", "grpo", **{"objective.loss_type": "dr_grpo"}),
        ),
        Step(
            "python train.py objective=grpo task=classification method=lora 'objective.reward={exact_match: "
            "1.0}' objective.max_completion_length=8",
            trained("outputs/classification/*/*", "grpo", **{"objective.reward.exact_match": 1.0}),
        ),
        Step(
            "python train.py objective=dpo task=preferences method=lora task.source=bundled",
            trained("outputs/preferences/tiny_llama-lora/*", "dpo"),
        ),
        Step(
            "python train.py objective=dpo task=preferences method=lora 'task.data_files={train: "
            "data/pairs.jsonl, test: data/pairs_test.jsonl}' task.columns.chosen=better "
            "task.columns.rejected=worse",
            trained("outputs/preferences/tiny_llama-lora/*", "dpo", **{"task.columns.chosen": "better"}),
        ),
        Step(
            "python -m evaluation.preferences model=smollm2_135m task=gsm8k generation.num_samples=8",
            preference_set,
        ),
    ],
    "sft_against_grpo_on_noise": [
        Step(
            "python train.py -m objective=sft,grpo task=gsm8k method=lora hydra.sweep.dir=outputs/robustness",
            robustness_models,
        ),
        Step(
            "python evaluate.py -m task=gsm8k,gsm8k_inf,gsm8k_rcs,gsm8k_sd "
            "ckpt=outputs/robustness/0,outputs/robustness/1 hydra.sweep.dir=outputs/robustness/eval",
            robustness_grid,
        ),
        Step(
            "python -m analysis.compare outputs/robustness/eval/3 outputs/robustness/eval/2",
            robustness_compared,
        ),
    ],
}
