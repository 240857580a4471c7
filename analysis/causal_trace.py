"""Causal tracing (Meng et al. 2022, ROME section 2): where a model keeps a fact.

For each fact {prompt, subject, answer}, the subject tokens' input embeddings are corrupted with Gaussian
noise (`noise_scale` x the standard deviation of the facts' subject embeddings, ROME's 3 by default; `samples`
draws per fact), and the clean run's state is restored at one (layer, token) at a time, for each site kind:
the block output at that layer, the MLP or attention output over a window of `window` layers around it
(ROME's 10). The indirect effect of a site is P_restored(answer) - P_corrupted(answer), for the answer's first
token (as ROME reports) and for the whole answer's log-probability (teacher-forced). Restorations are batched:
one forward pass restores as many sites as `batch_size` rows hold, each row one (site, noise draw).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.causal_inputs import answer_token_log_probs
from analysis.interventions import Interventions
from analysis.sites import Site
from analysis.token_spans import span_tokens, tokens_with_offsets
from modeling.architecture import input_embeddings

# ROME's token groups of the average-over-facts curves
CATEGORIES = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")


@dataclass(frozen=True)
class Fact:
    """A prompt, the tokens of its subject, and the answer that continues it (token ids)."""

    id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    subject: list[int]  # token indices in prompt_ids
    tokens: list[str]


def encode_fact(tokenizer: Any, fact: dict[str, Any], model: torch.nn.Module, prefix: str = " ") -> Fact:
    """A fact's tokens: the subject's from its characters in the prompt (its last occurrence), the answer as
    `prefix + answer`; without an answer, the model's own greedy next token (ROME's choice)."""
    prompt, subject = fact["prompt"], fact["subject"]
    where = prompt.rfind(subject) if subject else -1
    if where < 0:
        raise ValueError(f"fact {fact.get('id')}: subject {subject!r} is not in its prompt {prompt!r}")
    ids, offsets = tokens_with_offsets(tokenizer, prompt)
    positions = span_tokens(offsets, where, where + len(subject))
    if fact.get("answer"):
        answer = tokenizer(prefix + str(fact["answer"]), add_special_tokens=False)["input_ids"]
    else:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits
        answer = [int(logits[0, -1].argmax())]
    tokens = [tokenizer.decode([token]) for token in ids]
    return Fact(str(fact.get("id", prompt)), ids, list(answer), positions, tokens)


def noise_level(model: torch.nn.Module, facts: Sequence[Fact], scale: float) -> float:
    """`scale` x the standard deviation of the subject tokens' input embeddings over all facts (ROME)."""
    embedding = input_embeddings(model)
    with torch.no_grad():
        rows = [
            embedding(torch.tensor([f.prompt_ids[i] for i in f.subject], device=model.device)) for f in facts
        ]
    return scale * float(torch.cat(rows).float().std())


def answer_scores(logits: torch.Tensor, fact: Fact) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(first answer token), log P(whole answer)) of each row of `logits` [B, T, V]: [B] each."""
    answer = torch.tensor(fact.answer_ids, device=logits.device)
    per_token = answer_token_log_probs(logits, len(fact.prompt_ids), answer)  # [B, A]
    return per_token[:, 0].exp(), per_token.sum(-1)


def trace_fact(
    hooks: Interventions,
    fact: Fact,
    level: float,
    samples: int,
    window: int,
    batch_size: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """The clean, corrupted and restored answer scores of one fact; per site kind, the indirect effects
    [layers, prompt tokens] on the first token's probability (`effect`) and the answer's log-prob
    (`log_prob_effect`)."""
    device = hooks.model.device
    ids = torch.tensor(fact.prompt_ids + fact.answer_ids, device=device)  # [T]
    length = len(fact.prompt_ids)
    subject = torch.tensor(fact.subject, device=device)
    sites = {(kind, layer) for kind, modules in hooks.sites.items() for layer in modules}
    clean_logits = hooks.run(ids[None], record=sites)
    clean = {site: value[0] for site, value in hooks.recorded.items()}  # [T, d] each
    hidden = clean[next(iter(clean))].shape[-1]
    draws = torch.randn(samples, len(fact.subject), hidden, generator=generator).to(device) * level
    corrupted = answer_scores(hooks.run(ids.repeat(samples, 1), noise=(subject, draws)), fact)
    result: dict[str, Any] = {
        "clean": [float(s[0]) for s in answer_scores(clean_logits, fact)],
        "corrupted": [float(s.mean()) for s in corrupted],
        "kinds": {},
    }
    for kind, modules in hooks.sites.items():
        layers = sorted(modules)
        span = 1 if kind == "block" else window
        restorations = [(index, token) for index in range(len(layers)) for token in range(length)]
        first, whole = [], []
        per_pass = max(1, batch_size // samples)
        for start in range(0, len(restorations), per_pass):
            chunk = restorations[start : start + per_pass]
            edits = _restoring(chunk, layers, span, kind, samples, clean)
            rows = len(chunk) * samples
            logits = hooks.run(
                ids.repeat(rows, 1), edits=edits, noise=(subject, draws.repeat(len(chunk), 1, 1))
            )
            scores = answer_scores(logits, fact)
            first.append(scores[0].view(len(chunk), samples).mean(1))
            whole.append(scores[1].view(len(chunk), samples).mean(1))
        shape = (len(layers), length)
        result["kinds"][kind] = {
            "layers": layers,
            "effect": (torch.cat(first).view(shape) - corrupted[0].mean()).tolist(),
            "log_prob_effect": (torch.cat(whole).view(shape) - corrupted[1].mean()).tolist(),
        }
    return result


def _restoring(
    chunk: list[tuple[int, int]],
    layers: list[int],
    span: int,
    kind: str,
    samples: int,
    clean: dict[Site, torch.Tensor],
) -> dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per site, the rows and positions where the chunk's restorations write the clean state: restoration i
    (layer index, token) owns rows i*samples .. (i+1)*samples - 1 and covers the `span` layers around its
    layer (ROME's window: from index - span // 2 to index + ceil(span / 2))."""
    writes: dict[int, tuple[list[int], list[int]]] = {}
    for i, (index, token) in enumerate(chunk):
        low, high = max(0, index - span // 2), min(len(layers), index - (-span // 2))
        for covered in range(low, high) if span > 1 else [index]:
            rows, positions = writes.setdefault(layers[covered], ([], []))
            rows += range(i * samples, (i + 1) * samples)
            positions += [token] * samples
    edits = {}
    for layer, (rows, positions) in writes.items():
        values = clean[(kind, layer)][positions]  # [n, d]
        device = values.device
        edits[(kind, layer)] = (
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            values,
        )
    return edits


def category_positions(fact: Fact) -> dict[str, list[int]]:
    """The prompt tokens of each of ROME's groups (a group a fact lacks is empty)."""
    subject, last = fact.subject, len(fact.prompt_ids) - 1
    after = [i for i in range(subject[-1] + 1, last)]
    return {
        "first_subject": subject[:1],
        "middle_subject": subject[1:-1],
        "last_subject": subject[-1:],
        "first_after": after[:1],
        "further": after[1:],
        "last": [last],
    }


def averaged(traces: list[dict[str, Any]], facts: list[Fact], key: str = "effect") -> dict[str, Any]:
    """Per site kind and token group, each fact's effect per layer averaged over the group's tokens:
    {kind: {group: [facts with the group][layers]}}."""
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for trace, fact in zip(traces, facts, strict=True):
        for kind, entry in trace["kinds"].items():
            effects = np.asarray(entry[key])  # [layers, tokens]
            for group, positions in category_positions(fact).items():
                if positions:
                    curve = effects[:, positions].mean(1).tolist()
                    curves.setdefault(kind, {}).setdefault(group, []).append(curve)
    return curves
