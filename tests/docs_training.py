"""What docs/training.md promises of a merged export (`python -m runtime.export`): a standard transformers
folder that bare transformers loads, with no adapter left in it, and the logits of the run it came from."""

from __future__ import annotations

import json
import subprocess

import torch
from transformers import AutoModelForCausalLM

from runtime import saved_run
from runtime.export import EXPORT_FILE
from tests.conftest import compose_config
from tests.docs_workspace import Workspace


def merged_export(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    merged = workspace.root / "merged"
    assert not list(workspace.root.glob("*.log")), "the export wrote a log into the working directory"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        path.name for path in merged.iterdir()
    }
    made_from = json.loads((merged / EXPORT_FILE).read_text())
    assert made_from["merged"] and made_from["base_model"]["name"] == "tiny_diffllama"
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.manual_seed(42)  # the training run's seed: the same from-scratch base
    choice = saved_run.resolve(compose_config(f"ckpt={made_from['ckpt']}", config_name="evaluate"))
    adapter, _ = saved_run.load(choice)
    ids = torch.tensor([[5, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapter.eval()(input_ids=ids).logits)
