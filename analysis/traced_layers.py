"""MEMIT's edited layers chosen by causal tracing (`model.memit.layers=traced`), as MEMIT's authors chose
theirs: the window of `num_layers` consecutive layers whose MLP output has the highest indirect effect at
the subject's last token, averaged over the facts being edited (MEMIT section 3), among the layers MEMIT can
edit (those with a dense MLP output projection, and a block after them).

The trace of a model on a fact set is cached under `paths.cache_dir/causal_traces/<model>/` keyed by the
model, its checkpoint, the facts and the trace settings, and the curve with the chosen window is recorded in
the run dir (`traced_layers.json`), so an edit says which layers it used and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from analysis.causal_trace import averaged, encode_fact, noise_level, trace_fact
from analysis.interventions import Interventions
from modeling.architecture import decoder_blocks, mlp_output_layers, structure

log = logging.getLogger(__name__)

TRACED = "traced"
RECORD = "traced_layers.json"
# the config keys that name MEMIT or GradSim layers (model.memit.layers first: the others read it)
LAYER_KEYS = (
    "model.memit.layers",
    "analysis.layers",
    "analysis.memit.layers",
    "analysis.gradsim.layers",
)


def best_window(curve: list[float], layers: list[int], size: int) -> list[int]:
    """The `size` consecutive entries of `layers` (clipped to their number) with the largest summed `curve`;
    the earliest on a tie."""
    size = max(1, min(size, len(layers)))
    sums = [sum(curve[i : i + size]) for i in range(len(layers) - size + 1)]
    start = int(np.argmax(sums))
    return layers[start : start + size]


def resolve(
    cfg: DictConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    facts: list[dict[str, Any]],
    run_dir: Path,
    num_layers: int | None = None,
) -> list[int]:
    """The traced window of MEMIT layers for `facts` (`num_layers` long, default `model.memit.num_layers`),
    written into every layer key of `cfg` that says `traced`, and recorded in the run dir."""
    trace, identity = cfg.model.memit.trace, _identity(model, cfg)
    key = json.dumps([identity, facts, OmegaConf.to_container(trace)], sort_keys=True, default=str)
    path = (
        Path(cfg.paths.cache_dir) / "causal_traces" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    )
    if path.is_file():
        cached = json.loads(path.read_text())
    else:
        cached = mlp_curve(model, tokenizer, facts, trace)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached | {"model": identity, "facts": len(facts)}, indent=1) + "\n")
    # the layers MEMIT edits (those with the dense MLP output projection; all of them in a mixture whose
    # experts are all routed, which MEMIT edits expert by expert), but the last: an edited layer needs a block
    # after it (analysis/memit_z.py)
    depth = len(decoder_blocks(model))
    dense = mlp_output_layers(model) if structure(model).mlp_output else range(depth)
    editable = set(dense) - {depth - 1}
    kept = [i for i, layer in enumerate(cached["layers"]) if layer in editable]
    size = num_layers or cfg.model.memit.num_layers
    window = best_window([cached["curve"][i] for i in kept], [cached["layers"][i] for i in kept], size)
    record = {
        "layers": window,
        "num_layers": size,
        "curve_layers": cached["layers"],
        "curve": cached["curve"],
        "facts": len(facts),
        "trace": str(path),
    }
    (run_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    log.info("MEMIT layers %s, traced on %d facts (%s)", window, len(facts), path)
    for name in LAYER_KEYS:
        if OmegaConf.select(cfg, name, default=None) == TRACED:
            OmegaConf.update(cfg, name, window, force_add=True)
    return window


def is_traced(cfg: DictConfig) -> bool:
    """Whether any MEMIT or GradSim layer key of `cfg` asks for traced layers."""
    return any(OmegaConf.select(cfg, name, default=None) == TRACED for name in LAYER_KEYS)


def _identity(model: torch.nn.Module, cfg: DictConfig) -> list[Any]:
    """The model's config name, checkpoint and a digest of its weights (the first values of each tensor)."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return [cfg.model.name, cfg.get("ckpt"), digest.hexdigest()[:16]]


def mlp_curve(model: torch.nn.Module, tokenizer: Any, facts: list[dict[str, Any]], trace: DictConfig) -> dict:
    """The MLP sites' indirect effect at the subject's last token, per layer, averaged over `facts`."""
    model.eval()
    encoded = [encode_fact(tokenizer, fact, model, trace.answer_prefix) for fact in facts]
    level = noise_level(model, encoded, trace.noise_scale)
    hooks = Interventions(model, ("mlp",))
    generator = torch.Generator().manual_seed(trace.seed)
    with hooks.hooked():
        traces = [
            trace_fact(hooks, fact, level, trace.samples, trace.window, trace.batch_size, generator)
            for fact in encoded
        ]
    curves = averaged(traces, encoded)["mlp"]["last_subject"]
    return {"layers": traces[0]["kinds"]["mlp"]["layers"], "curve": np.mean(curves, axis=0).tolist()}
