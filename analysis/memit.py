"""MEMIT (Meng et al., ICLR 2023): mass-editing factual associations in the MLP output weights.

Pure functions over a model; `edited(...)` applies a batch of edits and restores the original weights bit for
bit on exit. Written here because no maintained library fits these versions. It computes the reference
implementation's algorithm (kmeng01/memit: `memit_main.py`, `compute_z.py`, `compute_ks.py`,
`rome/layer_stats.py`, `util/generate.py`), step by step (1 and 2, the cached inputs, in
analysis/memit_inputs.py):

1. C (per edited layer): the uncentred second moment E[k k^T] of the MLP down-projection inputs over the
   first `mom2_n_samples` *texts* of a corpus (each truncated to `stats.max_tokens` tokens), cached on disk
   keyed by model, layer, corpus and count; which corpus and how many texts/tokens are recorded.
2. Context templates: `[["{}"], [<prefix>. {}, ... x5]]`: the bare prompt, plus five prefixes that the
   model being edited generates from "The", "Therefore", "Because", "I", "You" (10 tokens, top-5
   sampling), seeded (`context_seed`) and cached per model so runs are reproducible.
3. z (per request), at the last edited layer L: a delta added to L's block output at the subject's last
   token of every prompt, optimised with Adam (`v_lr`, at most `v_num_grad_steps` iterations) on
       NLL of the new answer, mean over the rewrite prompts (each template + prompt + answer[:-1])
     + kl_factor * KL(edited || original), next-token distributions at the subject's last token of
       "<subject> is a"
     + v_weight_decay * ||delta|| / ||h||^2,   h = L's output at the subject's last token of the bare prompt;
   it stops when the total falls under 5e-2 and takes no step on the last iteration; after each step the
   delta is clamped to clamp_norm_factor * ||h||. z = h + delta.
4. For each edited layer i in order: keys K (down-projection inputs at the subject's last token, averaged
   within each template group, then across groups, so the bare prompt weighs 1/2), the residual
   R = (z - h_now) / (number of layers left), h_now recomputed with the layers edited so far, and
   dW = R K^T (lambda C + K K^T)^-1, solved in float64. GPT-2's Conv1D stores W as [in, out]; dW is
   transposed to match.

Where lmlab generalises the reference (which only ran GPT-2 / GPT-J): the subject's last token is found
by tokenizing the text up to the subject's end (the reference tokenizes prefix and subject apart, which
is the same for GPT-2 but off by the BOS token for Llama tokenizers); the answer is tokenized without
special tokens and appended as ids (the reference re-tokenizes "prompt + answer[:-1]" as one string);
prompts are right-padded when batched, as the reference's GPT-2 tokenizer does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from analysis import memit_inputs, traced_layers
from analysis.memit_inputs import batch, captured_output, flat_templates
from analysis.memit_sites import KeyReader, expert_deltas
from analysis.memit_z import subject_position, target_vector
from modeling import model_checks
from modeling.architecture import decoder_blocks
from modeling.log_probs import label_logprobs
from runtime import saved_run
from runtime.session import start
from stats import estimates

log = logging.getLogger(__name__)


@dataclass
class LayerUpdate:
    """One edited layer: dW in the module's weight layout, and the K [in, n] and R [out, n] it came from
    (routed experts: dW [E, out, in] and K [E, in, n])."""

    delta: torch.Tensor
    keys: torch.Tensor
    residual: torch.Tensor


# -- 4. the update
# ------------------------------------------------------------------------------------------------


def request_keys(
    model, tokenizer, layer: int, requests: list[dict[str, Any]], templates: list[list[str]]
) -> torch.Tensor:
    """K: `layer`'s keys at the subject's last token, mean within each template group, then across groups:
    [in, n], or [E, in, n] for the routed experts of a mixture without a dense path
    (analysis/memit_sites.py)."""
    texts = [template.format(r["prompt"]) for r in requests for template in flat_templates(templates)]
    subjects = [r["subject"] for r in requests for _ in flat_templates(templates)]
    encoded, reader = batch(tokenizer, texts), KeyReader(model, layer)
    with reader.watching(), torch.no_grad():
        model(**encoded)
    positions = [subject_position(tokenizer, t, s) for t, s in zip(texts, subjects, strict=True)]
    keys = reader.keys(*encoded["input_ids"].shape)[:, torch.arange(len(texts)), positions].double()
    # [E, n, templates, in]
    per_request = keys.view(len(keys), len(requests), len(texts) // len(requests), -1)
    bounds = torch.tensor([0] + [len(group) for group in templates]).cumsum(0).tolist()
    groups = [per_request[:, :, a:b].mean(2) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    keys = torch.stack(groups).mean(0).transpose(1, 2)  # [E, in, n]
    return keys if reader.routed else keys[0]


def _outputs_at_subject(model, tokenizer, layer: int, requests: list[dict[str, Any]]) -> torch.Tensor:
    prompts = [r["prompt"] for r in requests]
    positions = [subject_position(tokenizer, p, r["subject"]) for p, r in zip(prompts, requests, strict=True)]
    outputs = captured_output(model, decoder_blocks(model)[layer], batch(tokenizer, prompts))
    return outputs[torch.arange(len(prompts)), positions]  # [n, hidden]


def layer_delta(
    keys: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor, weight: float
) -> torch.Tensor:
    """dW = R K^T (lambda C + K K^T)^-1 in float64: [out, in]."""
    keys, residual = keys.double(), residual.double()
    adjusted = torch.linalg.solve(weight * second_moment.double() + keys @ keys.T, keys)  # [in, n]
    return residual @ adjusted.T


def compute_updates(
    model,
    tokenizer,
    requests: list[dict[str, Any]],
    hparams: DictConfig,
    moments: dict[int, torch.Tensor],
    templates: list[list[str]],
) -> dict[int, LayerUpdate]:
    """Each edited layer's update (section 4), applied as it goes."""
    # [n, hidden]
    targets = torch.stack([target_vector(model, tokenizer, r, hparams, templates) for r in requests])
    updates = {}
    for index, layer in enumerate(hparams.layers):
        keys = request_keys(model, tokenizer, layer, requests, templates)  # [in, n]
        current = _outputs_at_subject(model, tokenizer, hparams.layers[-1], requests)  # [n, hidden]
        residual = ((targets - current) / (len(hparams.layers) - index)).double().T  # [hidden, n]
        site = KeyReader(model, layer)
        if site.routed:  # [E, out, in], applied to each expert's [out, in] view
            change = expert_deltas(keys, residual, moments[layer], hparams.mom2_update_weight, layer)
            change = change.to(site.weights[0].dtype)
            with torch.no_grad():
                for matrix, expert_change in zip(site.matrices(), change, strict=True):
                    matrix.add_(expert_change)
        else:
            change = layer_delta(keys, residual, moments[layer], hparams.mom2_update_weight)
            change = (change.T if site.transposed else change).to(site.weights[0].dtype)  # as stored
            with torch.no_grad():
                site.weights[0].add_(change)
        updates[layer] = LayerUpdate(change, keys, residual)
    return updates


@contextlib.contextmanager
def edited(
    model,
    tokenizer,
    requests: list[dict[str, Any]],
    hparams: DictConfig,
    moments: dict[int, torch.Tensor],
    templates: list[list[str]],
) -> Iterator[dict[int, LayerUpdate]]:
    """Apply MEMIT edits for `requests` ({prompt, subject, target_new}); restore the exact weights on exit."""
    weights = [weight for layer in hparams.layers for weight in KeyReader(model, layer).weights]
    saved = [weight.detach().clone() for weight in weights]
    try:
        yield compute_updates(model, tokenizer, requests, hparams, moments, templates)
    finally:
        with torch.no_grad():
            for weight, original in zip(weights, saved, strict=True):
                weight.copy_(original)


# -- the entrypoint: python -m analysis.memit
# -------------------------------------------------------------------------------


def requests_of(settings: DictConfig) -> list[dict[str, Any]]:
    """`analysis.requests` as MEMIT requests: {prompt with the subject filled in for "{}", subject,
    target_new}; a request without a prompt, subject or target is refused by its index."""
    requests = []
    for index, given in enumerate(settings.get("requests") or []):
        missing = [key for key in ("prompt", "subject", "target") if not given.get(key)]
        if missing:
            raise ValueError(
                f"analysis.requests[{index}] lacks {missing}: each edit is "
                '{prompt: "{} plays the sport of", subject: LeBron James, target: football}'
            )
        prompt = given.prompt.replace("{}", given.subject)
        if given.subject not in prompt:
            raise ValueError(f"analysis.requests[{index}]: subject {given.subject!r} is not in {prompt!r}")
        requests.append({"prompt": prompt, "subject": given.subject, "target_new": str(given.target)})
    if not requests:
        raise ValueError("analysis.requests is empty: give at least one {prompt, subject, target}")
    return requests


def target_log_probs(model, tokenizer, requests: list[dict[str, Any]], prefix: str) -> list[float]:
    """log P(target | prompt) of every request: the target's tokens (after `prefix`) summed."""
    return [
        float(
            label_logprobs(
                model,
                [tokenizer(r["prompt"])["input_ids"]],
                [tokenizer(prefix + r["target_new"], add_special_tokens=False)["input_ids"]],
                tokenizer.pad_token_id,
            )[0, 0]
        )
        for r in requests
    ]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Edit the model with every request of `analysis.requests` at once; write each target's probability
    before and after (edits.jsonl, with intervals over requests in results.json) and the edited weights'
    deltas in final/ (`ckpt=<run dir>` loads the edited model)."""
    choice = saved_run.resolve(cfg)
    if choice.layout != "base":
        raise ValueError(
            f"ckpt={choice.ckpt}: MEMIT saves its edits as weight deltas on a base model; edit the base "
            "model (leave ckpt= out)"
        )
    requests, hparams = requests_of(cfg.analysis), cfg.analysis
    with start(cfg, job_type="analysis") as session:
        model, tokenizer = saved_run.load(choice, cfg.paths.cache_dir)
        identity = model_checks.base_identity(model, cfg.model)
        facts = [{"prompt": r["prompt"], "subject": r["subject"]} for r in requests]
        if traced_layers.is_traced(cfg):
            traced_layers.resolve(cfg, model, tokenizer, facts, session.run_dir, hparams.get("num_layers"))
        cache = Path(cfg.paths.cache_dir) / "memit_stats" / cfg.model.name
        moments, templates = memit_inputs.prepared(model, tokenizer, hparams, cache, session.run_dir)
        before = target_log_probs(model, tokenizer, requests, hparams.target_prefix)
        names = {id(p): name for name, p in model.named_parameters()}
        weights = [weight for layer in hparams.layers for weight in KeyReader(model, layer).weights]
        originals = [weight.detach().float().clone() for weight in weights]
        with edited(model, tokenizer, requests, hparams, moments, templates):
            after = target_log_probs(model, tokenizer, requests, hparams.target_prefix)
            deltas = {names[id(w)]: w.detach().float() - o for w, o in zip(weights, originals, strict=True)}
        saved_run.write_weight_deltas(deltas, identity, requests, session.run_dir / "final")
        rows = [
            {
                **request,
                "log_prob_before": old,
                "log_prob_after": new,
                "probability_before": math.exp(old),
                "probability_after": math.exp(new),
            }
            for request, old, new in zip(requests, before, after, strict=True)
        ]
        (session.run_dir / "edits.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        session.log_table("edits", rows)
        summary = summarise(rows, cfg.statistics)
        session.log_metrics({f"memit/{k}": v["value"] for k, v in summary.items() if "value" in v})
        return session.finish(
            {"model": cfg.model.name, "layers": list(hparams.layers), "edits": len(rows), **summary}
        )


def summarise(rows: list[dict[str, Any]], settings: DictConfig) -> dict[str, dict[str, Any]]:
    """The mean probability and log-probability of the targets before and after the edit, each with its
    interval over requests, and with two or more requests each paired change (after - before) with its
    verdict."""
    summary = {}
    for measure in ("probability", "log_prob"):
        before, after = ([row[f"{measure}_{when}"] for row in rows] for when in ("before", "after"))
        for when, values in (("before", before), ("after", after)):
            estimate = estimates.mean_estimate(
                values, None, settings.resamples, settings.seed, settings.confidence
            )
            summary[f"{measure}_{when}"] = estimate.as_dict()
        if len(rows) >= 2:
            change = estimates.paired(after, before, None, settings.confidence, settings.power)
            (verdict,) = estimates.verdicts([change], [("edited", "original")], better="higher")
            summary[f"{measure}_change"] = {"value": change.difference, **change.as_dict(), **verdict}
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="memit")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of a MEMIT edit."""
    results = run(cfg)
    log.info(
        "mean target probability %.4g -> %.4g over %d edits",
        results["probability_before"]["value"],
        results["probability_after"]["value"],
        results["edits"],
    )


if __name__ == "__main__":
    main()
