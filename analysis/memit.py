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
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from analysis.memit_inputs import batch, captured_output, flat_templates, pad_rows
from analysis.memit_sites import KeyReader, expert_deltas
from datamodules import IGNORE_INDEX
from modeling.architecture import decoder_blocks

log = logging.getLogger(__name__)

STOP_LOSS = 5e-2  # the reference's early-stop threshold on the total z loss


@dataclass
class LayerUpdate:
    """One edited layer: dW in the module's weight layout, and the K [in, n] and R [out, n] it came from
    (routed experts: dW [E, out, in] and K [E, in, n])."""

    delta: torch.Tensor
    keys: torch.Tensor
    residual: torch.Tensor


def subject_position(tokenizer, prompt: str, subject: str | None) -> int:
    """Index of the subject's last token in `prompt` (the prompt's last token when there is no subject)."""
    if subject and subject in prompt:
        end = prompt.rindex(subject) + len(subject)
        return len(tokenizer(prompt[:end])["input_ids"]) - 1
    return len(tokenizer(prompt)["input_ids"]) - 1


# -- 3. the target vector z
# ---------------------------------------------------------------------------------------


class ZObjective:
    """The z loss of one request as a function of delta: `terms(delta)` gives each term (section 3)."""

    def __init__(
        self, model, tokenizer, request: dict[str, Any], hparams: DictConfig, templates: list[list[str]]
    ) -> None:
        self.model, self.hparams, self.layer = model, hparams, hparams.layers[-1]
        if self.layer >= len(decoder_blocks(model)) - 1:
            raise ValueError(
                f"MEMIT: the last edited layer ({self.layer}) must be followed by another block, or the "
                "edit cannot reach the answer tokens; the model has "
                f"{len(decoder_blocks(model))} blocks (analysis.layers / model.memit.layers)"
            )
        subject = request["subject"]
        target_ids = tokenizer(hparams.target_prefix + request["target_new"], add_special_tokens=False)[
            "input_ids"
        ]
        rewrites = [template.format(request["prompt"]) for template in flat_templates(templates)]
        kl_prompt = f"{subject or request['prompt']} is a"
        rows = [tokenizer(text)["input_ids"] + target_ids[:-1] for text in rewrites] + [
            tokenizer(kl_prompt)["input_ids"]
        ]
        self.encoded = pad_rows(rows, tokenizer.pad_token_id)
        self.positions = [subject_position(tokenizer, text, subject) for text in [*rewrites, kl_prompt]]
        self.rewrite_count, self.target_length = len(rewrites), len(target_ids)
        # labels[i, p] = the answer token predicted at position p (the last len(target) positions of each
        # rewrite)
        self.labels = torch.full((len(rewrites), self.encoded["input_ids"].shape[1]), IGNORE_INDEX)
        for row, ids in enumerate(rows[: len(rewrites)]):
            self.labels[row, len(ids) - len(target_ids) : len(ids)] = torch.tensor(target_ids)
        self.delta: torch.Tensor | None = None
        handle = decoder_blocks(model)[self.layer].register_forward_hook(self._add_delta)
        try:
            with torch.no_grad():
                logits = model(**self.encoded).logits
        finally:
            handle.remove()
        self.original_kl = F.log_softmax(logits[-1, self.positions[-1]].float(), -1)  # [V], delta = 0
        self.h = self.captured_h  # L's output at the subject of the bare prompt (the first rewrite): [hidden]

    def _add_delta(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.delta is None:
            self.captured_h = hidden[0, self.positions[0]].detach().clone()
            return output
        hidden = hidden.clone()
        hidden[torch.arange(len(self.positions)), self.positions] += self.delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def terms(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """nll, kl (already times kl_factor), weight_decay and total at `delta`, differentiable in delta."""
        self.delta = delta
        handle = decoder_blocks(self.model)[self.layer].register_forward_hook(self._add_delta)
        try:
            logits = self.model(**self.encoded).logits
        finally:
            handle.remove()
            self.delta = None
        log_probs = F.log_softmax(logits[: self.rewrite_count].float(), -1)  # [R, T, V]
        mask = self.labels != IGNORE_INDEX
        picked = log_probs.gather(2, self.labels.clamp(min=0).unsqueeze(2)).squeeze(2)  # [R, T]
        nll = (-(picked * mask).sum(1) / self.target_length).mean()
        edited_kl = F.log_softmax(logits[-1, self.positions[-1]].float(), -1)
        # KL(edited || original)
        kl = self.hparams.kl_factor * (edited_kl.exp() * (edited_kl - self.original_kl)).sum()
        weight_decay = self.hparams.v_weight_decay * delta.norm() / self.h.norm() ** 2
        return {"nll": nll, "kl": kl, "weight_decay": weight_decay, "total": nll + kl + weight_decay}


def target_vector(
    model,
    tokenizer,
    request: dict[str, Any],
    hparams: DictConfig,
    templates: list[list[str]],
    trace: list[dict[str, float]] | None = None,
) -> torch.Tensor:
    """z: the last edited block's output at the subject's last token that makes the new answer likely.
    `trace`, when given, receives each iteration's terms and whether an optimiser step followed."""
    objective = ZObjective(model, tokenizer, request, hparams, templates)
    delta = torch.zeros_like(objective.h, requires_grad=True)
    max_norm = hparams.clamp_norm_factor * objective.h.norm()
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    model.requires_grad_(False)
    for iteration in range(hparams.v_num_grad_steps):
        terms = objective.terms(delta)
        stop = terms["total"].item() < STOP_LOSS or iteration == hparams.v_num_grad_steps - 1
        if trace is not None:
            trace.append({**{k: v.item() for k, v in terms.items()}, "stepped": not stop})
        if stop:
            break
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return (objective.h + delta).detach()


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
