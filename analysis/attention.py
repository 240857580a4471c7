"""Where a model looks: attention maps of any task's inputs or free text, and the allocation to token classes.

    python -m analysis.attention model=diffllama task=gsm8k_inf [ckpt=<run dir>] [analysis.num_problems=32]
    python -m analysis.attention model=llama task=classification ckpt=<a LoRA run>     # any task
    python -m analysis.attention model=llama analysis.text="Tom has 3 apples." [analysis.save_maps=true]
    python -m analysis.attention -m model=diffllama,llama task=gsm8k_inf                # + comparison chart

Task mode: for each record the model reads the task's input (`Task.attention_input`: the evaluation
prompt) with eager attention; hooks (analysis/attention_maps.py) keep only the answer-side query rows (the
last prompt token, optionally generated tokens) over the prompt keys (bounded memory). Where the task labels
token classes (`Task.attention_classes`: KMI / NI / OC on the GSM8K sets, LABEL / TEXT / OTHER in
classification prompts, STUDENT / TEACHER / OTHER in Socratic dialogues) the allocation to each class is
reported; other tasks get the maps and the heatmap only. Free-text mode (`analysis.text` or
`analysis.text_file`, one prompt per line): the full query x key maps of each prompt, one figure each.
`analysis.save_maps=true` writes the maps of the chosen `analysis.layers` / `analysis.heads` to
`attention_maps.safetensors` (keys `<input>/<map>`, [layers, heads, queries, keys]) with
`attention_maps.json` (texts, tokens, query positions, layers, heads) for notebooks.

Allocation of class c for one query row a over the included prompt keys K (the first token, the
attention sink, is excluded unless `analysis.keep_sink`): ratio_c = sum_{t in K_c} a_t / sum_{t in K} a_t
(the ratios sum to 1; a differential row is divided by its own signed total), and the normalised score
ratio_c / (|K_c| / |K|) (1.0 = as much as a uniform spread). A token's class is the class of the majority
of its non-whitespace characters (all characters if it is only whitespace); ties go to the class listed
first; text outside every span gets the last class (OC, OTHER).
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
from safetensors.torch import save_file

import datamodules
from analysis.allocation import allocation, summarise, token_classes
from analysis.attention_maps import AttentionCapture, attention_maps, prefer_eager, select, token_strings
from datamodules.task import Task
from figures import analysis as plots
from modeling.architecture import attention_blocks
from modeling.progress import counted
from runtime import saved_run
from runtime.session import Session, overrides, start
from runtime.sweeps import MultirunSummary
from stats import tables

log = logging.getLogger(__name__)

ANALYSIS_FILE = "attention_analysis.json"
MAPS_FILE = "attention_maps.safetensors"


def analyse(cfg: DictConfig) -> dict[str, Any]:
    """The attention analysis of `cfg` (free text when `analysis.text` / `analysis.text_file` is set, else the
    task's records) in one run; returns what attention_analysis.json holds."""
    choice = saved_run.resolve(cfg)
    with start(cfg, job_type="analysis") as session:
        model, tokenizer = saved_run.load(choice, cfg.paths.cache_dir)
        blocks = attention_blocks(model)  # a hybrid's other blocks have none; the results say which
        select(_list(cfg.analysis.layers), len(blocks["attention_blocks"]), "analysis.layers")
        if cfg.analysis.get("text") or cfg.analysis.get("text_file"):
            result = analyse_texts(cfg, model, tokenizer, session.run_dir)
        else:
            result = analyse_task(
                cfg, model, tokenizer, datamodules.build_task(cfg, tokenizer), session.run_dir
            )
        result |= blocks
        figures = {Path(f).stem: Path(f) for f in result.pop("figures")}
        (session.run_dir / ANALYSIS_FILE).write_text(json.dumps(result, indent=1) + "\n")
        headline = {
            f"attention/{m}/{c}_score": v["mean"]
            for m, s in result["maps"].items()
            for c, v in s["score"].items()
            if v["mean"] is not None
        }
        headline |= {
            f"attention/{m}/{k}": v
            for m, s in result["maps"].items()
            for k, v in s.get("kmi_vs_ni", {}).items()
            if v is not None
        }
        session.log_metrics(headline)
        session.log_images(figures)
        session.finish(
            {
                **{k: result[k] for k in ("model", "task", "ckpt", "num_problems")},
                "overrides": overrides(),
                "metrics": headline,
                "figures": [str(f) for f in figures.values()],
            }
        )
    return result


def analyse_task(cfg: DictConfig, model: Any, tokenizer: Any, task: Task, run_dir: Path) -> dict[str, Any]:
    """Capture the answer-side rows of `cfg.analysis.num_problems` records of the task; summarise the class
    allocation where the task labels classes; write the heatmap, the allocation figure and (save_maps) the
    maps."""
    settings = cfg.analysis
    records = task.records(settings.split)[: settings.num_problems]
    if not records:
        raise ValueError(f"task '{cfg.task.name}': split '{settings.split}' has no records to analyse")
    classes = tuple(getattr(task, "attention_classes", ()))
    inputs = [attention_input(task, record, cfg.task.name) for record in records]
    prefer_eager(model)
    capture = AttentionCapture(model, list(settings.maps))
    per_problem: dict[str, list[np.ndarray]] = {}
    example: dict[str, Any] = {}
    saved: dict[str, torch.Tensor] = {}
    described = []
    try:
        for index, (prompt, spans) in enumerate(counted(inputs, "problems read")):
            encoded = tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
            input_ids, length = encoded["input_ids"], encoded["input_ids"].shape[1]
            labels = (
                token_classes(encoded["offset_mapping"][0].tolist(), spans, prompt, classes)
                if classes
                else []
            )
            if settings.generated_tokens:
                input_ids = model.generate(
                    input_ids,
                    max_new_tokens=settings.generated_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            queries = list(range(length - 1, input_ids.shape[1]))
            layers = capture.run(model, input_ids, queries, length)
            for name in layers[0] if classes else []:
                stacked = [allocation(layer[name], labels, settings.keep_sink, classes) for layer in layers]
                # [L, H, C]
                per_problem.setdefault(f"{name}/ratio", []).append(np.stack([s[0] for s in stacked]))
                per_problem.setdefault(f"{name}/score", []).append(np.stack([s[1] for s in stacked]))
            if index == settings.heatmap_problem:
                example = {
                    "tokens": token_strings(tokenizer, encoded["input_ids"][0].tolist()),
                    "classes": labels,
                    "layers": layers,
                }
            if settings.save_maps:
                saved |= selected_maps(index, layers, settings)
                described.append(
                    {
                        "text": prompt,
                        "tokens": token_strings(tokenizer, input_ids[0].tolist()),
                        "queries": queries,
                        "classes": labels,
                    }
                )
    finally:
        capture.remove()
    summary = summarise(per_problem, cfg.statistics, classes)
    figures = (
        [plots.attention_heatmap(example, list(settings.heatmap_heads), run_dir / "attention_heatmap.png")]
        if example
        else []
    )
    if summary:
        figures.append(
            plots.allocation_by_layer(
                summary, run_dir / "allocation_by_layer.png", f"{cfg.model.name} on {cfg.task.name}"
            )
        )
    if settings.save_maps:
        write_maps(run_dir, saved, described, settings)
    return {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "ckpt": cfg.get("ckpt"),
        "num_problems": len(records),
        "classes": list(classes),
        "keep_sink": settings.keep_sink,
        "generated_tokens": settings.generated_tokens,
        "maps": summary,
        "figures": figures,
    }


def attention_input(task: Task, record: dict[str, Any], name: str) -> tuple[str, list[tuple[int, int, str]]]:
    """The text the model reads for `record` and its class spans; a task that cannot say is named."""
    try:
        return task.attention_input(record)
    except (NotImplementedError, AttributeError) as error:
        raise ValueError(
            f"task '{name}' cannot be analysed: its task class ({type(task).__name__}) does not "
            "say what text the model reads (implement attention_input, or format_example); analyse free "
            "text instead with analysis.text='...' or analysis.text_file=<file>"
        ) from error


def analyse_texts(cfg: DictConfig, model: Any, tokenizer: Any, run_dir: Path) -> dict[str, Any]:
    """Full query x key maps of each free-text prompt: one heatmap per prompt, the maps (save_maps) for
    notebooks."""
    settings = cfg.analysis
    texts = [settings.text] if settings.get("text") else read_prompts(Path(settings.text_file))
    results = attention_maps(
        model, tokenizer, texts, _list(settings.layers), _list(settings.heads), tuple(settings.maps)
    )
    figures = [
        plots.text_heatmap(r, [list(p) for p in settings.heatmap_heads], run_dir / f"attention_text_{i}.png")
        for i, r in enumerate(results)
    ]
    if settings.save_maps:
        saved = {f"{i}/{name}": values for i, r in enumerate(results) for name, values in r.maps.items()}
        described = [
            {"text": r.text, "tokens": r.tokens, "queries": list(range(len(r.tokens)))} for r in results
        ]
        write_maps(run_dir, saved, described, settings, results[0].layers, results[0].heads)
    return {
        "model": cfg.model.name,
        "task": "text",
        "ckpt": cfg.get("ckpt"),
        "num_problems": len(texts),
        "classes": [],
        "texts": texts,
        "maps": {},
        "figures": figures,
    }


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompt file (a missing or empty file is an error naming it)."""
    if not path.is_file():
        raise FileNotFoundError(f"analysis.text_file={path}: no such file")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"analysis.text_file={path}: no non-empty line to analyse")
    return prompts


def selected_maps(
    index: int, layers: list[dict[str, torch.Tensor]], settings: DictConfig
) -> dict[str, torch.Tensor]:
    """The captured rows of one input for the chosen layers and heads: `<index>/<map>` -> [L, H, Q, K]."""
    chosen = select(_list(settings.layers), len(layers), "layers")
    maps = {}
    for name in layers[0]:
        stacked = torch.stack([layers[i][name] for i in chosen])  # [L, H, Q, K]
        maps[f"{index}/{name}"] = stacked[
            :, select(_list(settings.heads), stacked.shape[1], "heads")
        ].contiguous()
    return maps


def write_maps(
    run_dir: Path,
    maps: dict[str, torch.Tensor],
    inputs: list[dict[str, Any]],
    settings: DictConfig,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
) -> None:
    """attention_maps.safetensors and its description attention_maps.json."""
    save_file(maps, run_dir / MAPS_FILE)
    description = {
        "layers": layers if layers is not None else _list(settings.layers),
        "heads": heads if heads is not None else _list(settings.heads),
        "inputs": inputs,
        "keys": "<input index>/<map name>: [layers, heads, queries, keys]",
    }
    (run_dir / "attention_maps.json").write_text(json.dumps(description, indent=1, ensure_ascii=False) + "\n")


def _list(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


class AttentionComparison(MultirunSummary):
    """Hydra callback: after a `-m` run over models, the sweep summary and a side-by-side bar chart of their
    allocations."""

    def report(self, sweep_dir: Path, session: Session, config: DictConfig) -> None:
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{ANALYSIS_FILE}"))]
        results = [r for r in results if r["maps"]]
        if results:
            figure = plots.allocation_comparison(results, sweep_dir / "attention_comparison.png")
            log.info("Attention comparison: %s", figure)
            session.log_images({"attention_comparison": figure})


@hydra.main(version_base="1.3", config_path="../conf", config_name="attention")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of the attention analysis."""
    result = analyse(cfg)
    for name, entry in result["maps"].items():
        for kind in ("ratio", "score"):
            cells = [
                f"{c} {tables.with_interval(v['mean'], v['low'], v['high'])}" for c, v in entry[kind].items()
            ]
            log.info("%s map, %s per class (mean [interval] over problems): %s", name, kind, ", ".join(cells))


if __name__ == "__main__":
    main()
