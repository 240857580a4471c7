"""A remote-code model on disk: the MiniMind stand-in (tests/fixtures/minimind) saved as a hub checkpoint
is."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from modeling import models

FIXTURE = Path(__file__).parent / "fixtures" / "minimind" / "model_minimind.py"
AUTO_MAP = {
    "AutoConfig": "model_minimind.MiniMindConfig",
    "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM",
}


def fixture_module():
    """The fixture's modelling module, imported from its file (not from the package)."""
    spec = importlib.util.spec_from_file_location("minimind_fixture", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_minimind(directory: Path, seed: int = 0, **config: int) -> Path:
    """Write a tiny random MiniMind to `directory` as a hub repository holds it: config.json with `auto_map`,
    the modelling file beside the safetensors weights, and lmlab's byte-level tokenizer."""
    code = fixture_module()
    tokenizer = models.byte_level_tokenizer()
    torch.manual_seed(seed)
    model = code.MiniMindForCausalLM(
        code.MiniMindConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **config,
        )
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    shutil.copy(FIXTURE, directory / FIXTURE.name)
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    saved["auto_map"] = AUTO_MAP
    config_file.write_text(json.dumps(saved, indent=2) + "\n")
    return directory
