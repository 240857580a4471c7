"""Attention analysis: token classes from spans, allocation ratios, the files it writes (the maps themselves:
test_attention_maps.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict

import datamodules
from analysis.allocation import CLASSES, allocation, token_classes
from analysis.attention import analyse
from analysis.attention_maps import AttentionCapture
from datamodules.gsm8k import GSM8KTask
from modeling import models
from modeling.architecture import attention_modules
from tests.conftest import ROOT, compose_config


def test_token_class_rule_on_hand_made_offsets() -> None:
    text = "ab 16 xy"
    spans = [(0, 1, "NI"), (1, 2, "KMI"), (2, 3, "OC"), (3, 5, "KMI"), (5, 8, "OC")]
    offsets = [(0, 2), (2, 5), (5, 6), (6, 8), (0, 1)]
    # tie NI/KMI -> KMI; " 16" ignores the space -> KMI; " " only whitespace -> its own class OC
    assert token_classes(offsets, spans, text) == ["KMI", "KMI", "OC", "OC", "NI"]


def test_token_classes_follow_the_injected_spans_through_the_tokenizer() -> None:
    tokenizer = models.byte_level_tokenizer()
    module = GSM8KTask(
        tokenizer=tokenizer,
        source={"kind": "bundled", "bundled": "gsm8k"},
        splits={"train": "train", "test": "test"},
        prompt_template="Q: {question}\nA:",
        noise={"type": "inf", "seed": 0, "sentences": 1},
    )
    record = module.records("test")[0]
    prompt, spans = module.attention_input(record)
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    classes = token_classes(encoded["offset_mapping"], spans, prompt)
    noise = "".join(
        prompt[s:e] for (s, e), c in zip(encoded["offset_mapping"], classes, strict=True) if c == "NI"
    )
    assert noise == "".join(module.problem(record).distractors)
    assert classes[:3] == ["OC", "OC", "OC"]  # "Q: " template text
    assert all(c in CLASSES for c in classes)


def test_ratios_sum_to_one_and_scores_normalise_by_class_size() -> None:
    rows = torch.tensor([[[0.1, 0.5, 0.2, 0.2]], [[0.4, 0.1, 0.1, 0.4]]])  # [H=2, Q=1, K=4]
    classes = ["OC", "KMI", "NI", "OC"]
    ratios, scores = allocation(rows, classes, keep_sink=False)
    assert ratios.sum(-1) == pytest.approx([1.0, 1.0])
    assert ratios[0] == pytest.approx([0.5 / 0.9, 0.2 / 0.9, 0.2 / 0.9])
    assert scores[1] == pytest.approx([(0.1 / 0.6) * 3, (0.1 / 0.6) * 3, (0.4 / 0.6) * 3])
    kept, _ = allocation(rows, classes, keep_sink=True)
    assert kept[0] == pytest.approx([0.5, 0.2, 0.3])


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_diffllama"])
@pytest.mark.parametrize("keep_sink", [False, True])
def test_forced_uniform_attention_gives_the_class_shares(name: str, keep_sink: bool) -> None:
    L.seed_everything(0)
    cfg = compose_config(f"model={name}", "task=gsm8k_rcs", "task.source=bundled")
    model, tokenizer = models.build(cfg.model)
    model.set_attn_implementation("eager")
    for module in attention_modules(model):
        torch.nn.init.zeros_(module.q_proj.weight)  # every score 0 -> uniform over the causal window

    task = datamodules.build_task(cfg, tokenizer)
    prompt, spans = task.attention_input(task.records("test")[0])
    encoded = tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
    classes = token_classes(encoded["offset_mapping"][0].tolist(), spans, prompt)
    length = len(classes)
    capture = AttentionCapture(model, ["diff"])
    layers = capture.run(model, encoded["input_ids"], [length - 1], length)
    capture.remove()
    counted = classes if keep_sink else classes[1:]
    expected = [counted.count(c) / len(counted) for c in CLASSES]
    for layer in layers:
        (rows,) = layer.values()
        heads = 2 if name == "tiny_diffllama" else 4  # the differential map has H/2 heads
        assert rows.shape == (heads, 1, length)
        ratios, scores = allocation(rows, classes, keep_sink)
        assert ratios == pytest.approx(np.array([expected] * heads), abs=1e-5)
        assert scores == pytest.approx(np.ones((heads, 3)), abs=1e-4)


def test_analysis_writes_json_and_non_empty_figures(tmp_path: Path) -> None:
    cfg = compose_config(
        "model=tiny_diffllama",
        "task=gsm8k_inf",
        "task.source=bundled",
        "analysis.num_problems=3",
        "analysis.maps=[diff,a1,a2]",
        "analysis.generated_tokens=2",
        config_name="attention",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    result = analyse(cfg)
    assert set(result["maps"]) == {"diff", "a1", "a2"} and result["num_problems"] == 3
    saved = json.loads((tmp_path / "attention_analysis.json").read_text())
    diff = saved["maps"]["diff"]["ratio"]
    assert sum(diff[c]["mean"] for c in CLASSES) == pytest.approx(1.0)
    per_head = [
        sum(diff[c]["per_head"][layer][head] for c in CLASSES) for layer in range(2) for head in range(2)
    ]
    assert per_head == pytest.approx([1.0] * 4)
    assert len(diff["KMI"]["per_layer"]) == 2
    scores, versus = saved["maps"]["diff"]["score"], saved["maps"]["diff"]["kmi_vs_ni"]
    assert (versus["kmi_score"], versus["ni_score"]) == (scores["KMI"]["mean"], scores["NI"]["mean"])
    assert versus["kmi_to_ni"] == pytest.approx(versus["kmi_score"] / versus["ni_score"])
    for figure in ("attention_heatmap.png", "allocation_by_layer.png"):
        assert (tmp_path / figure).stat().st_size > 5000


def test_a_task_that_cannot_be_analysed_is_named(tmp_path: Path) -> None:
    cfg = compose_config(
        "model=tiny_llama",
        "task=cosmopedia",
        "task.source=bundled",
        "task.text_fields=[question,answer]",
        config_name="attention",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(
        ValueError, match="task 'cosmopedia' cannot be analysed: .*PretrainTask.*analysis.text="
    ):
        analyse(cfg)


def test_the_docs_notebook_example_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/attention.md's notebook snippet, with the tiny Llama in place of SmolLM2 (same architecture
    class)."""
    readme = (ROOT / "docs" / "attention.md").read_text()
    snippet = readme.split("**In a notebook.**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(snippet.replace("smollm2_135m", "tiny_llama"), namespace)  # noqa: S102
    maps = namespace["maps"]
    assert maps.layers == [0, 1] and maps.heads == [0, 1]
    assert maps.maps["standard"].shape == (2, 2, len(maps.tokens), len(maps.tokens))
    assert "".join(maps.tokens) == "Tom has 3 apples and eats 1."
