"""lm-evaluation-harness's benchmarks as an lmlab task (`task=lm_eval`): each record names one lm-eval task
(or group: mmlu), which lm-eval runs on the model lmlab built (evaluation/scorers/lm_eval.py). Evaluation
only: a benchmark has no training split here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datamodules.task import Task


class LmEvalTask(Task):
    """The lm-eval tasks `tasks` (names lm-eval knows, or defined by YAML files under `include_path`)."""

    evaluation_kind = "lm_eval"
    allows_padding_free = False

    def __init__(
        self,
        tasks: Sequence[str],
        include_path: str | None = None,
        num_fewshot: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("task.tasks: name the lm-eval tasks to run: 'task.tasks=[arc_easy,hellaswag]'")
        self.benchmarks, self.include_path, self.num_fewshot = list(tasks), include_path, num_fewshot

    def records(self, stage: str) -> list[dict[str, Any]]:
        """One record per benchmark (its name), for evaluation; no training records."""
        if stage != "test":
            raise ValueError(
                "task=lm_eval evaluates only: lm-eval's benchmarks have no training split here (train on "
                "another task, then evaluate its run with task=lm_eval ckpt=<run dir>)"
            )
        return [{"benchmark": name, "_where": f"lm_eval:{name}"} for name in self.benchmarks]

    def limited(self, records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
        """Every benchmark: `limit` is the examples lm-eval scores per benchmark (its own --limit)."""
        return records
