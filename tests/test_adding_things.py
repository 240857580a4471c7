"""docs/extending.md's worked example, run as written: a model of a family lmlab has no file for, a method and
a task added by its code blocks alone train, export, reload and evaluate."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import datamodules
from datamodules import IGNORE_INDEX
from evaluation import evaluate, scorers
from lightning_modules import methods
from modeling import architecture, models
from modeling.log_probs import answer_log_probs
from runtime.results import logged_rows
from runtime.training import run
from tests.conftest import CONF_DIR, ROOT
from tests.helpers import load_saved

# a fenced block whose first line names its file: "# path"
BLOCK = re.compile(r"```(?:yaml|python)\n# (\S+?)\n(.*?)```", re.S)


def blocks_of(section: str) -> list[tuple[str, str]]:
    """The (path, body) blocks of one `## <section>` of docs/extending.md."""
    text = (ROOT / "docs" / "extending.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return BLOCK.findall(text[start : end if end > 0 else None])


def add_to_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str) -> Path:
    """Apply every block of `section`: YAML into a copy of conf/, new modules into a copy of their package's
    folder that the package searches too (undone after the test)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    for path, body in blocks_of(section):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
        if path.endswith(".py"):
            package = importlib.import_module(str(Path(path).parent).replace("/", "."))
            monkeypatch.setattr(package, "__path__", [*package.__path__, str((tmp_path / path).parent)])
            monkeypatch.delitem(sys.modules, path.removesuffix(".py").replace("/", "."), raising=False)
    return conf


def compose_in(conf: Path, config_name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def test_worked_example_trains_exports_reloads_and_evaluates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = blocks_of("Worked example")
    assert [path for path, _ in blocks] == [
        "conf/model/tiny_mistral.yaml",
        "lightning_modules/methods/bitfit.py",
        "conf/method/bitfit.yaml",
        "datamodules/reverse.py",
        "conf/task/reverse.yaml",
    ]
    conf = add_to_repository(tmp_path, monkeypatch, "Worked example")
    data = tmp_path / "reverse.jsonl"
    sentences = [
        "the cat sat",
        "a dog ran far",
        "we like red apples",
        "it is cold",
        "birds fly south",
        "sun and rain",
    ]
    data.write_text(
        "".join(json.dumps({"text": s, "reversed": " ".join(s.split()[::-1])}) + "\n" for s in sentences)
    )
    common = [
        "model=tiny_mistral",
        "task=reverse",
        f"task.data_files={{train: {data}, test: {data}}}",
        "logger=csv",
        "print_config=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = compose_in(
        conf,
        "train",
        *common,
        "method=bitfit",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "data.val_size=2",
        "data.batch_size=2",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "train")
    results = run(cfg)

    # norms only: Mistral has no biases
    assert results["global_step"] == 2 and 0 < results["trainable_share"] < 0.05
    reported = [
        row["bitfit/trainable_tensors"]
        for row in logged_rows(tmp_path / "train")
        if "bitfit/trainable_tensors" in row
    ]
    assert reported == [5.0]  # the method's own metric, logged once: two norms per block and the final norm
    final = Path(results["final_dir"])
    assert json.loads((final / "method.json").read_text())["name"] == "bitfit"

    eval_cfg = compose_in(
        conf, "evaluate", *common, f"ckpt={tmp_path / 'train'}", "generation.max_new_tokens=4"
    )
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(tmp_path / "eval")
    restored, _ = load_saved(eval_cfg)
    norms = {n: p for n, p in restored.named_parameters() if "norm" in n}
    # trained norms
    assert len(norms) == 5 and any(not torch.equal(p, torch.ones_like(p)) for p in norms.values())
    assert architecture.structure(restored).mlp_output == "mlp.down_proj" and "bitfit" in methods.names()
    metrics = evaluate.run(eval_cfg)["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["gold"] for row in rows] == [" ".join(s.split()[::-1]) for s in sentences]
    assert metrics["pass@1_words"] == sum(row["generation"].strip() == row["gold"] for row in rows) / len(
        rows
    )


def test_a_scorer_added_by_its_module_scores_the_task_that_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [path for path, _ in blocks_of("Adding a scorer")] == [
        "evaluation/scorers/likelihood.py",
        "datamodules/gsm8k_likelihood.py",
        "conf/task/gsm8k_likelihood.yaml",
    ]
    conf = add_to_repository(tmp_path, monkeypatch, "Adding a scorer")
    cfg = compose_in(
        conf, "evaluate", "model=tiny_llama", "task=gsm8k_likelihood", "task.source=bundled", "limit=3"
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    results = evaluate.run(cfg)
    assert "likelihood" in scorers.names() and results["intervals"]["nll_per_token"]["n"] == 3

    L.seed_everything(cfg.seed)  # the tiny model's weights, as evaluate.py built them
    model, tokenizer = models.build(cfg.model)
    task = datamodules.build_task(cfg, tokenizer)
    expected = []
    for record in task.records("test")[:3]:
        batch = task.collate([task.tokenize_record(record)])
        tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        expected.append(-float(answer_log_probs(model.eval(), batch)[0]) / tokens)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["nll_per_token"] for row in rows] == pytest.approx(expected, rel=1e-5)
    assert results["metrics"]["nll_per_token"] == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_an_analysis_added_by_its_module_runs_on_a_base_model_and_a_ckpt_run(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [path for path, _ in blocks_of("Adding an analysis")] == [
        "analysis/next_token.py",
        "conf/next_token.yaml",
    ]
    conf = add_to_repository(tmp_path, monkeypatch, "Adding an analysis")
    analysis = importlib.import_module("analysis.next_token")
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=1", "test_after_fit=false"))
    for name, model_choice in (("base", ["model=tiny_llama"]), ("lora", [f"ckpt={lora['run_dir']}"])):
        cfg = compose_in(conf, "next_token", *model_choice, "task.source=bundled", "analysis.num_prompts=3")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        results = analysis.run(cfg)
        rows = [json.loads(line) for line in (tmp_path / name / "next_token.jsonl").read_text().splitlines()]
        assert results["model"] == "tiny_llama" and len(rows) == 3
        mean = sum(row["probability"] for row in rows) / 3
        assert (
            results["top_probability"]["value"] == pytest.approx(mean)
            and results["top_probability"]["n"] == 3
        )
        assert all(0 < row["probability"] <= 1 for row in rows)
