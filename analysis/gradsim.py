"""GradSim: cosine similarity of per-example gradients of log P(answer | question) (knowledge coupling).

    python -m analysis.gradsim model=gpt2 task=hotpotqa \
        'task.data_files={test: data/hotpotqa/hotpot_dev_distractor.json}'

g_i is the gradient of the summed answer-token log-probability with respect to the MLP output weights
of the target layers (Llama family `model.layers.{i}.mlp.down_proj`, GPT-2 `transformer.h.{i}.mlp.c_proj`;
`analysis.layers`, default the model's MEMIT layers). Written here because the per-example trick
is a few lines: for a linear layer y = W x the gradient of one example is sum_t delta_t x_t^T, with
delta = dL/dy from a single batched backward of the summed loss (examples do not interact: right
padding is masked and carries no loss). It is exact and needs no torch.func (which would need eager
attention). With `analysis.projection_dim`, each layer's gradient is projected by a Kronecker-factored
Gaussian map A g B^T (A: k x out, B: k x in, entries N(0, 1/k)) computed from delta and x directly, so
the full out x in gradient is never built and memory stays bounded for 7B models; inner products are
preserved in expectation (Johnson-Lindenstrauss, as in LESS).

Outputs: knowledge_pieces.json, coupling_matrix.npy, coupling_analysis.json, coupling_heatmap.png.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import datamodules
from analysis import traced_layers
from analysis.expert_gradients import RoutedExpertGradients, expert_output_weights, routed_only
from datamodules.task import Task
from modeling.architecture import as_sequence, check_layers, mlp_output_modules
from modeling.log_probs import answer_log_probs
from modeling.progress import counted
from runtime import saved_run
from runtime.saved_run import RunModel
from runtime.session import overrides, start

log = logging.getLogger(__name__)


class PerExampleGradients:
    """Per-example gradients (optionally Kronecker-projected) of the target layers' weights."""

    def __init__(
        self, model: torch.nn.Module, layers: list[int], projection_dim: int | None = None, seed: int = 0
    ):
        self.model, self.targets = model, mlp_output_modules(model, layers)
        self.projections: list[tuple[torch.Tensor, torch.Tensor]] = []
        if projection_dim:
            side = math.ceil(math.sqrt(projection_dim / len(self.targets)))
            generator = torch.Generator().manual_seed(seed)
            for _, module, conv1d in self.targets:
                out_features, in_features = _shape(module, conv1d)
                self.projections.append(
                    (
                        torch.randn(side, out_features, generator=generator) / math.sqrt(side),
                        torch.randn(side, in_features, generator=generator) / math.sqrt(side),
                    )
                )

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, D] gradients of each example's answer log-probability, layers concatenated."""
        inputs: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        handles = []
        for index, (_, module, _) in enumerate(self.targets):

            def forward_hook(module, args, output, index=index):
                inputs[index] = args[0].detach()  # [B, T, in] (or [B * T, in])
                output.register_hook(lambda grad, index=index: grads.__setitem__(index, grad.detach()))

            handles.append(module.register_forward_hook(forward_hook))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.model.requires_grad_(False)
            for _, module, _ in self.targets:
                module.weight.requires_grad_(True)
            answer_log_probs(self.model, batch).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
            for _, module, _ in self.targets:
                module.weight.grad = None
            self.model.requires_grad_(False)
            for parameter in trainable:
                parameter.requires_grad_(True)
        vectors = []
        shape = batch["input_ids"].shape
        for index, (_, _, conv1d) in enumerate(self.targets):
            # [B, T, in], [B, T, out]
            x, delta = (as_sequence(t, *shape).float() for t in (inputs[index], grads[index]))
            if self.projections:
                a, b = self.projections[index]
                vectors.append(torch.einsum("btk,btl->bkl", delta @ a.T, x @ b.T).flatten(1))
            elif conv1d:
                # like Conv1D weight [in, out]
                vectors.append(torch.einsum("bti,bto->bio", x, delta).flatten(1))
            else:
                # like Linear weight [out, in]
                vectors.append(torch.einsum("bto,bti->boi", delta, x).flatten(1))
        return torch.cat(vectors, dim=1)


def gradient_targets(model: torch.nn.Module, layers: list[int]) -> list[str]:
    """The names of the weights whose gradients GradSim compares: each layer's MLP output projection, or a
    mixture's routed experts' output projections where it has no dense one."""
    if routed_only(model):
        return [name for name, _, _ in expert_output_weights(model, layers)]
    return [name for name, _, _ in mlp_output_modules(model, layers)]


def _shape(module: torch.nn.Module, conv1d: bool) -> tuple[int, int]:
    rows, columns = module.weight.shape
    return (columns, rows) if conv1d else (rows, columns)


def cosine_matrix(vectors: torch.Tensor) -> np.ndarray:
    """[N, N] cosine similarities of the rows of `vectors`."""
    normed = F.normalize(vectors.double(), dim=1)
    return (normed @ normed.T).numpy()


def coupling_statistics(matrix: np.ndarray, chains: list[str]) -> dict[str, Any]:
    """Distribution of off-diagonal GradSim, and its mean within a chain vs across chains."""
    upper = np.triu_indices(len(chains), k=1)
    values = matrix[upper]
    within = np.array([chains[i] == chains[j] for i, j in zip(*upper, strict=True)])
    summary = {
        "pairs": int(values.size),
        "mean": float(values.mean()) if values.size else None,
        "std": float(values.std()) if values.size else None,
        "quantiles": {str(q): float(np.quantile(values, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
        if values.size
        else {},
    }
    for name, mask in (("within_chain", within), ("across_chain", ~within)):
        summary[name] = {"pairs": int(mask.sum()), "mean": float(values[mask].mean()) if mask.any() else None}
    return summary


def compute(
    model: torch.nn.Module, task: Task, settings: DictConfig, seed: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Knowledge pieces of the task's `settings.split` and their GradSim matrix."""
    pieces = task.records(settings.split)[: settings.max_pieces]
    if len(pieces) < 2:
        raise ValueError(
            f"{len(pieces)} knowledge pieces in split '{settings.split}'; GradSim needs at least 2"
        )
    examples = [task.answer_example(p["prompt"], p["answer"]) for p in pieces]
    per_example = RoutedExpertGradients if routed_only(model) else PerExampleGradients
    gradients = per_example(model, list(settings.layers), settings.projection_dim, seed)
    size = settings.batch_size
    vectors = torch.cat(
        [
            gradients(task.collate(examples[i : i + size]))
            for i in counted(range(0, len(examples), size), f"batches of {size} pieces' gradients")
        ]
    )
    return pieces, cosine_matrix(vectors)


def coupling_stage(
    cfg: DictConfig, choice: RunModel, settings: DictConfig, run_dir: Path, layer_keys: dict[str, Any]
) -> tuple[Any, Any, Any, list[dict[str, Any]], np.ndarray]:
    """Load the model `choice` names (refusing a layer it does not have, for every config key -> layers of
    `layer_keys`) and the task, compute GradSim, write knowledge_pieces.json and coupling_matrix.npy."""
    model, tokenizer = saved_run.load(choice, cfg.paths.cache_dir)
    task = datamodules.build_task(cfg, tokenizer)
    if traced_layers.is_traced(cfg):
        facts = [
            {key: p[key] for key in ("prompt", "subject", "answer")}
            for p in task.records(settings.split)[: settings.max_pieces]
            if p.get("subject")
        ]
        memit = cfg.analysis.get("memit", cfg.analysis)
        window = traced_layers.resolve(cfg, model, tokenizer, facts, run_dir, memit.get("num_layers"))
        layer_keys = {
            key: window if value == traced_layers.TRACED else value for key, value in layer_keys.items()
        }
    for key, layers in layer_keys.items():
        check_layers(model, layers, key)
    if offloaded := [name for name, p in model.named_parameters() if p.device.type == "meta"]:
        raise ValueError(
            f"model.device_map={cfg.model.device_map}: GradSim and MEMIT differentiate and edit weights, and "
            f"{len(offloaded)} are offloaded (e.g. {offloaded[0]}); give model.max_memory room for the whole "
            "model on the devices, or set model.device_map=null"
        )
    model.eval()
    pieces, matrix = compute(model, task, settings, cfg.seed)
    clean = [{k: v for k, v in p.items() if k != "_where"} for p in pieces]
    (run_dir / "knowledge_pieces.json").write_text(json.dumps(clean, indent=1, ensure_ascii=False) + "\n")
    np.save(run_dir / "coupling_matrix.npy", matrix)
    return model, tokenizer, task, pieces, matrix


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1: write the pieces, the coupling matrix, its statistics and heatmap into the run dir."""
    from figures import analysis as plots

    choice = saved_run.resolve(cfg)
    with start(cfg, job_type="analysis") as session:
        layers = {"analysis.layers": cfg.analysis.layers}
        model, _, _, pieces, matrix = coupling_stage(cfg, choice, cfg.analysis, session.run_dir, layers)
        analysis = {
            "model": cfg.model.name,
            "task": cfg.task.name,
            "layers": gradient_targets(model, list(cfg.analysis.layers)),
            "projection_dim": cfg.analysis.projection_dim,
            "pieces": len(pieces),
            "statistics": coupling_statistics(matrix, [p["chain"] for p in pieces]),
        }
        (session.run_dir / "coupling_analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")
        heatmap = plots.coupling_heatmap(
            matrix, [p["id"] for p in pieces], session.run_dir / "coupling_heatmap.png"
        )
        statistics = analysis["statistics"]
        headline = {
            "gradsim/mean": statistics["mean"],
            "gradsim/within_chain": statistics["within_chain"]["mean"],
            "gradsim/across_chain": statistics["across_chain"]["mean"],
        }
        headline = {k: v for k, v in headline.items() if v is not None}
        session.log_metrics(headline)
        session.log_images({"coupling_heatmap": heatmap})
        session.finish(
            {
                "model": cfg.model.name,
                "task": cfg.task.name,
                "ckpt": cfg.get("ckpt"),
                "pieces": len(pieces),
                "overrides": overrides(),
                "metrics": headline,
            }
        )
    return analysis


@hydra.main(version_base="1.3", config_path="../conf", config_name="gradsim")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of stage 1."""
    statistics = run(cfg)["statistics"]
    log.info(
        "GradSim over %d pairs: mean %.4f; within chain %s, across %s",
        statistics["pairs"],
        statistics["mean"],
        statistics["within_chain"]["mean"],
        statistics["across_chain"]["mean"],
    )


if __name__ == "__main__":
    main()
