"""Greedy generation under an intervention: variants of one prompt as batch rows, each step one forward pass
of the whole sequence through `Interventions.run` with the same edits or knockout masks (no KV cache, so any
model and any intervention apply exactly as in the teacher-forced pass)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from analysis.interventions import Interventions


@dataclass(frozen=True)
class Greedy:
    """How many new tokens at most, and the token that ends a continuation."""

    max_new_tokens: int
    stop_token: int | None

    def run(
        self, hooks: Interventions, prompt: list[int], rows: int, interventions: Mapping[str, Any]
    ) -> list[list[int]]:
        """Each row's new token ids (up to the stop token) for `rows` copies of `prompt`, every step run with
        `interventions` (keyword arguments of `Interventions.run`: edits at prompt positions, knockout masks
        covering prompt + max_new_tokens positions)."""
        ids = torch.tensor([prompt] * rows, device=hooks.model.device)  # [rows, T]
        done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        for _ in range(self.max_new_tokens):
            following = hooks.run(ids, **interventions)[:, -1].argmax(-1)  # [rows]
            ids = torch.cat([ids, following[:, None]], dim=1)
            if self.stop_token is not None:
                done |= following == self.stop_token
                if bool(done.all()):
                    break
        new = ids[:, len(prompt) :].tolist()
        return [row[: row.index(self.stop_token)] if self.stop_token in row else row for row in new]
