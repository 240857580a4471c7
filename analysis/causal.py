"""From where attention goes to what it causes: four interventions on any causal LM, with intervals and
verdicts (docs/causal.md).

    python -m analysis.causal model=gpt2 task=hotpotqa analysis.intervention=trace   # ROME's causal tracing
    python -m analysis.causal model=llama analysis.facts=facts.jsonl   # lines of {prompt, subject, answer}
    python -m analysis.causal model=diffllama task=gsm8k_inf analysis.intervention=patch
    python -m analysis.causal -m model=diffllama,llama task=gsm8k_inf analysis.intervention=knockout
    python -m analysis.causal model=llama task=gsm8k_inf analysis.intervention=lens

- `trace` (analysis/causal_trace.py): corrupt the subject, restore one (layer, token) site at a time; the
  indirect effect per site kind (block, MLP and attention output, a hybrid's other mixer);
- `patch` (analysis/activation_patching.py): the clean prompt's activations into the noisy prompt's run at the
  aligned tokens, layer by layer; the share of the damage each layer recovers;
- `knockout` (analysis/knockout.py): block attention from the positions after the noise to the noise tokens,
  per window of layers, against a random-token control; Pass@1 and the target's log-prob, paired per problem;
- `lens` (analysis/logit_lens.py): each layer's prediction of the gold next token, clean against noisy.

Outputs in the run dir: causal_analysis.json (the summary: every effect with n, interval, method and
Holm-adjusted verdict), causal_items.jsonl (one row per fact or problem), figures; W&B gets the headline
numbers. With `-m` over models, the sweep dir gets causal_comparison.json: per model pair, the difference of
their knockout effects (bootstrap over the problems both saw) with a verdict.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

import datamodules
from analysis import causal_studies
from runtime import saved_run
from runtime.session import Session, overrides, start
from runtime.sweeps import MultirunSummary
from stats.estimates import bootstrap, paired

log = logging.getLogger(__name__)

ANALYSIS_FILE = "causal_analysis.json"
ITEMS_FILE = "causal_items.jsonl"
RUNS = {
    "trace": causal_studies.trace,
    "patch": causal_studies.patch,
    "knockout": causal_studies.run_knockout,
    "lens": causal_studies.lens,
}
# the analyses that can read free text or a fact file instead of a task
TASK_FREE = {"trace", "lens"}


def analyse(cfg: DictConfig) -> dict[str, Any]:
    """One causal analysis (`analysis.intervention`) of one model; returns what causal_analysis.json
    holds."""
    intervention = cfg.analysis.intervention
    if intervention not in RUNS:
        raise ValueError(f"analysis.intervention={intervention}: expected one of {', '.join(RUNS)}")
    choice = saved_run.resolve(cfg)
    with start(cfg, job_type="analysis") as session:
        model, tokenizer = saved_run.load(choice, cfg.paths.cache_dir)
        model.eval()
        free = intervention in TASK_FREE and (cfg.analysis.get("facts") or cfg.analysis.get("text"))
        task = None if free else datamodules.build_task(cfg, tokenizer)
        summary, rows, figures, headline = RUNS[intervention](cfg, model, tokenizer, task, session.run_dir)
        result = {
            "model": cfg.model.name,
            "task": cfg.task.name if task else ("facts" if cfg.analysis.get("facts") else "text"),
            "ckpt": cfg.get("ckpt"),
            "intervention": intervention,
            **summary,
        }
        (session.run_dir / ANALYSIS_FILE).write_text(json.dumps(result, indent=1) + "\n")
        with (session.run_dir / ITEMS_FILE).open("w") as items:
            items.writelines(json.dumps(row) + "\n" for row in rows)
        session.log_metrics(headline)
        session.log_images({figure.stem: figure for figure in figures})
        session.finish(
            {
                **{key: result[key] for key in ("model", "task", "ckpt", "intervention")},
                "overrides": overrides(),
                "metrics": headline,
                "figures": [str(figure) for figure in figures],
            }
        )
    return result


def knockout_effects(run_dir: Path, window: str = "all") -> dict[str, dict[str, float]]:
    """Per metric, each problem's knockout-minus-plain difference in one run (window `window`)."""
    effects: dict[str, dict[str, float]] = {}
    for line in (run_dir / ITEMS_FILE).read_text().splitlines():
        row = json.loads(line)
        for metric in ("log_prob", "correct"):
            if metric in row:
                effects.setdefault(metric, {})[row["id"]] = (
                    row[metric][f"knockout/{window}"] - row[metric]["plain"]
                )
    return effects


def compare_knockouts(runs: list[tuple[str, Path]], statistics: DictConfig) -> list[dict[str, Any]]:
    """Per pair of models and metric: the difference of their paired knockout effects (A's minus B's) over
    the problems both analysed, a bootstrap interval over problems, the paired t p-value, and a verdict
    where the interval excludes 0 (which model the knockout of the noise helps more)."""
    table = []
    effects = {name: knockout_effects(path) for name, path in runs}
    for i, (first, _) in enumerate(runs):
        for second, _ in runs[i + 1 :]:
            for metric, own in effects[first].items():
                other = effects[second].get(metric, {})
                shared = sorted(set(own) & set(other))
                if len(shared) < 2:
                    continue
                a, b = np.array([own[k] for k in shared]), np.array([other[k] for k in shared])
                interval = bootstrap(
                    lambda picked, a=a, b=b: float((a[picked] - b[picked]).mean()),
                    len(shared),
                    None,
                    statistics.resamples,
                    statistics.seed,
                    statistics.confidence,
                )
                test = paired(a, b, None, statistics.confidence)
                verdict = "no detectable difference"
                if interval.low is not None and interval.low > 0:
                    verdict = f"the knockout raises {metric} more in {first}"
                elif interval.high is not None and interval.high < 0:
                    verdict = f"the knockout raises {metric} more in {second}"
                table.append(
                    {
                        "a": first,
                        "b": second,
                        "metric": metric,
                        **interval.as_dict(),
                        "p": test.p,
                        "test": test.test,
                        "verdict": verdict,
                    }
                )
    return table


class CausalComparison(MultirunSummary):
    """Hydra callback: after a `-m` sweep of knockouts, compare the models' effects pairwise
    (causal_comparison.json)."""

    def report(self, sweep_dir: Path, session: Session, config: DictConfig) -> None:
        runs = []
        for path in sorted(sweep_dir.glob(f"*/{ANALYSIS_FILE}")):
            result = json.loads(path.read_text())
            if result["intervention"] == "knockout":
                runs.append((f"{result['model']}@{path.parent.name}", path.parent))
        table = compare_knockouts(runs, config.statistics) if len(runs) > 1 else []
        if table:
            (sweep_dir / "causal_comparison.json").write_text(json.dumps(table, indent=1) + "\n")
            session.log_table("causal_comparison", table)
            for row in table:
                log.info(
                    "%s vs %s, %s: %+.3f [%s, %s]: %s",
                    row["a"],
                    row["b"],
                    row["metric"],
                    row["value"],
                    row["low"],
                    row["high"],
                    row["verdict"],
                )


@hydra.main(version_base="1.3", config_path="../conf", config_name="causal")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of the causal analyses."""
    result = analyse(cfg)
    log.info("causal analysis (%s) written: %s", result["intervention"], ANALYSIS_FILE)


if __name__ == "__main__":
    main()
