"""The documented evaluation commands of chat templates, pass@k, a user's own data and lm-eval's benchmarks
(docs/evaluation.md, README), each with the promise its page makes, and the files they read written small."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from runtime.results import read_results
from tests.docs_workspace import Workspace
from tests.helpers import lm_eval_tasks

Promise = Callable[[Workspace, subprocess.CompletedProcess], None]
# stand-ins for lm-eval's hub benchmarks under their names, over local files (no network): multiple choice
QUESTIONS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "ten"], "label": 1},
    {"question": "Ice is frozen", "choices": ["sand", "fire", "water"], "label": 2},
]


def write_inputs(root: Path) -> None:
    """data/qa.jsonl (question/answer columns) and lm_eval_tasks/ (arc_easy and hellaswag stand-ins)."""
    pairs = [{"question": f"What is {a} plus {a}?", "answer": f"It is {2 * a}."} for a in range(1, 7)]
    (root / "data" / "qa.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    lm_eval_tasks(root / "lm_eval_tasks", ["arc_easy", "hellaswag"], QUESTIONS)


def chat_prompts(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    rows = [
        json.loads(line) for line in (workspace.newest("outputs/eval/gsm8k/*/*") / "predictions.jsonl").open()
    ]
    assert all(
        row["prompt"].count("<|im_start|>user") == 6 for row in rows
    )  # five exemplar turns, the question
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)


def sampled(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/eval/gsm8k/*/*")
    found = read_results(run_dir)
    for key in ("pass@1_flexible", "pass@2_flexible", "pass@4_flexible", "pass@8_flexible", "maj@8_flexible"):
        assert key in found["metrics"] and found["intervals"][key]["n"] == 2
    assert found["generation"]["num_samples"] == 8 and (run_dir / "pass_at_k.png").stat().st_size > 0


def own_data(stage: str) -> Promise:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        pattern = "outputs/prompt_response/*/*" if stage == "train" else "outputs/eval/prompt_response/*/*"
        found = read_results(workspace.newest(pattern))
        assert stage == "train" or ("pass@1_answer" in found["metrics"] and found["stage"] == "sft")

    return check


def benchmarks(run_dir: str) -> Promise:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        found = read_results(workspace.newest(run_dir))
        for name in ("arc_easy", "hellaswag"):
            assert found["intervals"][f"{name}/acc,none"]["n"] == 2  # the scale-down limit=2: examples each

    return check


def side_effects(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    table = (workspace.newest("outputs/compare/*") / "comparison.md").read_text()
    assert all(
        f"{name}/{metric},none" in table
        for name in ("arc_easy", "hellaswag")
        for metric in ("acc", "acc_norm")
    )


LM_EVAL = "python evaluate.py task=lm_eval 'task.tasks=[arc_easy,hellaswag]'"
SCENARIOS = {
    "chat_template": [
        (
            "python evaluate.py task=gsm8k prompt.chat_template=true prompt.num_fewshot=5 "
            "prompt.fewshot_as_multiturn=true",
            chat_prompts,
        )
    ],
    "pass_at_k": [
        ("python evaluate.py task=gsm8k generation.do_sample=true generation.num_samples=8", sampled)
    ],
    "own_data": [
        (
            "python train.py task=prompt_response "
            "'task.data_files={train: data/qa.jsonl, test: data/qa.jsonl}' "
            "task.columns.prompt=question task.columns.response=answer",
            own_data("train"),
        ),
        (
            "python evaluate.py task=prompt_response 'task.data_files={test: data/qa.jsonl}' "
            "task.columns.prompt=question task.columns.response=answer ckpt=<run dir>",
            own_data("evaluate"),
        ),
    ],
    "side_effects": [
        ("python train.py task=gsm8k method=lora", lambda workspace, result: None),
        (f"{LM_EVAL} hydra.run.dir=outputs/side_effects/base", benchmarks("outputs/side_effects/base")),
        (
            f"{LM_EVAL} ckpt=<run dir> hydra.run.dir=outputs/side_effects/lora",
            benchmarks("outputs/side_effects/lora"),
        ),
        (
            "python -m analysis.compare outputs/side_effects/base outputs/side_effects/lora --metric all",
            side_effects,
        ),
    ],
}
