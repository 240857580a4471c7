"""MEMIT's step 3 (analysis/memit.py): the target vector z of one edit request, the last edited block's
output at the subject's last token that makes the new answer likely, found by optimising a delta on it (the
reference's `compute_z.py`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from analysis.memit_inputs import flat_templates, pad_rows
from datamodules import IGNORE_INDEX
from modeling.architecture import decoder_blocks

STOP_LOSS = 5e-2  # the reference's early-stop threshold on the total z loss


def subject_position(tokenizer, prompt: str, subject: str | None) -> int:
    """Index of the subject's last token in `prompt` (the prompt's last token when there is no subject)."""
    if subject and subject in prompt:
        end = prompt.rindex(subject) + len(subject)
        return len(tokenizer(prompt[:end])["input_ids"]) - 1
    return len(tokenizer(prompt)["input_ids"]) - 1


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
