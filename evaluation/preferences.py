"""A preference set from a model's own solutions: `python -m evaluation.preferences model=<m> task=gsm8k`
samples `generation.num_samples` completions of every problem of a split, scores each with the task's scorer
(`score`, default the task's reward score, e.g. GSM8K's exact_match_flexible: correct from `correct_at` up),
and pairs a correct with an incorrect completion of the same problem (at most `pairs_per_problem` each). It
writes `preferences.jsonl` ({prompt, chosen, rejected, problem}: what task=preferences reads with
objective=dpo) and results.json with
the share of problems that gave a pair and the solve rate, each with its interval.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import datamodules
from evaluation.loaded import load
from modeling.generation import generate
from runtime import saved_run
from runtime.session import start
from stats.estimates import wilson

log = logging.getLogger(__name__)


def pairs(
    completions: list[str], solved: list[bool], count: int, rng: random.Random
) -> list[tuple[str, str]]:
    """Up to `count` (correct, incorrect) pairs of one problem's completions, each completion used once at
    most, drawn with `rng`."""
    right = [c for c, ok in zip(completions, solved, strict=True) if ok]
    wrong = [c for c, ok in zip(completions, solved, strict=True) if not ok]
    rng.shuffle(right)
    rng.shuffle(wrong)
    return list(zip(right, wrong, strict=False))[:count]  # as many as the rarer side


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample, score and pair; write preferences.jsonl and results.json."""
    choice = saved_run.resolve(cfg)
    with start(cfg, job_type="evaluate") as session:
        loaded = load(choice, cfg)
        task = datamodules.build_task(cfg, loaded.tokenizer)
        key = cfg.score or task.reward_score
        if key is None:
            raise ValueError(
                f"task '{cfg.task.name}' has no reward score: name the score that tells (score=...)"
            )
        records = task.records(cfg.split)[: cfg.get("limit")]
        prompts = [task.prompt_format.prompt(record, []) for record in records]
        settings = OmegaConf.to_container(cfg.generation, resolve=True)
        sampled = generate(
            loaded.model, loaded.tokenizer, prompts, settings["batch_size"], settings["max_new_tokens"],
            task.prompt_format.stop_strings(settings["stop_strings"]), True, settings["temperature"],
            settings["top_p"], settings["num_samples"],
        )  # fmt: skip
        rng, rows, solved_counts = random.Random(cfg.seed), [], []
        for record, prompt, completions in zip(records, prompts, sampled, strict=True):
            reference = task.prompt_format.reference(record)
            scores = [task.prompt_format.score(c, reference) for c in completions]
            if key not in scores[0]:
                raise ValueError(f"score={key}: the task's scorer gives {sorted(scores[0])}")
            solved = [(s.get(key) or 0.0) >= cfg.correct_at for s in scores]
            solved_counts.append(sum(solved))
            for chosen, rejected in pairs(completions, solved, cfg.pairs_per_problem, rng):
                rows.append(
                    {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": record["_where"]}
                )
        path = session.run_dir / "preferences.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        problems, samples = len(records), len(records) * settings["num_samples"]
        paired_problems = len({row["problem"] for row in rows})
        metrics = {
            "problems": problems,
            "pairs": len(rows),
            "problems_with_a_pair": wilson(paired_problems, problems).as_dict(),
            "solve_rate": wilson(sum(solved_counts), samples).as_dict(),
        }
        log.info("%d pairs from %d of %d problems: %s", len(rows), paired_problems, problems, path)
        return session.finish(
            {"model": cfg.model.name, "task": cfg.task.name, "preferences": str(path), **metrics}
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="preferences")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint."""
    run(cfg)


if __name__ == "__main__":
    main()
