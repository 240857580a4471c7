"""The four causal analyses as runs: each reads its inputs, intervenes through one Interventions object, and
returns (summary, per-item rows, figures, headline metrics) for analysis/causal.py to write and log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from analysis import activation_patching, causal_inputs, causal_trace, knockout, logit_lens
from analysis.causal_statistics import effect_table
from analysis.intervened_generation import Greedy
from analysis.interventions import Interventions
from analysis.sites import SITE_KINDS, site_modules
from datamodules.task import Task
from figures import causal as plots
from modeling.architecture import attention_layers
from modeling.discovery import StructureError
from modeling.generation import truncate_at_stop
from modeling.progress import counted
from stats.estimates import mean_estimate

TRACED_KINDS = tuple(kind for kind in SITE_KINDS if kind != "head")
Outcome = tuple[dict[str, Any], list[dict[str, Any]], list[Path], dict[str, float]]


def site_kinds(
    model: torch.nn.Module, requested: list[str] | None, default: tuple[str, ...] = SITE_KINDS
) -> tuple[str, ...]:
    """The site kinds asked for (each checked against the model), or every kind of `default` the model has."""
    if requested:
        for kind in requested:
            site_modules(model, kind)
        return tuple(requested)
    found = []
    for kind in default:
        try:
            if site_modules(model, kind):
                found.append(kind)
        except StructureError:
            continue
    return tuple(found)


def trace(cfg: DictConfig, model: Any, tokenizer: Any, task: Task | None, run_dir: Path) -> Outcome:
    """Causal tracing of the facts (analysis/causal_trace.py): per-fact effects, averaged curves with
    intervals and verdicts, heatmaps."""
    settings = cfg.analysis
    if settings.get("facts") or settings.get("text"):
        facts = causal_inputs.read_facts(settings)
    else:
        facts = causal_inputs.task_facts(task, settings.split, settings.num_problems, cfg.task.name)
    encoded = [causal_trace.encode_fact(tokenizer, f, model, settings.answer_prefix) for f in facts]
    level = causal_trace.noise_level(model, encoded, settings.noise_scale)
    # the heads are patched, not traced (ROME traces blocks, MLPs and attention)
    hooks = Interventions(model, site_kinds(model, settings.get("sites"), TRACED_KINDS))
    generator = torch.Generator().manual_seed(settings.seed)
    with hooks.hooked():
        traces = [
            causal_trace.trace_fact(
                hooks, fact, level, settings.samples, settings.window, settings.batch_size, generator
            )
            for fact in counted(encoded, "facts traced")
        ]
    summary: dict[str, Any] = {}
    for key in ("effect", "log_prob_effect"):
        for kind, groups in causal_trace.averaged(traces, encoded, key).items():
            layers = traces[0]["kinds"][kind]["layers"]
            for group, curves in groups.items():
                by_layer = {str(layer): [c[i] for c in curves] for i, layer in enumerate(layers)}
                table = effect_table(by_layer, None, cfg.statistics.confidence, "restores", "lowers")
                summary.setdefault(key, {}).setdefault(kind, {})[group] = table
    rows = [
        {"id": fact.id, "tokens": fact.tokens, "subject": fact.subject, "answer": fact.answer_ids, **t}
        for fact, t in zip(encoded, traces, strict=True)
    ]
    shown = min(settings.heatmap_fact, len(encoded) - 1)
    figures = [
        plots.trace_heatmaps(
            traces[shown], encoded[shown].tokens, encoded[shown].subject, run_dir / "trace.png"
        ),
        plots.trace_curves(summary["effect"], run_dir / "trace_curves.png"),
    ]
    headline = {}
    for kind, groups in summary["effect"].items():
        curve = groups.get("last_subject", {})
        if curve:
            peak = max(curve, key=lambda layer: curve[layer]["mean"])
            headline |= {
                f"causal/trace/{kind}/peak_layer": float(peak),
                f"causal/trace/{kind}/peak": curve[peak]["mean"],
            }
    result = {
        "facts": len(facts),
        "noise_level": level,
        "samples": settings.samples,
        "window": settings.window,
    }
    return result | {"summary": summary}, rows, figures, headline


def _problems(task: Task, settings: DictConfig, clean: bool) -> list[causal_inputs.Problem]:
    records = task.records(settings.split)[: settings.num_problems]
    if not records:
        raise ValueError(f"split '{settings.split}' has no records to analyse")
    return [causal_inputs.problem(task, record, i, clean) for i, record in enumerate(records)]


def patch(cfg: DictConfig, model: Any, tokenizer: Any, task: Task, run_dir: Path) -> Outcome:
    """Activation patching, clean into noisy, per site kind and layer."""
    settings = cfg.analysis
    problems = _problems(task, settings, clean=True)
    hooks = Interventions(model, site_kinds(model, settings.get("sites")))
    greedy, decode, score = _generation(settings, task, tokenizer)
    with hooks.hooked():
        rows = []
        for p in counted(problems, "problems patched"):
            row = activation_patching.patch_problem(hooks, p, settings.batch_size, greedy)
            if "generated" in row:  # the clean and noisy run's ids, and a list of them per patched kind
                generated = row.pop("generated")
                row["correct"] = {
                    name: [score(ids, p.reference) for ids in runs]
                    if name in row["kinds"]
                    else score(runs, p.reference)
                    for name, runs in generated.items()
                }
                row["generation"] = {name: decode(generated[name]) for name in ("clean", "noisy")}
            rows.append(row)
    gap = effect_table(
        {"clean - noisy": [r["clean"] - r["noisy"] for r in rows]}, None, cfg.statistics.confidence
    )
    shares: dict[str, Any] = {}
    effects: dict[str, Any] = {}
    for kind, entry in rows[0]["kinds"].items():
        units = entry["units"]
        shares[kind] = {
            unit: activation_patching.recovered_share(rows, kind, i, cfg.statistics)
            for i, unit in enumerate(units)
        }
        recovered = {
            unit: [r["kinds"][kind]["patched"][i] - r["noisy"] for r in rows] for i, unit in enumerate(units)
        }
        effects[kind] = effect_table(recovered, None, cfg.statistics.confidence, "recovers", "worsens")
    figures = [plots.patch_curves({k: v for k, v in shares.items() if k != "head"}, run_dir / "patching.png")]
    if "head" in shares:
        figures.append(plots.head_shares(shares["head"], run_dir / "patching_heads.png"))
    headline = {
        f"causal/patch/{kind}/best_share": max(s["value"] for s in kind_shares.values())
        for kind, kind_shares in shares.items()
    }
    summary = {"gap": gap["clean - noisy"], "recovered_share": shares, "recovered_log_prob": effects}
    if greedy is not None and len(rows) > 1:
        summary["pass@1"] = activation_patching.pass_at_1_table(rows, cfg.statistics.confidence)
    return {"problems": len(rows), "summary": summary}, rows, figures, headline


def _generation(settings: DictConfig, task: Task, tokenizer: Any) -> tuple[Greedy | None, Any, Any]:
    """The greedy decoder `analysis.generate` asks for (None: log-probs only); the text of a generation's
    token ids (cut at the evaluation's stop strings); its 0/1 score against a reference by the task's own
    metric."""
    stops = list(settings.stop_strings) + list(task.extra_stop_strings)

    def decode(ids: list[int]) -> str:
        return truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops)

    def score(ids: list[int], reference: str) -> float:
        return float(task.score(decode(ids), reference)[task.reward_score or "exact_match"])

    greedy = Greedy(settings.max_new_tokens, tokenizer.eos_token_id) if settings.generate else None
    return greedy, decode, score


def run_knockout(cfg: DictConfig, model: Any, tokenizer: Any, task: Task, run_dir: Path) -> Outcome:
    """Attention knockout of the noise tokens, per window of layers, with its random-token control."""
    settings = cfg.analysis
    problems = _problems(task, settings, clean=False)
    named = knockout.windows(attention_layers(model), settings.knockout_window)
    greedy, decode, score = _generation(settings, task, tokenizer)
    hooks = Interventions(model, (), knockout=True)
    rows = []
    with hooks.hooked():
        for p in counted(problems, "problems knocked out"):
            row = knockout.knockout_problem(hooks, p, named, settings.seed, greedy)
            if "generated" in row:
                generated = row.pop("generated")
                row["correct"] = {v: score(ids, p.reference) for v, ids in generated.items()}
                row["generation"] = {v: decode(ids) for v, ids in generated.items()}
            rows.append(row)
    tables = knockout.summarise(rows, cfg.statistics.confidence)
    figures = (
        [plots.knockout_bars(tables["log_prob"], run_dir / "knockout.png", "log P(target)")] if tables else []
    )
    headline = {
        f"causal/knockout/{m}/{r['a']}": r["difference"]
        for m, table in tables.items()
        for r in table
        if r["b"] == "plain"
    }
    result = {
        "problems": len(rows),
        "windows": named,
        "metric": (task.reward_score or "exact_match") if settings.generate else None,
    }
    return result | {"summary": tables}, rows, figures, headline


def lens(cfg: DictConfig, model: Any, tokenizer: Any, task: Task | None, run_dir: Path) -> Outcome:
    """The logit lens at the last prompt position, on the task's prompts (and their clean counterparts) or
    on free text."""
    settings = cfg.analysis
    hooks = Interventions(model, ("block",))
    rows = []
    with hooks.hooked():
        if settings.get("text"):
            rows.append(
                {
                    "id": "text",
                    "text": logit_lens.lens(
                        hooks, causal_inputs.text_problem(tokenizer, settings.text).prompt_ids, None
                    ),
                }
            )
        else:
            clean = type(task).clean_input is not Task.clean_input
            for p in counted(_problems(task, settings, clean), "problems read through the lens"):
                token = p.target_ids[0]
                row = {
                    "id": p.id,
                    "noisy" if clean else "prompt": logit_lens.lens(hooks, p.prompt_ids, token),
                }
                if clean:
                    row["clean"] = logit_lens.lens(hooks, p.clean_ids, token)
                rows.append(row)
    summary = {}
    for prompt in [key for key in rows[0] if key != "id"]:
        layers = rows[0][prompt]["layers"]
        summary[prompt] = {
            measure: {
                str(layer): mean_estimate([r[prompt][measure][i] for r in rows], method="bootstrap").as_dict()
                | {"mean": float(np.mean([r[prompt][measure][i] for r in rows]))}
                for i, layer in enumerate(layers)
            }
            for measure in ("probability", "rank")
        }
    figures = [plots.lens_curves(summary, run_dir / "logit_lens.png")]
    headline = {
        f"causal/lens/{prompt}/final_probability": list(s["probability"].values())[-1]["mean"]
        for prompt, s in summary.items()
    }
    return {"problems": len(rows), "summary": summary}, rows, figures, headline
