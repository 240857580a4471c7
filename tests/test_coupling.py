"""Knowledge coupling: HotpotQA pieces, GradSim, MEMIT on tiny Llama and GPT-2, ripple statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

import datamodules
from analysis import gradsim, memit, memit_inputs, memit_z, ripple, ripple_compare
from datamodules.hotpotqa import knowledge_pieces
from datamodules.sources import load_split
from modeling import architecture, models
from tests.conftest import built_model, compose_config, launch

BUNDLED = {"kind": "bundled", "bundled": "hotpotqa"}


def tiny(name: str):
    cfg, model, tokenizer = built_model(f"model={name}", "task.source=bundled", config_name="ripple")
    return cfg, model, tokenizer, datamodules.build_task(cfg, tokenizer)


def test_bridge_questions_become_two_hop_cloze_pieces() -> None:
    records = load_split(BUNDLED, "validation")
    pieces = [p for r in records for p in knowledge_pieces(r)]
    assert len(pieces) == 2 * len(records)
    first, second = pieces[0], pieces[1]
    assert first == {
        "id": "lmlab-0/1",
        "chain": "lmlab-0",
        "hop": 1,
        "prompt": "Marlow Ketterby is a novelist who was born in",
        "answer": "Vellmoor",
        "subject": "Marlow Ketterby",
    }
    assert (second["prompt"], second["answer"], second["subject"]) == (
        "Vellmoor is a harbour town located in the province of",
        "Ostrand",
        "Vellmoor",
    )


def test_hub_format_gives_the_same_pieces() -> None:
    record = load_split(BUNDLED, "validation")[0]
    hub = {
        **record,
        "context": {
            "title": [t for t, _ in record["context"]],
            "sentences": [s for _, s in record["context"]],
        },
        "supporting_facts": {
            "title": [t for t, _ in record["supporting_facts"]],
            "sent_id": [i for _, i in record["supporting_facts"]],
        },
    }
    assert knowledge_pieces(hub) == knowledge_pieces(record)


def test_comparison_questions_give_no_pieces() -> None:
    record = {**load_split(BUNDLED, "validation")[0], "answer": "yes"}
    assert knowledge_pieces(record) == []


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_gradsim_is_symmetric_unit_diagonal_and_equals_a_per_example_loop(name: str) -> None:
    cfg, model, _, task = tiny(name)
    pieces, matrix = gradsim.compute(model, task, cfg.analysis.gradsim, cfg.seed)
    assert matrix.shape == (12, 12)
    assert np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1.0)

    ((_, module, _),) = architecture.mlp_output_modules(model, list(cfg.analysis.gradsim.layers))
    loop = []
    for piece in pieces:
        model.zero_grad()
        batch = task.collate([task.answer_example(piece["prompt"], piece["answer"])])
        gradsim.answer_log_probs(model, batch).sum().backward()
        loop.append(module.weight.grad.flatten().clone())
    expected = gradsim.cosine_matrix(torch.stack(loop))
    assert np.allclose(matrix, expected, atol=1e-6)


def test_projected_gradsim_keeps_the_coupling_structure() -> None:
    cfg, model, _, task = tiny("tiny_llama")
    _, exact = gradsim.compute(model, task, cfg.analysis.gradsim, cfg.seed)
    settings = cfg.analysis.gradsim.copy()
    with open_dict(settings):
        settings.projection_dim = 4096
    _, projected = gradsim.compute(model, task, settings, cfg.seed)
    upper = np.triu_indices(12, k=1)
    assert np.allclose(np.diag(projected), 1.0)
    # half the dimensions, random Kronecker map
    assert np.corrcoef(exact[upper], projected[upper])[0, 1] > 0.8


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_memit_makes_the_new_answer_the_top_prediction_and_restores_weights(
    name: str, tmp_path: Path
) -> None:
    cfg, model, tokenizer, _ = tiny(name)
    hparams = cfg.analysis.memit.copy()
    with open_dict(hparams):
        hparams.target_prefix, hparams.clamp_norm_factor, hparams.mom2_n_samples = "", 100.0, 40
        hparams.v_weight_decay = 1e-3  # ||delta|| / ||h||^2 is large where ||h|| is a tiny model's
    texts = [r["question"] for r in load_split({"kind": "bundled", "bundled": "gsm8k"}, "train")]
    moments, _ = memit_inputs.second_moments(model, tokenizer, hparams, texts, tmp_path)
    templates = memit_inputs.context_templates(model, tokenizer, hparams, tmp_path)
    request = {"prompt": "The capital of Zorbia is", "subject": None, "target_new": "Q"}
    prompt = tokenizer(request["prompt"], return_tensors="pt")["input_ids"]
    new_token = tokenizer("Q", add_special_tokens=False)["input_ids"][0]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        assert model(prompt).logits[0, -1].argmax().item() != new_token
    with memit.edited(model, tokenizer, [request], hparams, moments, templates) as updates:
        assert set(updates) == set(hparams.layers)
        with torch.no_grad():
            assert model(prompt).logits[0, -1].argmax().item() == new_token
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_last_edited_layer_must_be_followed_by_a_block() -> None:
    cfg, model, tokenizer, _ = tiny("tiny_llama")
    hparams = OmegaConf.merge(cfg.analysis.memit, {"layers": [1]})
    with pytest.raises(ValueError, match="must be followed by another block"):
        memit_z.target_vector(
            model, tokenizer, {"prompt": "a b c", "subject": None, "target_new": "x"}, hparams, [["{}"]]
        )


def test_ripple_pairs_and_correlations_on_a_hand_built_case() -> None:
    matrix = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    experiments = [
        {"index": 0, "delta_log_prob": [-3.0, -2.0, 0.5]},
        {"index": 2, "delta_log_prob": [0.2, -1.0, 5.0]},
    ]
    pairs = ripple.ripple_pairs(experiments, matrix, ["a", "a", "b"])
    assert pairs["gradsim"].tolist() == [0.9, 0.1, 0.1, 0.5]
    assert pairs["ripple"].tolist() == [2.0, 0.5, 0.2, 1.0]
    assert pairs["within"].tolist() == [True, False, False, False]
    settings = OmegaConf.create({"resamples": 200, "confidence": 0.95, "seed": 0})
    monotone = {
        "gradsim": np.linspace(0, 1, 30),
        "ripple": np.linspace(0, 1, 30) ** 2,
        "within": np.zeros(30, dtype=bool),
    }
    result = ripple.analyse_pairs(monotone, settings)
    assert result["all"]["spearman"]["r"] == pytest.approx(1.0)
    assert result["all"]["spearman"]["ci"][0] > 0.9 and result["hypothesis_held"] is True
    assert result["within_chain"]["spearman"] is None  # no within-chain pairs
    reversed_pairs = {**monotone, "ripple": monotone["ripple"][::-1]}
    assert ripple.analyse_pairs(reversed_pairs, settings)["hypothesis_held"] is False


def test_ripple_study_writes_every_output(tmp_path: Path) -> None:
    cfg = compose_config(
        "model=tiny_gpt2",
        "task.source=bundled",
        "analysis.memit.stats.source.kind=bundled",
        "analysis.memit.stats.text_field=question",
        "analysis.memit.mom2_n_samples=30",
        "analysis.num_edits=3",
        "statistics.resamples=50",
        config_name="ripple",
    )
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
    analysis = ripple.run(cfg)
    run_dir = tmp_path / "run"
    experiments = json.loads((run_dir / "ripple_experiments.json").read_text())
    assert len(experiments) == 3 and all(len(e["delta_log_prob"]) == 12 for e in experiments)
    assert analysis["correlation"]["all"]["pairs"] == 3 * 11
    assert (run_dir / "comprehensive_analysis.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()  # the verdict and the table are the analysis' own values
    assert (
        f"**{'held' if analysis['correlation']['hypothesis_held'] else 'not supported'}** for tiny_gpt2"
        in report
    )
    spearman = analysis["correlation"]["all"]["spearman"]
    assert "| all | 33 |" in report and f"{spearman['r']:.3f} ({spearman['p']:.3g})" in report
    assert np.load(run_dir / "coupling_matrix.npy").shape == (12, 12)
    statistics = json.loads((run_dir / "memit_statistics.json").read_text())
    assert statistics["corpus"] == "bundled:gsm8k/train:question" and statistics["texts"] == 30
    assert statistics["context_templates"][0] == ["{}"] and len(statistics["context_templates"][1]) == 5


def test_local_hotpotqa_file_is_read_for_the_test_stage(tmp_path: Path) -> None:
    records = load_split(BUNDLED, "validation")
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "_where"} for r in records]))
    cfg = compose_config("model=tiny_llama", f"task.data_files={{test: {path}}}", config_name="ripple")
    task = datamodules.build_task(cfg, models.byte_level_tokenizer())
    pieces = task.records("test")
    assert len(pieces) == 12 and pieces[0]["_where"] == f"{path}[0]"


def fake_ripple_run(run_dir: Path, model: str, coupled: bool, seed: int) -> None:
    """The files of a finished ripple run with 8 pieces in 4 chains, ripple = GradSim (coupled) or
    reversed."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(8, 5))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    matrix = vectors @ vectors.T
    chains = [f"c{i // 2}" for i in range(8)]
    sign = 1.0 if coupled else -1.0
    experiments = [
        {
            "index": i,
            "success": i % 2 == 0,
            "delta_log_prob": [1.0 + sign * float(matrix[i, j]) for j in range(8)],
        }
        for i in range(8)
    ]  # every delta > 0, so the ripple strength |delta| follows +-GradSim
    pairs = ripple.ripple_pairs(experiments, matrix, chains)
    settings = OmegaConf.create({"resamples": 200, "confidence": 0.95, "seed": 0})
    analysis = {
        "model": model,
        "edits": 8,
        "edit_success_rate": 0.5,
        "correlation": ripple.analyse_pairs(pairs, settings),
    }
    run_dir.mkdir(parents=True)
    np.save(run_dir / "coupling_matrix.npy", matrix)
    (run_dir / "knowledge_pieces.json").write_text(
        json.dumps([{"id": str(i), "chain": c} for i, c in enumerate(chains)])
    )
    (run_dir / "ripple_experiments.json").write_text(json.dumps(experiments))
    (run_dir / "correlation_analysis.json").write_text(json.dumps(analysis))


def test_compare_joins_runs_into_one_table_and_a_verdict(tmp_path: Path) -> None:
    fake_ripple_run(tmp_path / "a", "gpt2", coupled=True, seed=1)
    fake_ripple_run(tmp_path / "b", "smollm2_135m", coupled=False, seed=2)
    launch(
        "-m",
        "analysis.ripple_compare",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "cmp"),
    )
    rows = list(csv.DictReader((tmp_path / "cmp" / "coupling_comparison.csv").open()))
    assert [(r["model"], r["hypothesis_held"]) for r in rows] == [("gpt2", "True"), ("smollm2_135m", "False")]
    assert float(rows[0]["spearman_r"]) > 0.9 and float(rows[1]["spearman_r"]) < 0
    matrix = np.load(tmp_path / "a" / "coupling_matrix.npy")
    assert float(rows[0]["gradsim_mean"]) == pytest.approx(matrix[np.triu_indices(8, k=1)].mean())
    assert "inconsistent: held for 1 of 2 models" in (tmp_path / "cmp" / "coupling_comparison.md").read_text()
    assert (tmp_path / "cmp" / "coupling_comparison.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="not a finished"):
        ripple_compare.compare([tmp_path / "cmp"], tmp_path / "x")
