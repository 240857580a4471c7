"""`task=lm_eval`: lm-evaluation-harness's benchmarks on the model lmlab loads, offline from a local task
YAML; the same accuracy as lm-eval run directly, per-item rows that analysis.compare pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from analysis import compare
from evaluation import evaluate
from runtime import saved_run
from stats import comparisons
from tests.conftest import compose_config
from tests.helpers import lm_eval_tasks

QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Two plus two is", ["three", "four", "ten"], 1),
    ("Ice is made of frozen", ["sand", "fire", "water"], 2),
    ("A cat says", ["meow", "moo", "quack"], 0),
    ("The sun rises in the", ["west", "east", "cellar"], 1),
    ("Paris is a city in", ["Peru", "Chad", "France"], 2),
]


@pytest.fixture
def include_path(tmp_path: Path) -> Path:
    """A folder with one multiple-choice lm-eval task over a local JSONL file."""
    records = [{"question": q, "choices": c, "label": a} for q, c, a in QUESTIONS]
    return lm_eval_tasks(tmp_path / "tasks", ["lmlab_mc"], records)


def evaluated(run_dir: Path, saved: Path, include_path: Path, *overrides: str) -> dict:
    cfg = compose_config(
        f"ckpt={saved}",
        "task=lm_eval",
        "task.tasks=[lmlab_mc]",
        f"task.include_path={include_path}",
        "print_config=false",
        *overrides,
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return evaluate.run(cfg)


@pytest.mark.parametrize("template", [False, True])
def test_lm_eval_benchmark_through_lmlab_equals_lm_eval_direct(
    saved_llama: Path, include_path: Path, tmp_path, template: bool
) -> None:
    """Plain prompts, and in the chat template (lm-eval's --apply_chat_template --system_instruction)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    chat = [f"prompt.chat_template={str(template).lower()}", *(["prompt.system=Answer."] if template else [])]
    results = evaluated(tmp_path / "zero", saved_llama, include_path, *chat)
    # the same model object lmlab scores with (a random tiny model's choices are near-ties, so the same
    # numerics matter: its load, attention implementation and lmlab's batch, data.batch_size)
    model, tokenizer = saved_run.load(
        saved_run.resolve(compose_config(f"ckpt={saved_llama}", config_name="evaluate"))
    )
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=4),
        tasks=["lmlab_mc"],
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=template,
        system_instruction="Answer." if template else None,
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert results["metrics"][f"lmlab_mc/{metric}"] == direct["results"]["lmlab_mc"][metric]
        interval = results["intervals"][f"lmlab_mc/{metric}"]
        assert interval["n"] == len(QUESTIONS) and interval["item_field"] == f"lmlab_mc/{metric}"
    rows = [json.loads(line) for line in (tmp_path / "zero" / "predictions.jsonl").read_text().splitlines()]
    by_doc = {s["doc_id"]: s["acc"] for s in direct["samples"]["lmlab_mc"]}
    assert [row["item_id"] for row in rows] == [f"lmlab_mc[{i}]" for i in range(len(QUESTIONS))]
    assert [row["lmlab_mc/acc,none"] for row in rows] == [float(by_doc[i]) for i in range(len(QUESTIONS))]
    if template:
        return
    evaluated(tmp_path / "two_shot", saved_llama, include_path, *chat, "task.num_fewshot=2")
    written = compare.compare(
        [tmp_path / "zero", tmp_path / "two_shot"], tmp_path / "cmp", comparisons.default_settings(), ["all"]
    )
    table = written[0].read_text()
    assert "lmlab_mc/acc,none" in table and "lmlab_mc/acc_norm,none" in table


def test_lm_eval_task_refuses_training_and_an_empty_task_list() -> None:
    from datamodules.lm_eval_benchmarks import LmEvalTask

    with pytest.raises(ValueError, match="task.tasks: name the lm-eval tasks"):
        LmEvalTask(tasks=[], tokenizer=None, source={}, splits={})
    with pytest.raises(ValueError, match="task=lm_eval evaluates only"):
        LmEvalTask(tasks=["arc_easy"], tokenizer=None, source={}, splits={}).records("train")
