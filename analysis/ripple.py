"""Does GradSim predict ripple effects? Edit knowledge pieces with MEMIT and correlate.

    python -m analysis.ripple model=gpt2 task=hotpotqa \
        'task.data_files={test: data/hotpotqa/hotpot_dev_distractor.json}'

Stage 1 computes GradSim over the task's knowledge pieces (analysis/gradsim.py). Stage 2 edits the
first `analysis.num_edits` pieces one at a time with MEMIT (analysis/memit.py), each to the answer of
another piece (a counterfactual), and scores every piece before and after: log P(answer | prompt)
and exact match (the teacher-forced greedy prediction equals the answer tokens). Stage 3: the ripple
strength of edit i on piece j is |log P_after(j) - log P_before(j)|; Pearson and Spearman correlation
(scipy, with p-values) between GradSim(i, j) and that strength over all pairs i != j, with bootstrap
confidence intervals over pairs, overall and split into within-chain and across-chain pairs.

Outputs: the stage 1 files, ripple_experiments.json, correlation_analysis.json,
comprehensive_analysis.png (six panels) and report.md.

Across models: `python -m analysis.ripple_compare <run dir>... [--out DIR]` reads several runs and writes
coupling_comparison.csv / .md / .png: GradSim and ripple-strength distributions per model, the
GradSim-ripple Spearman correlation with its confidence interval, and whether the hypothesis holds
consistently across architectures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from scipy import stats

from analysis import gradsim, memit, memit_inputs
from datamodules import IGNORE_INDEX
from datamodules.task import Task
from figures import analysis as plots
from modeling.progress import counted
from runtime import saved_run
from runtime.saved_run import RunModel
from runtime.session import overrides, start
from stats import estimates

log = logging.getLogger(__name__)


def score_pieces(
    model: torch.nn.Module, task: Task, pieces: list[dict[str, Any]], answers: list[str] | None = None
) -> dict[str, np.ndarray]:
    """log P(answer | prompt) and exact match of every piece (answers default to the pieces' own)."""
    answers = answers or [p["answer"] for p in pieces]
    examples = [task.answer_example(p["prompt"], a) for p, a in zip(pieces, answers, strict=True)]
    log_probs, matches = [], []
    for first in range(0, len(examples), 8):
        batch = task.collate(examples[first : first + 8])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                :, :-1
            ]
        labels = batch["labels"][:, 1:]
        supervised = labels != IGNORE_INDEX
        token_log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[
            ..., 0
        ]
        log_probs += (token_log_probs * supervised).sum(-1).tolist()
        matches += ((logits.argmax(-1) == labels) | ~supervised).all(-1).float().tolist()
    return {"log_prob": np.array(log_probs), "exact_match": np.array(matches)}


def counterfactual(pieces: list[dict[str, Any]], index: int) -> str:
    """A new answer for piece `index`: the answer of the next piece of the same hop that differs from its
    own."""
    own = pieces[index]
    order = pieces[index + 1 :] + pieces[:index]
    for other in order:
        if other["hop"] == own["hop"] and other["answer"] != own["answer"]:
            return other["answer"]
    return next(p["answer"] for p in order if p["answer"] != own["answer"])


def correlation(x: np.ndarray, y: np.ndarray, samples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Pearson and Spearman r with p-values and percentile bootstrap intervals (resampling pairs; resamples
    where either side is constant are left out)."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"pairs": int(len(x)), "pearson": None, "spearman": None}
    result: dict[str, Any] = {"pairs": int(len(x))}
    for name, function in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):

        def r_of(index: np.ndarray, function: Any = function) -> float:
            if np.std(x[index]) == 0 or np.std(y[index]) == 0:
                return np.nan
            return float(function(x[index], y[index])[0])

        r, p = function(x, y)
        estimate = estimates.bootstrap(r_of, len(x), None, samples, seed, confidence)
        low, high = (np.nan, np.nan) if estimate.low is None else (estimate.low, estimate.high)
        result[name] = {"r": float(r), "p": float(p), "ci": [float(low), float(high)]}
    return result


def ripple_pairs(
    experiments: list[dict[str, Any]], matrix: np.ndarray, chains: list[str]
) -> dict[str, np.ndarray]:
    """Per (edited i, other j) pair: GradSim, ripple strength |delta log P| and whether both share a chain."""
    sims, strengths, within = [], [], []
    for experiment in experiments:
        i = experiment["index"]
        for j, delta in enumerate(experiment["delta_log_prob"]):
            if j != i:
                sims.append(matrix[i, j])
                strengths.append(abs(delta))
                within.append(chains[i] == chains[j])
    return {"gradsim": np.array(sims), "ripple": np.array(strengths), "within": np.array(within, dtype=bool)}


def analyse_pairs(pairs: dict[str, np.ndarray], settings: DictConfig) -> dict[str, Any]:
    """Correlations overall, within chain and across chains, with intervals at `settings` (conf/statistics:
    confidence, resamples, seed), and whether the hypothesis held."""
    result = {}
    for name, mask in (
        ("all", np.ones_like(pairs["within"])),
        ("within_chain", pairs["within"]),
        ("across_chain", ~pairs["within"]),
    ):
        result[name] = correlation(
            pairs["gradsim"][mask],
            pairs["ripple"][mask],
            settings.resamples,
            settings.confidence,
            settings.seed,
        )
    spearman = result["all"]["spearman"]
    result["hypothesis_held"] = bool(
        spearman and spearman["r"] > 0 and spearman["p"] < 1 - settings.confidence and spearman["ci"][0] > 0
    )
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stages 1-3 for one model in one run (runtime/session.py); returns the correlation analysis."""
    choice = saved_run.resolve(cfg)
    with start(cfg, job_type="analysis") as session:
        analysis = ripple_study(cfg, choice, session.run_dir)
        spearman = analysis["correlation"]["all"]["spearman"] or {}
        headline = {
            "ripple/edit_success_rate": analysis["edit_success_rate"],
            "ripple/spearman_r": spearman.get("r"),
            "ripple/spearman_p": spearman.get("p"),
            "ripple/hypothesis_held": float(analysis["correlation"]["hypothesis_held"]),
        }
        headline = {k: v for k, v in headline.items() if v is not None}
        session.log_metrics(headline)
        session.log_images({"ripple": session.run_dir / "comprehensive_analysis.png"})
        session.finish(
            {
                "model": cfg.model.name,
                "task": cfg.task.name,
                "ckpt": cfg.get("ckpt"),
                "edits": analysis["edits"],
                "overrides": overrides(),
                "metrics": headline,
            }
        )
    return analysis


def ripple_study(cfg: DictConfig, choice: RunModel, run_dir: Path) -> dict[str, Any]:
    """GradSim, one MEMIT edit per piece and the ripple of each on every piece; writes every output into
    run_dir."""
    settings = cfg.analysis
    layers = {
        "analysis.gradsim.layers": settings.gradsim.layers,
        "analysis.memit.layers": settings.memit.layers,
    }
    model, tokenizer, task, pieces, matrix = gradsim.coupling_stage(
        cfg, choice, settings.gradsim, run_dir, layers
    )

    hparams = cfg.analysis.memit
    cache = Path(cfg.paths.cache_dir) / "memit_stats" / cfg.model.name
    moments, templates = memit_inputs.prepared(model, tokenizer, hparams, cache, run_dir)
    before = score_pieces(model, task, pieces)
    experiments = []
    for index in counted(range(min(cfg.analysis.num_edits, len(pieces))), "edits measured"):
        piece = pieces[index]
        request = {
            "prompt": piece["prompt"],
            "subject": piece["subject"],
            "target_new": counterfactual(pieces, index),
        }
        with memit.edited(model, tokenizer, [request], hparams, moments, templates):
            after = score_pieces(model, task, pieces)
            edit = score_pieces(model, task, [piece], [request["target_new"]])
        experiments.append(
            {
                "index": index,
                "piece": piece["id"],
                "target_new": request["target_new"],
                "success": bool(edit["exact_match"][0]),
                "new_answer_log_prob": float(edit["log_prob"][0]),
                "delta_log_prob": (after["log_prob"] - before["log_prob"]).tolist(),
                "exact_match_before": before["exact_match"].tolist(),
                "exact_match_after": after["exact_match"].tolist(),
            }
        )
    chains = [p["chain"] for p in pieces]
    pairs = ripple_pairs(experiments, matrix, chains)
    analysis = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "layers": list(hparams.layers),
        "edits": len(experiments),
        "edit_success_rate": float(np.mean([e["success"] for e in experiments])),
        "correlation": analyse_pairs(pairs, cfg.statistics),
    }
    (run_dir / "ripple_experiments.json").write_text(json.dumps(experiments, indent=1) + "\n")
    (run_dir / "correlation_analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")
    plots.ripple_panels(matrix, pairs, experiments, run_dir / "comprehensive_analysis.png")
    (run_dir / "report.md").write_text(report(analysis, len(pieces), cfg))
    return analysis


def report(analysis: dict[str, Any], pieces: int, cfg: DictConfig) -> str:
    """Markdown report: setup, numbers and the verdict."""
    lines = [
        f"# Knowledge coupling and ripple effects: {analysis['model']}",
        "",
        f"Setup: {pieces} knowledge pieces from task `{analysis['task']}`; GradSim on the MLP output "
        f"weights of layers {analysis['layers']}; {analysis['edits']} single MEMIT edits (each piece to "
        f"another piece's answer); edit success (exact match of the new answer) "
        f"{analysis['edit_success_rate']:.2%}.",
        "",
        "| pairs | n | Pearson r (p) [CI] | Spearman r (p) [CI] |",
        "|---|---|---|---|",
    ]
    for name in ("all", "within_chain", "across_chain"):
        entry = analysis["correlation"][name]

        def cell(stat):
            return (
                "-"
                if not stat
                else f"{stat['r']:.3f} ({stat['p']:.3g}) [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"
            )

        lines.append(f"| {name} | {entry['pairs']} | {cell(entry['pearson'])} | {cell(entry['spearman'])} |")
    held = analysis["correlation"]["hypothesis_held"]
    lines += [
        "",
        "Hypothesis (higher GradSim -> stronger ripple, Spearman r > 0 with p < "
        f"{1 - cfg.statistics.confidence:.2f} "
        f"and CI above 0): **{'held' if held else 'not supported'}** for {analysis['model']}.",
        "",
    ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="ripple")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of the ripple study."""
    analysis = run(cfg)
    log.info(
        "edit success %.2f; hypothesis held: %s",
        analysis["edit_success_rate"],
        analysis["correlation"]["hypothesis_held"],
    )


if __name__ == "__main__":
    main()
