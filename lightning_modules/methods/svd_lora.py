"""SVD-adaptive LoRA: a LoRA rank per target layer, chosen from the spectrum of its gradient.

Before training, the gradients of every LoRA target weight are accumulated over `rank_eval_steps`
training batches. Per layer, the singular values of the gradient G come from a randomized SVD
(Gaussian sketch of `k + oversample` columns, `power_iters` power iterations, each followed by a QR
re-orthonormalisation) or from an exact SVD when the matrix is small. The rank is the smallest r whose
energy coverage sum_{i<=r} s_i^2 / ||G||_F^2 reaches `tau`; the denominator is the full energy of G,
so a flat spectrum is not mistaken for a concentrated one. Ranks are clamped to [min_rank, max_rank]
(when the top-k values do not reach `tau`, the rank is k = max_rank).

The rank map is written to `<run dir>/rank_map.json` (+ a heatmap) and can be reused with
`method.rank_map=<file>`; it reaches peft as `rank_pattern`, with `alpha_pattern` = (alpha / r) * rank
so every layer keeps the same LoRA scaling alpha / r.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from datamodules.padding_free import model_inputs
from figures import runs as figures
from lightning_modules.methods import MethodContext
from lightning_modules.methods.lora import (
    adapted_model,
    lora_config,
    resolve_targets,
    set_lr_ratio,
    training_batches,
    variant_keys,
)
from modeling.lora_init import variant_options

SUPPORTS = ("causal_lm", "label_lm")  # the task modules it can train

log = logging.getLogger(__name__)

RANK_MAP_FILE = "rank_map.json"


def randomized_singular_values(
    matrix: torch.Tensor,
    k: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The top-`k` singular values of `matrix` [m, n] from a Gaussian sketch with power iterations."""
    matrix = matrix.double()
    # [n, k + p]
    sketch = torch.randn(
        matrix.shape[1], min(k + oversample, min(matrix.shape)), generator=generator, dtype=matrix.dtype
    )
    basis = torch.linalg.qr(matrix @ sketch).Q  # [m, k + p]
    for _ in range(power_iters):
        basis = torch.linalg.qr(matrix.T @ basis).Q  # [n, k + p]
        basis = torch.linalg.qr(matrix @ basis).Q  # [m, k + p]
    return torch.linalg.svdvals(basis.T @ matrix)[:k]  # the small [k + p, n] projection


def coverage_rank(singular_values: torch.Tensor, total_energy: float, tau: float) -> int:
    """Smallest r with sum of the top-r squared singular values >= tau * total_energy (len if never)."""
    coverage = torch.cumsum(singular_values.double() ** 2, 0) / max(total_energy, 1e-300)
    reached = torch.nonzero(coverage >= tau - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


@dataclass(frozen=True)
class RankSelection:
    """How a layer's rank is chosen from its gradient's spectrum (the method's knobs of the same names)."""

    tau: float = 0.95
    min_rank: int = 2
    max_rank: int = 32
    oversample: int = 10
    power_iters: int = 2
    exact_below: int = 64


def select_rank(
    gradient: torch.Tensor,
    cfg: RankSelection,
    exact: bool | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """The clamped energy-coverage rank of one gradient matrix (`exact` None: by `exact_below`)."""
    gradient = gradient.double()
    k = min(int(cfg.max_rank), min(gradient.shape))
    if exact is None:
        exact = min(gradient.shape) <= cfg.exact_below
    values = (
        torch.linalg.svdvals(gradient)[:k]
        if exact
        else randomized_singular_values(gradient, k, cfg.oversample, cfg.power_iters, generator)
    )
    rank = coverage_rank(values, float(gradient.square().sum()), float(cfg.tau))
    return max(int(cfg.min_rank), min(int(cfg.max_rank), rank))


def target_weights(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Parameter]:
    """The weight of every module whose name is, or ends with, one of `targets` (peft's matching)."""
    return {
        name: module.weight
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def accumulated_gradients(
    model: torch.nn.Module, weights: dict[str, torch.nn.Parameter], batches: list
) -> dict[str, torch.Tensor]:
    """Sum over `batches` of the loss gradient of each weight (dropout off; other parameters untouched)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    for weight in weights.values():
        weight.requires_grad_(True)
        weight.grad = None
    for batch in batches:
        model(**model_inputs(batch)).loss.backward()
    gradients = {name: weight.grad.detach().clone() for name, weight in weights.items()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags[name])
        parameter.grad = None
    model.train(was_training)
    return gradients


def rank_map_from_gradients(
    model: PreTrainedModel,
    targets: list[str],
    selection: RankSelection,
    steps: int,
    seed: int,
    context: MethodContext,
) -> dict[str, int]:
    """Per target module, the rank that the spectrum of its gradient accumulated over `steps` batches asks
    for."""
    why = "method=svd_lora (choosing ranks; or pass method.rank_map=<rank_map.json>)"
    batches = list(training_batches(model, context, steps, why))
    weights = target_weights(model, targets)
    started = time.perf_counter()
    gradients = accumulated_gradients(model, weights, batches)
    generator = torch.Generator().manual_seed(int(seed))
    ranks = {
        name: select_rank(gradient, selection, generator=generator) for name, gradient in gradients.items()
    }
    log.info(
        "svd_lora: ranks of %d layers from %d batches in %.1f s",
        len(ranks),
        len(batches),
        time.perf_counter() - started,
    )
    return ranks


def read_rank_map(path: str | Path) -> dict[str, int]:
    """A rank map JSON ({module name: rank}) written by an earlier svd_lora run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"method.rank_map={path}: no such file (svd_lora runs write <run dir>/{RANK_MAP_FILE})"
        )
    ranks = json.loads(path.read_text())
    if not isinstance(ranks, dict) or not all(isinstance(r, int) and r > 0 for r in ranks.values()):
        raise ValueError(
            f"method.rank_map={path}: expected a JSON object of module name -> positive integer rank"
        )
    return ranks


def rank_metrics(ranks: dict[str, int]) -> dict[str, float]:
    """The rank of every layer and their mean, as metrics train.py logs at step 0."""
    metrics: dict[str, float] = {f"svd_lora/rank/{name}": rank for name, rank in ranks.items()}
    metrics["svd_lora/mean_rank"] = sum(ranks.values()) / len(ranks)
    return metrics


def write_rank_map(ranks: dict[str, int], run_dir: Path) -> Path:
    """`rank_map.json` and a layer x module heatmap `rank_map.png` in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RANK_MAP_FILE
    path.write_text(json.dumps(ranks, indent=2) + "\n")
    layers = sorted({int(n) for name in ranks for n in name.split(".") if n.isdigit()}) or [0]
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in ranks))
    grid = torch.zeros(len(layers), len(kinds))
    for name, rank in ranks.items():
        digits = [int(n) for n in name.split(".") if n.isdigit()]
        grid[layers.index(digits[0]) if digits else 0, kinds.index(name.rsplit(".", 1)[-1])] = rank
    figures.rank_map(grid, layers, kinds, path.with_suffix(".png"))
    return path


def apply(
    model: PreTrainedModel,
    context: MethodContext,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    rank_eval_steps: int = 8,
    tau: float = 0.95,
    min_rank: int = 2,
    max_rank: int = 32,
    oversample: int = 10,
    power_iters: int = 2,
    exact_below: int = 64,
    seed: int = 0,
    rank_map: str | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    loraplus_lr_ratio: float | None = None,
) -> PeftModel:
    """Choose (or read from `rank_map`) a rank per target layer, then freeze the base and add LoRA with those
    ranks (DoRA, rsLoRA and LoRA+ as in method=lora); the ranks go to `context.metrics`."""
    if rank_map:
        ranks = read_rank_map(rank_map)
    else:
        selection = RankSelection(tau, min_rank, max_rank, oversample, power_iters, exact_below)
        targets = resolve_targets(target_modules, context.model_cfg, model)
        ranks = rank_map_from_gradients(model, targets, selection, rank_eval_steps, seed, context)
        if context.run_dir is not None:
            log.info("svd_lora rank map: %s", write_rank_map(ranks, Path(context.run_dir)))
    for name, rank in ranks.items():
        log.info("svd_lora rank %3d  %s", rank, name)
    context.metrics.update(rank_metrics(ranks))
    scale = alpha / r
    config = lora_config(
        model,
        sorted(ranks),
        r,
        alpha,
        dropout,
        rank_pattern=dict(ranks),
        # alpha / r at every rank; rsLoRA: alpha / sqrt(rank)
        alpha_pattern={name: alpha if use_rslora else scale * rank for name, rank in ranks.items()},
        **variant_options(use_dora, use_rslora, "default"),
    )
    adapted = adapted_model(model, config, variant_keys("svd_lora", use_dora, use_rslora))
    return set_lr_ratio(adapted, loraplus_lr_ratio)
