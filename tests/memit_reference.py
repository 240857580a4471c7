"""What the MEMIT tests share: tiny GPT-2 and Llama models with MEMIT settings, the requests they edit, and
the reference computations written here (one prompt at a time, hooks of the tests' own)."""

from __future__ import annotations

import torch
from omegaconf import open_dict

from modeling.architecture import decoder_blocks
from tests.conftest import built_model

TEMPLATES = [["{}"], ["Once upon a time. {}", "Notes. {}", "It was said that. {}"]]


REQUEST = {"prompt": "Marlow Ketterby was born in", "subject": "Marlow Ketterby", "target_new": "Paris"}


OTHER = {"prompt": "The river Oska flows into", "subject": "Oska", "target_new": "Lake Vell"}


ARCHITECTURES = ["tiny_gpt2", "tiny_llama"]


def tiny(name: str, *overrides: str):
    layers = (
        "model.architecture.n_layer=3" if name == "tiny_gpt2" else "model.architecture.num_hidden_layers=3"
    )
    cfg, model, tokenizer = built_model(
        f"model={name}", layers, "model.memit.layers=[0,1]", *overrides, config_name="ripple"
    )
    hparams = cfg.analysis.memit.copy()
    with open_dict(hparams):
        hparams.context_templates = TEMPLATES
    return model, tokenizer, hparams


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def subject_end(tokenizer, text: str, subject: str) -> int:
    return len(ids(tokenizer, text[: text.rindex(subject) + len(subject)])) - 1


def forward(model, layer: int, token_ids: list[int], position: int, delta: torch.Tensor | None = None):
    """Logits [T, V] and block `layer`'s output at `position` [hidden], adding `delta` there when given."""
    seen = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen["h"] = hidden[0, position].detach().clone()
        if delta is None:
            return output
        hidden = hidden.clone()
        hidden[0, position] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0]
    finally:
        handle.remove()
    return logits.double(), seen["h"]
