"""Attention allocation to key math information (KMI), noise (NI) and other context (OC).

    python -m analysis.attention model=diffllama task=gsm8k_inf [ckpt=<run dir>] [analysis.num_problems=32]
    python -m analysis.attention -m model=diffllama,llama task=gsm8k_inf      # + comparison chart

Written here because no maintained library labels attention by problem spans. For each problem the
model runs with eager attention; a forward hook on every attention module keeps only the rows of the
answer-side query positions (the last prompt token, optionally generated tokens) over the prompt keys,
so a layer's full [B, H, T, T] map is dropped as soon as the layer is done (bounded memory).

DiffLlama (transformers' `DiffLlamaAttention`, checked against the installed source): one softmax map
A = softmax(QK^T * scale) of shape [B, H, T, T] is computed and returned (both attention calls share
Q and K; V is split into two halves along the KV heads, each tiled back to all KV heads, and the two
outputs are concatenated along the feature axis, [B, T, H, 2*head_dim]). The outputs are then chunked
along the head axis into the first and second halves and combined as out[h] - lambda_full * out[h + H/2]
for h < H/2, with lambda_full = exp(sum(lambda_q1 * lambda_k1)) - exp(sum(lambda_q2 * lambda_k2)) +
lambda_init and lambda_init = 0.8 - 0.6 * exp(-0.3 * layer_idx); heads h and h + H/2 read the same
value vectors, so this equals (A[:, h] - lambda_full * A[:, h + H/2]) @ V_pair(h): the differential map
of head h. The layer then applies an RMSNorm over 2*head_dim (no affine) per head and scales by
(1 - lambda_init). The analysed map is the differential one (H/2 heads); `analysis.maps` can add the
raw halves `a1` (heads 0..H/2-1) and `a2` (heads H/2..H-1). Other models use their ordinary maps.

Allocation of class c for one query row a over the included prompt keys K (the first token, the
attention sink, is excluded unless `analysis.keep_sink`): ratio_c = sum_{t in K_c} a_t / sum_{t in K} a_t
(the three ratios sum to 1; a differential row is divided by its own signed total), and the
normalised score ratio_c / (|K_c| / |K|) (1.0 = as much as a uniform spread). A token's class is the
class of the majority of its non-whitespace characters (all characters if it is only whitespace);
ties go to KMI, then NI, then OC; template text around the question is OC.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from analysis import plots
from runtime.evaluation import load_model
from runtime.session import Session, overrides, start
from runtime.sweeps import MultirunSummary

log = logging.getLogger(__name__)

CLASSES = ("KMI", "NI", "OC")
PRIORITY = {"KMI": 0, "NI": 1, "OC": 2}
ANALYSIS_FILE = "attention_analysis.json"


def token_classes(offsets: list[tuple[int, int]], spans: list[tuple[int, int, str]], text: str) -> list[str]:
    """Class of each token from character spans (majority of non-whitespace characters, ties KMI > NI > OC)."""
    char_class = ["OC"] * len(text)
    for first, last, label in spans:
        char_class[first:last] = [label] * (last - first)
    classes = []
    for first, last in offsets:
        chars = [i for i in range(first, last) if not text[i].isspace()] or list(range(first, last))
        counts = {c: sum(char_class[i] == c for i in chars) for c in CLASSES}
        classes.append(min(CLASSES, key=lambda c: (-counts[c], PRIORITY[c])))
    return classes


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every layer, in layer order."""
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return [m for m in modules if not any(type(c).__name__.endswith("Attention") for c in m.children())]


def differential_maps(module: torch.nn.Module, weights: torch.Tensor, maps: list[str]) -> dict[str, torch.Tensor]:
    """Named maps of one layer: `standard` for ordinary attention; `diff`, `a1`, `a2` for DiffLlama."""
    if not hasattr(module, "lambda_q1"):
        return {"standard": weights}
    half = weights.shape[1] // 2
    lambda_1 = torch.exp(torch.sum(module.lambda_q1 * module.lambda_k1, dtype=torch.float32))
    lambda_2 = torch.exp(torch.sum(module.lambda_q2 * module.lambda_k2, dtype=torch.float32))
    lambda_full = lambda_1 - lambda_2 + module.lambda_init
    named = {"diff": weights[:, :half] - lambda_full * weights[:, half:], "a1": weights[:, :half], "a2": weights[:, half:]}
    return {name: named[name] for name in maps}


class AttentionCapture:
    """Forward hooks that keep rows `queries` x keys [0, keys) of every layer's map(s): [layer] -> {map: [H, Q, K]}."""

    def __init__(self, model: torch.nn.Module, maps: list[str]) -> None:
        self.maps, self.layers, self.active = maps, [], False
        self.queries: list[int] = []
        self.keys = 0
        self.handles = [m.register_forward_hook(self._hook) for m in attention_modules(model)]
        if not self.handles:
            raise ValueError(f"{type(model).__name__}: no attention modules found")

    def _hook(self, module: torch.nn.Module, args: Any, output: tuple) -> None:
        if not self.active:  # e.g. the model.generate calls that produce the generated query tokens
            return
        weights = output[1]
        if weights is None:
            raise RuntimeError("attention weights are None: the model must run with attn_implementation='eager'")
        rows = weights[:, :, self.queries, : self.keys].float()  # [1, H, Q, K]
        self.layers.append({k: v[0].detach().cpu() for k, v in differential_maps(module, rows, self.maps).items()})

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, queries: list[int], keys: int) -> list[dict]:
        """Per-layer captured maps of one forward pass."""
        self.layers, self.queries, self.keys, self.active = [], queries, keys, True
        try:
            with torch.no_grad():
                model(input_ids=input_ids)
        finally:
            self.active = False
        return self.layers

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


def allocation(rows: torch.Tensor, classes: list[str], keep_sink: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ratios and normalised scores [H, 3] (KMI, NI, OC) of query rows [H, Q, K], averaged over queries."""
    included = torch.ones(len(classes), dtype=torch.bool)
    if not keep_sink:
        included[0] = False
    masks = torch.stack([torch.tensor([c == name for c in classes]) & included for name in CLASSES])  # [3, K]
    mass = torch.einsum("hqk,ck->hqc", rows, masks.float())  # [H, Q, 3]
    ratios = (mass / mass.sum(-1, keepdim=True)).mean(1)  # [H, 3]
    share = masks.sum(-1).float() / included.sum()
    scores = torch.where(share > 0, ratios / share.clamp_min(1e-12), torch.full_like(ratios, float("nan")))
    return ratios.numpy(), scores.numpy()


def analyse(cfg: DictConfig) -> dict[str, Any]:
    """Capture and summarise the attention allocation of `cfg.analysis.num_problems` problems; write outputs."""
    with start(cfg, job_type="analysis") as session:
        model, tokenizer = load_model(cfg)
        model.set_attn_implementation("eager")
        model.eval()
        datamodule = instantiate(cfg.task.datamodule, tokenizer=tokenizer, **cfg.data)
        records = datamodule.records(cfg.analysis.split)[: cfg.analysis.num_problems]
        per_problem, example = capture_allocations(cfg, model, tokenizer, datamodule, records)
        summary = summarise(per_problem)
        result = {
            "model": cfg.model.name, "task": cfg.task.name, "ckpt": cfg.get("ckpt"), "num_problems": len(records),
            "keep_sink": cfg.analysis.keep_sink, "generated_tokens": cfg.analysis.generated_tokens, "maps": summary,
        }
        (session.run_dir / ANALYSIS_FILE).write_text(json.dumps(result, indent=1) + "\n")
        figures = {
            "attention_heatmap": plots.attention_heatmap(example, list(cfg.analysis.heatmap_heads),
                                                         session.run_dir / "attention_heatmap.png"),
            "allocation_by_layer": plots.allocation_by_layer(summary, session.run_dir / "allocation_by_layer.png",
                                                             f"{cfg.model.name} on {cfg.task.name}"),
        }
        headline = {f"attention/{m}/{k}": v for m, s in summary.items() for k, v in s["table3"].items() if v is not None}
        session.log_metrics(headline)
        session.log_images(figures)
        session.finish({**{k: result[k] for k in ("model", "task", "ckpt", "num_problems")}, "overrides": overrides(),
                        "metrics": headline, "figures": [str(f) for f in figures.values()]})
    return result


def capture_allocations(cfg: DictConfig, model: Any, tokenizer: Any, datamodule: Any,
                        records: list[dict[str, Any]]) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Per-problem allocation ratios and scores [L, H, 3] of every captured map, and the heatmap example."""
    capture = AttentionCapture(model, list(cfg.analysis.maps))
    per_problem: dict[str, list[np.ndarray]] = {}
    example: dict[str, Any] = {}
    try:
        for index, record in enumerate(records):
            prompt, spans = datamodule.prompt_spans(record)
            encoded = tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
            input_ids, length = encoded["input_ids"], encoded["input_ids"].shape[1]
            classes = token_classes(encoded["offset_mapping"][0].tolist(), spans, prompt)
            if cfg.analysis.generated_tokens:
                input_ids = model.generate(
                    input_ids, max_new_tokens=cfg.analysis.generated_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            queries = list(range(length - 1, input_ids.shape[1]))
            layers = capture.run(model, input_ids, queries, length)
            for name in layers[0]:
                stacked = [allocation(layer[name], classes, cfg.analysis.keep_sink) for layer in layers]
                per_problem.setdefault(f"{name}/ratio", []).append(np.stack([s[0] for s in stacked]))  # [L, H, 3]
                per_problem.setdefault(f"{name}/score", []).append(np.stack([s[1] for s in stacked]))
            if index == cfg.analysis.heatmap_problem:
                example = {"tokens": tokenizer.convert_ids_to_tokens(encoded["input_ids"][0]), "classes": classes,
                           "layers": layers}
    finally:
        capture.remove()
    return per_problem, example


def summarise(per_problem: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Mean/std over problems of the ratios and normalised scores: overall, per layer and per head, per map."""
    summary: dict[str, Any] = {}
    for key, values in per_problem.items():
        name, kind = key.split("/")
        stacked = np.stack(values)  # [N, L, H, 3]
        overall = np.nanmean(stacked, axis=(1, 2))  # [N, 3]
        entry = summary.setdefault(name, {})
        entry[kind] = {
            c: {
                "mean": _float(np.nanmean(overall[:, i])),
                "std": _float(np.nanstd(overall[:, i])),
                "per_layer": [_float(v) for v in np.nanmean(stacked[..., i], axis=(0, 2))],
                "per_head": [[_float(v) for v in row] for row in np.nanmean(stacked[..., i], axis=0)],
            }
            for i, c in enumerate(CLASSES)
        }
    for entry in summary.values():
        kmi, ni = entry["score"]["KMI"]["mean"], entry["score"]["NI"]["mean"]
        entry["table3"] = {"kmi_score": kmi, "ni_score": ni, "kmi_to_ni": kmi / ni if ni else None}
    return summary


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


class AttentionComparison(MultirunSummary):
    """Hydra callback: after a `-m` run over models, the sweep summary and a side-by-side bar chart of their
    allocations."""

    def report(self, sweep_dir: Path, session: Session) -> None:
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{ANALYSIS_FILE}"))]
        if results:
            figure = plots.allocation_comparison(results, sweep_dir / "attention_comparison.png")
            log.info("Attention comparison: %s", figure)
            session.log_images({"attention_comparison": figure})


@hydra.main(version_base="1.3", config_path="../conf", config_name="attention")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of the attention analysis."""
    result = analyse(cfg)
    for name, entry in result["maps"].items():
        log.info("%s map: %s", name, OmegaConf.to_yaml(entry["table3"]).strip().replace("\n", ", "))


if __name__ == "__main__":
    main()
