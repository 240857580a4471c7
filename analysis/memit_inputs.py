"""The inputs a MEMIT edit reuses across requests, computed once and cached on disk (analysis/memit.py, steps
1-2): the second moment C of each edited layer's MLP keys over a text corpus, and the context templates the
edited model generates. Also the batching and activation-capture helpers both halves share."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file

from analysis.memit_sites import KeyReader
from datamodules.sources import load_split
from modeling.architecture import as_sequence
from modeling.progress import counted

log = logging.getLogger(__name__)


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask, each [N, T]."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(list(ids)), 1
    return {"input_ids": input_ids, "attention_mask": mask}


def batch(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """`texts` tokenized and right-padded (input_ids, attention_mask [N, T])."""
    return pad_rows([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


def captured_output(model, module: torch.nn.Module, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The output of `module` in one no-grad forward pass: [N, T, d]."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda m, a, o: captured.append((o[0] if isinstance(o, tuple) else o).detach())
    )
    try:
        with torch.no_grad():
            model(**encoded)
    finally:
        handle.remove()
    return as_sequence(captured[0], *encoded["input_ids"].shape)


# -- 1. covariance statistics
# -------------------------------------------------------------------------------------


def second_moments(
    model, tokenizer, hparams: DictConfig, texts: Sequence[str], cache: Path | None, corpus: str = "texts"
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """C = E[k k^T] of each edited layer's keys (the down-projection inputs; per expert for routed experts,
    analysis/memit_sites.py) over the first `hparams.mom2_n_samples` texts (each cut to
    `hparams.stats.max_tokens` tokens), one pass for all layers; and {corpus, texts, tokens}. Cached per
    (layer, corpus, count, max_tokens)."""
    samples, max_tokens = hparams.mom2_n_samples, hparams.stats.get("max_tokens", 1024)
    tag = hashlib.sha256(corpus.encode()).hexdigest()[:10]
    paths = {
        layer: cache / f"layer{layer}_{tag}_{samples}texts_{max_tokens}tok.safetensors" if cache else None
        for layer in hparams.layers
    }
    if all(path is not None and path.exists() for path in paths.values()):
        moments = {}
        for layer, path in paths.items():
            with safe_open(str(path), "pt") as handle:
                info = json.loads(handle.metadata()["info"])
                moments[layer] = handle.get_tensor("second_moment")
        return moments, info
    readers = {layer: KeyReader(model, layer) for layer in hparams.layers}
    chosen = list(texts[:samples])
    totals: dict[int, torch.Tensor] = {}
    routed_tokens: dict[int, torch.Tensor] = {}  # per routed expert, the tokens routed to it: [E]
    count = 0
    with contextlib.ExitStack() as watching:
        for reader in readers.values():
            watching.enter_context(reader.watching())
        for start in counted(range(0, len(chosen), 8), "batches of 8 statistics texts"):
            encoded = pad_rows(
                [tokenizer(t)["input_ids"][:max_tokens] for t in chosen[start : start + 8]],
                tokenizer.pad_token_id,
            )
            with torch.no_grad():
                model(**encoded)
            real = encoded["attention_mask"].bool()
            for layer, reader in readers.items():
                keys = reader.keys(*real.shape)[:, real]  # [E, N, in]
                routed = keys.abs().amax(-1) > 0  # [E, N]: the tokens routed to each expert
                # one expert at a time, its routed rows only, so float64 copies stay one expert's size
                blocks = [k[r].double().T @ k[r].double() for k, r in zip(keys, routed, strict=True)]
                totals[layer] = torch.stack(blocks) + totals.get(layer, 0)
                if reader.routed:
                    routed_tokens[layer] = routed.sum(1) + routed_tokens.get(layer, 0)
            count += int(real.sum())
    if not count:
        raise ValueError(f"MEMIT statistics: no tokens in the corpus {corpus} (analysis.memit.stats)")
    if len(chosen) < samples:
        log.warning(
            "MEMIT statistics: the corpus has %d texts, fewer than mom2_n_samples=%d", len(chosen), samples
        )
    info = {"corpus": corpus, "texts": len(chosen), "tokens": count, "max_tokens_per_text": max_tokens}
    for layer, tokens in routed_tokens.items():
        width = totals[layer].shape[-1]
        if (tokens < width).any():  # fewer keys than dimensions: a singular second moment
            raise ValueError(
                f"MEMIT statistics: layer {layer} experts {(tokens < width).nonzero().flatten().tolist()} "
                f"were routed {tokens[tokens < width].tolist()} tokens of {corpus}, fewer than their key "
                f"width {width}; raise analysis.memit.mom2_n_samples (now {samples})"
            )
        info.setdefault("expert_tokens", {})[str(layer)] = tokens.tolist()
    moments = {  # [in, in], or [E, in, in] for routed experts
        layer: (total / count).float() if readers[layer].routed else (total[0] / count).float()
        for layer, total in totals.items()
    }
    for layer, path in paths.items():
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"second_moment": moments[layer]}, path, metadata={"info": json.dumps(info)})
    return moments, info


# -- 2. context templates
# -----------------------------------------------------------------------------------------


def generate_prefix(
    model, tokenizer, starter: str, length: int, top_k: int, generator: torch.Generator
) -> str:
    """Top-k sampled continuation of `starter` to `length` tokens in all, as text (the reference's
    generate_fast)."""
    device = next(model.parameters()).device
    ids = tokenizer(starter, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        while ids.shape[1] < length:  # ten tokens: a full forward per token costs nothing worth a KV cache
            top = model(input_ids=ids).logits[0, -1].float().softmax(-1).topk(top_k)
            pick = torch.multinomial((top.values / top.values.sum()).cpu(), 1, generator=generator)
            ids = torch.cat([ids, top.indices[pick.to(device)].view(1, 1)], dim=1)
    text = unicodedata.normalize("NFKD", tokenizer.decode(ids[0], skip_special_tokens=True)).replace(
        "\n\n", " "
    )
    return text


def context_templates(model, tokenizer, hparams: DictConfig, cache: Path | None) -> list[list[str]]:
    """Template groups: `[["{}"], [five "<generated prefix>. {}"]]` (cached per model and seed), or the groups
    that `hparams.context_templates` lists."""
    if not isinstance(hparams.context_templates, str):
        return [list(group) for group in hparams.context_templates]
    if hparams.context_templates != "generated":
        raise ValueError(
            f"analysis.memit.context_templates={hparams.context_templates!r}: 'generated' or a list of groups"
        )
    settings = (
        list(hparams.context_starters),
        hparams.context_length,
        hparams.context_top_k,
        hparams.context_seed,
    )
    path = (
        cache / f"context_templates_{hashlib.sha256(repr(settings).encode()).hexdigest()[:10]}.json"
        if cache
        else None
    )
    if path is not None and path.exists():
        return json.loads(path.read_text())
    generator = torch.Generator().manual_seed(hparams.context_seed)
    prefixes = [
        generate_prefix(model, tokenizer, s, hparams.context_length, hparams.context_top_k, generator)
        for s in hparams.context_starters
    ]
    groups = [["{}"], [p.replace("{", " ").replace("}", " ") + ". {}" for p in prefixes]]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(groups, indent=1) + "\n")
    log.info("MEMIT context templates: %s", groups)
    return groups


def prepared(
    model, tokenizer, hparams: DictConfig, cache: Path, run_dir: Path
) -> tuple[dict[int, torch.Tensor], list[list[str]]]:
    """C of every edited layer and the context templates, from the statistics corpus of `hparams` (both cached
    under `cache`); which statistics and templates the edits rest on is written to
    `run_dir`/memit_statistics.json, so runs with different ones are never compared unknowingly."""
    records = load_split(hparams.stats.source, hparams.stats.split)
    texts = [r[hparams.stats.text_field] for r in records if str(r.get(hparams.stats.text_field, "")).strip()]
    moments, statistics = second_moments(model, tokenizer, hparams, texts, cache, corpus_name(hparams.stats))
    templates = context_templates(model, tokenizer, hparams, cache)
    (run_dir / "memit_statistics.json").write_text(
        json.dumps({**statistics, "context_templates": templates}, indent=1) + "\n"
    )
    return moments, templates


def flat_templates(templates: list[list[str]]) -> list[str]:
    """The template groups as one list, in order."""
    return [template for group in templates for template in group]


def corpus_name(stats: DictConfig) -> str:
    """A description of the statistics corpus (cache key and record): data files, or hub id/config/split."""
    source = stats.source
    if source.get("data_files"):
        return f"files:{source.data_files}:{stats.text_field}"
    if source.get("kind") == "bundled":
        return f"bundled:{source.bundled}/{stats.split}:{stats.text_field}"
    return f"hub:{source.hub_id}/{source.get('hub_config')}/{stats.split}:{stats.text_field}"
