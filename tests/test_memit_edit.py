"""`python -m analysis.memit`: the documented command edits a tiny model, reports each target's probability
before and after with intervals, and saves the weight deltas so that `ckpt=<that run>` loads the edited model
(evaluate.py included); bad requests and edits of a fine-tuned run are refused by key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from analysis import memit
from evaluation import evaluate, vllm_backend
from modeling import models
from runtime import saved_run
from runtime.results import read_results
from runtime.training import run as train
from tests.conftest import compose_config, launch

REQUESTS = (
    'analysis.requests=[{prompt: "{} plays the sport of", subject: LeBron James, target: football},'
    ' {prompt: "The capital of {} is", subject: France, target: Rome}]'
)
SMALL = [
    "analysis.mom2_n_samples=8",
    "analysis.v_num_grad_steps=4",
    "analysis.stats.source.kind=bundled",
    "analysis.stats.text_field=question",
]


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `python -m analysis.memit` run on tiny_llama (the command line a user types)."""
    folder = tmp_path_factory.mktemp("memit")
    launch(
        "-m",
        "analysis.memit",
        "model=tiny_llama",
        REQUESTS,
        *SMALL,
        f"hydra.run.dir={folder / 'run'}",
        f"paths.cache_dir={folder / 'cache'}",
    )
    return folder / "run"


def test_an_edit_reports_each_target_before_and_after_with_intervals(edit_run: Path) -> None:
    rows = [json.loads(line) for line in (edit_run / "edits.jsonl").read_text().splitlines()]
    assert [(r["subject"], r["target_new"]) for r in rows] == [
        ("LeBron James", "football"),
        ("France", "Rome"),
    ]
    assert rows[0]["prompt"] == "LeBron James plays the sport of"
    for row in rows:
        assert row["probability_after"] == pytest.approx(math.exp(row["log_prob_after"]))
    assert all(row["log_prob_after"] > row["log_prob_before"] for row in rows)  # the edit raised each target
    results = read_results(edit_run)
    for measure in ("probability", "log_prob"):
        for when in ("before", "after"):
            entry = results[f"{measure}_{when}"]
            values = [row[f"{measure}_{when}"] for row in rows]
            assert entry["value"] == pytest.approx(sum(values) / 2) and entry["n"] == 2
            assert entry["low"] <= entry["value"] <= entry["high"]
        change = results[f"{measure}_change"]
        assert change["value"] == pytest.approx(
            results[f"{measure}_after"]["value"] - results[f"{measure}_before"]["value"]
        )
        assert change["test"] == "paired t" and "verdict" in change
    assert results["model"] == "tiny_llama" and results["layers"] == [0]


def test_ckpt_of_an_edit_loads_the_edited_model_and_evaluate_sees_it(edit_run: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        f"ckpt={edit_run}",
        "task.source=bundled",
        "limit=2",
        "generation.max_new_tokens=4",
        config_name="evaluate",
    )
    choice = saved_run.resolve(cfg)
    assert choice.layout == "edit" and cfg.model.name == "tiny_llama"  # the edited run's base, not SmolLM2
    L.seed_everything(cfg.seed)  # the tiny base's weights are built from the seed, as in the edit run
    edited, tokenizer = saved_run.load(choice)
    L.seed_everything(cfg.seed)
    base, _ = models.build(cfg.model)
    deltas = load_file(edit_run / "final" / "weight_deltas.safetensors")
    assert list(deltas) == ["model.layers.0.mlp.down_proj.weight"]  # the edited layer's MLP output only
    for name, weight in edited.named_parameters():
        expected = base.get_parameter(name) + deltas.get(name, 0)
        torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    rows = [json.loads(line) for line in (edit_run / "edits.jsonl").read_text().splitlines()]
    requests = [{k: row[k] for k in ("prompt", "subject", "target_new")} for row in rows]
    reloaded = memit.target_log_probs(edited.eval(), tokenizer, requests, " ")
    assert reloaded == pytest.approx([row["log_prob_after"] for row in rows], rel=1e-5)

    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    results = evaluate.run(cfg)
    assert (results["model"], results["stage"]) == ("tiny_llama", "edited")
    with pytest.raises(ValueError, match="MEMIT edit .*vLLM cannot serve it"):
        vllm_backend.weights(cfg, choice)


def test_bad_requests_and_edits_of_a_fine_tuned_run_are_refused(tiny_config, tmp_path: Path) -> None:
    def edit_config(*overrides: str):
        cfg = compose_config("model=tiny_llama", *SMALL, *overrides, config_name="memit")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "edit")
        return cfg

    with pytest.raises(ValueError, match=r"analysis.requests\[0\] lacks \['target'\]"):
        memit.run(edit_config('analysis.requests=[{prompt: "{} is", subject: Paris}]'))
    with pytest.raises(ValueError, match=r"analysis.requests\[0\]: subject 'Rome' is not in 'Paris is'"):
        memit.run(edit_config("analysis.requests=[{prompt: Paris is, subject: Rome, target: x}]"))
    lora = train(
        tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=1", "test_after_fit=false")
    )
    with pytest.raises(ValueError, match="MEMIT saves its edits as weight deltas on a base model"):
        memit.run(edit_config(REQUESTS, f"ckpt={lora['run_dir']}"))
