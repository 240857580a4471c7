"""Causal tracing pinned to TransformerLens (transformer-lens 4.3.0): the same trace of a tiny GPT-2, computed
with TransformerBridge's hooks one patched forward per (layer, token)
(bench/helpers/transformer_lens_trace.py), equals lmlab's batched trace to 1e-4 for every site kind, layer and
token, on the answer's first-token probability and on its whole log-probability."""

from __future__ import annotations

import copy

import pytest
import torch

from analysis.causal_trace import encode_fact, noise_level, trace_fact
from analysis.interventions import Interventions
from bench.helpers import transformer_lens_trace
from tests.conftest import built_model

FACTS = [
    {"prompt": "The Eiffel Tower is in the city of", "subject": "The Eiffel Tower", "answer": "Paris"},
    {"prompt": "Tom plays the sport of", "subject": "Tom", "answer": "tennis"},
]
SAMPLES, WINDOW = 3, 2


def test_the_trace_equals_transformer_lens_one_forward_per_site() -> None:
    # a wider initialisation than GPT-2's 0.02 gives sharp predictions, so the effects stand well above float
    # rounding
    _, model, tokenizer = built_model(
        "model=tiny_gpt2", "model.architecture.n_layer=3", "+model.architecture.initializer_range=0.3"
    )
    reference = transformer_lens_trace.bridge_of(copy.deepcopy(model), tokenizer)
    facts = [encode_fact(tokenizer, fact, model) for fact in FACTS]
    level = noise_level(model, facts, 3.0)
    kinds = ("block", "mlp", "attention")
    hooks = Interventions(model, kinds)
    ours, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for fact in facts:
        with hooks.hooked():
            traced = trace_fact(hooks, fact, level, SAMPLES, WINDOW, 16, ours)
        expected = transformer_lens_trace.trace(reference, fact, level, SAMPLES, WINDOW, kinds, theirs, 3)
        for kind in kinds:
            for key, size in (("effect", 1e-4), ("log_prob_effect", 1e-2)):
                found = traced["kinds"][kind][key]
                assert torch.tensor(found).abs().max() > size  # the trace measures something
                assert found == [pytest.approx(row, abs=1e-4, rel=1e-4) for row in expected[kind][key]]
