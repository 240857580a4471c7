"""Scorers, one module per task `evaluation_kind` (datamodules/task.py), found by that name: `<kind>.py` holds
`outputs(cfg, loaded, task, records, share, on_finished)` (the model's outputs for each record of a share,
JSON values that data-parallel processes compute, each handed to `on_finished` when done: the journal a killed
run resumes from) and `score(cfg, task, records, outputs, run_dir)` (rows, metrics and
intervals from all of them) and `batch_size(cfg)` (the records per call of `outputs`, the unit data-parallel
shares are cut at)."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

# what `score` returns: per-item rows, the metrics, and each metric's interval
Scored = tuple[list[dict[str, Any]], dict[str, float], dict[str, dict[str, Any]]]


def names() -> list[str]:
    """Every evaluation kind there is a scorer for: the modules of this package."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__))


def scorer(kind: str) -> ModuleType:
    """The scorer module of a task's `evaluation_kind`."""
    if kind not in names():
        raise ValueError(f"evaluation_kind={kind!r} has no scorer (evaluation/scorers/); known: {names()}")
    return importlib.import_module(f"{__name__}.{kind}")
