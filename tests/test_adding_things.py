"""docs/extending.md's worked example, run as written: a model of a family lmlab has no file for, a method and
a task added by its code blocks alone train, export, reload and evaluate."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from evaluation import evaluate
from lightning_modules import methods
from modeling import architecture
from runtime.results import logged_rows
from runtime.training import run
from tests.conftest import CONF_DIR, ROOT
from tests.helpers import load_saved

# a fenced block whose first line names its file: "# path"
BLOCK = re.compile(r"```(?:yaml|python)\n# (\S+?)\n(.*?)```", re.S)


def worked_example() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "extending.md").read_text()
    return BLOCK.findall(text[text.index("## Worked example") :])


def add_to_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Apply every block: YAML into a copy of conf/, new modules into a copy of their package's folder that
    the package searches too (undone after the test)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    for path, body in worked_example():
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
    blocks = worked_example()
    assert [path for path, _ in blocks] == [
        "conf/model/tiny_mistral.yaml",
        "lightning_modules/methods/bitfit.py",
        "conf/method/bitfit.yaml",
        "datamodules/reverse.py",
        "conf/task/reverse.yaml",
    ]
    conf = add_to_repository(tmp_path, monkeypatch)
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
