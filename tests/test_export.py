"""`python -m runtime.export`: a trained run as a standalone transformers model. The merged export of every
method that adds to the base's weights gives the adapter run's logits when loaded by bare transformers in a
fresh process where lmlab cannot be imported; what cannot be merged is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime import saved_run
from runtime.export import EXPORT_FILE, NotMergeableError, export
from runtime.training import build_trainable_model
from tests.conftest import compose_config
from tests.test_lora_variants import variant_config

MERGEABLE = {
    "lora_dora_pissa": ["method=lora", "method.use_dora=true", "method.init=pissa"],
    "lora_rslora": ["method=lora", "method.use_rslora=true"],
    "adalora": ["method=adalora", "method.init_r=4"],
    "vera": ["method=vera", "method.r=16"],
    "ia3": ["method=ia3"],
}
INPUT_IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
# run by a bare interpreter: isolated mode in another working dir, and lmlab's editable-install finder taken
# off, so that nothing of lmlab can be imported
BARE_LOAD = """
import sys, importlib.util
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
assert importlib.util.find_spec("lightning_modules") is None and importlib.util.find_spec("runtime") is None
ids = load_file(sys.argv[1])["input_ids"]
logits = {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    AutoTokenizer.from_pretrained(folder)
    logits[folder] = model(input_ids=ids).logits.detach().contiguous()
save_file(logits, sys.argv[2])
"""


def saved(tmp_path: Path, name: str, keys: list[str]) -> tuple[Path, torch.Tensor]:
    """A tiny_llama run of `keys` saved as train.py saves it (trainable weights moved off their start),
    and its logits on INPUT_IDS."""
    L.seed_everything(42)  # export.yaml's seed: the same random base
    model, tokenizer, _, _ = build_trainable_model(variant_config(tmp_path / name, *keys))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    target = tmp_path / name / "final"
    saved_run.write_model(model, variant_config(tmp_path / name, *keys).method, target)
    tokenizer.save_pretrained(target)
    return target, model.eval()(input_ids=INPUT_IDS).logits.detach()


def export_config(ckpt: Path, out: Path, *extra: str):
    return compose_config("model=tiny_llama", f"ckpt={ckpt}", f"out={out}", *extra, config_name="export")


def test_merged_exports_load_in_bare_transformers_with_the_adapter_runs_logits(tmp_path: Path) -> None:
    expected, folders = {}, []
    for name, keys in MERGEABLE.items():
        run, logits = saved(tmp_path, name, keys)
        out = export(export_config(run, tmp_path / "exports" / name))
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
            path.name for path in out.iterdir()
        }
        assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text()) or any(
            out.glob("chat_template.*")
        )
        assert json.loads((out / EXPORT_FILE).read_text())["merged"] is True
        expected[str(out)] = logits
        folders.append(str(out))
    save_file({"input_ids": INPUT_IDS}, tmp_path / "ids.safetensors")
    subprocess.run(
        [sys.executable, "-I", "-c", BARE_LOAD, str(tmp_path / "ids.safetensors"), str(tmp_path / "out.st")]
        + folders,
        cwd=tmp_path,
        check=True,
    )
    loaded = load_file(tmp_path / "out.st")
    for folder in folders:
        torch.testing.assert_close(loaded[folder], expected[folder], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "keys, reason",
    [
        (["method=prompt_tuning"], "virtual tokens"),
        (["method=adapter"], "bottleneck adapters"),
    ],
)
def test_what_cannot_be_merged_is_refused_with_the_reason(
    tmp_path: Path, keys: list[str], reason: str
) -> None:
    run, _ = saved(tmp_path, "run", keys)
    with pytest.raises(NotMergeableError, match=reason):
        export(export_config(run, tmp_path / "out"))


def test_push_to_hub_offline_is_refused_after_writing_the_export(tmp_path: Path, monkeypatch) -> None:
    run, _ = saved(tmp_path, "run", ["method=lora"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="push_to_hub=me/tiny: HF_HUB_OFFLINE"):
        export(export_config(run, tmp_path / "out", "push_to_hub=me/tiny"))
    assert (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export(export_config(run, tmp_path / "out"))
