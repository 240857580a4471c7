"""A saved run belongs to its base model: an adapter, a checkpoint or an export is refused on another base
(naming both), a checkpoint with unused keys is refused, method.json can name only a registered method, a
damaged safetensors file is named, and the model revision reaches every hub load."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from lightning_modules.methods import UnknownMethodError
from modeling.model_checks import ModelLoadError
from runtime import saved_run
from runtime.results import read_results
from runtime.saved_run import METHOD_FILE, TRAINABLE_FILE, restore_method
from runtime.training import run
from runtime.validate import ConfigError, check, check_config
from tests.conftest import ROOT, TINY, compose_config, launch
from tests.helpers import load_saved


def evaluate_process(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return launch(
        str(ROOT / "evaluate.py"),
        *TINY[:1],
        "logger=csv",
        "print_config=false",
        "limit=2",
        "generation.max_new_tokens=4",
        f"paths.cache_dir={cwd / 'cache'}",
        f"hydra.run.dir={cwd / 'eval'}",
        *overrides,
        check=False,
    )


def test_an_adapter_is_never_applied_to_another_base_model(tiny_config, tmp_path: Path) -> None:
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=2", "test_after_fit=false"))
    identity = json.loads((Path(lora["final_dir"]) / "base_model.json").read_text())
    assert identity["name"] == "tiny_llama" and identity["architecture"] == "LlamaForCausalLM"

    wrong = evaluate_process("model=tiny_qwen2", f"ckpt={lora['run_dir']}", cwd=tmp_path)
    assert wrong.returncode != 0
    assert (
        "was trained on model 'tiny_llama'" in wrong.stderr
        and "this run built model 'tiny_qwen2'" in wrong.stderr
    )
    implied = evaluate_process(f"ckpt={lora['run_dir']}", cwd=tmp_path)
    assert implied.returncode == 0, implied.stderr[-3000:]
    assert read_results(tmp_path / "eval")["model"] == "tiny_llama"
    # a loading key on the command line is not a model choice: the saved base model, in bfloat16
    in_bf16 = evaluate_process(f"ckpt={lora['run_dir']}", "model.dtype=bfloat16", cwd=tmp_path / "bf16")
    assert in_bf16.returncode == 0, in_bf16.stderr[-3000:]
    evaluated = OmegaConf.load(tmp_path / "bf16" / "eval" / "config.yaml").model
    assert (evaluated.name, evaluated.dtype, evaluated.architecture.hidden_size) == (
        "tiny_llama",
        "bfloat16",
        64,
    )
    assert read_results(tmp_path / "bf16" / "eval")["model"] == "tiny_llama"

    last = Path(lora["run_dir"]) / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ModelLoadError, match="the checkpoint \\(ckpt_path\\) was trained on model 'tiny_llama'"
    ):
        run(tiny_config("model=tiny_qwen2", "method=lora", f"ckpt_path={last}", run_dir=tmp_path / "resume"))


def test_a_checkpoint_with_unused_keys_is_refused(tiny_config, tmp_path: Path) -> None:
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=2", "test_after_fit=false"))
    last = Path(lora["run_dir"]) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state_dict"]["model.not_a_weight"] = torch.zeros(1)
    checkpoint.pop("lmlab_base_model")
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(ModelLoadError, match="unused \\['model.not_a_weight'\\]"):
        run(
            tiny_config("model=tiny_llama", "method=lora", f"ckpt_path={edited}", run_dir=tmp_path / "resume")
        )


def test_method_json_can_only_name_a_registered_method(tiny_config, tmp_path: Path) -> None:
    from modeling.models import build

    results = run(
        tiny_config("model=tiny_llama", "method=adapter", "trainer.max_steps=1", "test_after_fit=false")
    )
    directory = Path(results["final_dir"])
    spec = json.loads((directory / METHOD_FILE).read_text())
    cfg = tiny_config("model=tiny_llama")
    (directory / METHOD_FILE).write_text(json.dumps({**spec, "name": "builtins.print"}))
    with pytest.raises(UnknownMethodError, match="'builtins.print' is not a registered lmlab method"):
        restore_method(build(cfg.model)[0], directory, cfg.model)
    # a target in the file selects nothing: the registered name does
    (directory / METHOD_FILE).write_text(
        json.dumps({**spec, "_target_": "builtins.exec", "apply": "builtins.exec"})
    )
    restored = restore_method(build(cfg.model)[0], directory, cfg.model)
    assert all(hasattr(block, "mlp_adapter") for block in restored.model.layers)


def test_model_revision_reaches_every_hub_load(monkeypatch) -> None:
    from modeling import models
    from tests.conftest import compose_config

    seen = []

    def load_model(*args, **kwargs):
        seen.append(("model", kwargs))
        raise _Loaded

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(
        models.AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(("tokenizer", k)) or _Tok()
    )
    with pytest.raises(_Loaded):
        models.build(compose_config("model=minimind2", "model.revision=abc123").model)
    assert {kind: kwargs.get("revision") for kind, kwargs in seen} == {
        "model": "abc123",
        "tokenizer": "abc123",
    }
    assert all(kwargs["trust_remote_code"] is True for _, kwargs in seen)


class _Tok:
    pad_token, eos_token = "x", "x"


class _Loaded(Exception):
    """The model loader was reached (with the keyword arguments recorded)."""


def test_corrupt_safetensors_are_named(tiny_config, tmp_path: Path) -> None:
    from modeling.models import build

    full = run(
        tiny_config(
            "model=tiny_llama",
            "method=full",
            "trainer.max_steps=1",
            "test_after_fit=false",
            run_dir=tmp_path / "full",
        )
    )
    weights = Path(full["final_dir"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = tiny_config("model=tiny_llama", f"+model.path={full['final_dir']}")
    with pytest.raises(
        ModelLoadError,
        match=f"model.path={full['final_dir']}: its weights \\(model.safetensors\\) could not be read",
    ):
        build(cfg.model)

    adapter = run(
        tiny_config(
            "model=tiny_llama",
            "method=adapter",
            "trainer.max_steps=1",
            "test_after_fit=false",
            run_dir=tmp_path / "ad",
        )
    )
    trainable = Path(adapter["final_dir"]) / TRAINABLE_FILE
    trainable.write_bytes(b"\x00" * 16)
    base = tiny_config("model=tiny_llama")
    with pytest.raises(ValueError, match=f"{trainable}: not a readable safetensors file"):
        restore_method(build(base.model)[0], Path(adapter["final_dir"]), base.model)

    lora = run(
        tiny_config(
            "model=tiny_llama",
            "method=lora",
            "trainer.max_steps=1",
            "test_after_fit=false",
            run_dir=tmp_path / "lo",
        )
    )
    adapter_file = Path(lora["final_dir"]) / "adapter_model.safetensors"
    adapter_file.write_bytes(b"junk")
    result = evaluate_process(f"ckpt={lora['run_dir']}", cwd=tmp_path)
    assert result.returncode != 0 and f"{adapter_file}: not a readable safetensors file" in result.stderr


def test_loading_keys_apply_on_top_of_the_saved_model_and_a_named_model_is_checked(
    tiny_config, tmp_path: Path
) -> None:
    """evaluate.py with ckpt= and no model option loads the saved base model, with the loading keys given on
    the command line on top; naming a model option loads that one (refused on another base)."""
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=1", "test_after_fit=false"))
    ckpt = f"ckpt={lora['run_dir']}"
    saved = compose_config(
        ckpt, "model.dtype=bfloat16", "model.attn_implementation=eager", config_name="evaluate"
    )
    choice = saved_run.resolve(saved)
    assert choice.layout == "adapter" and saved.model == choice.config
    assert (choice.config.name, choice.config.dtype, choice.config.attn_implementation) == (
        "tiny_llama",
        "bfloat16",
        "eager",
    )
    assert "from_ckpt" not in choice.config and choice.config.trust_remote_code is False  # the saved value
    model, _ = saved_run.load(choice)
    base_weights = {p.dtype for name, p in model.named_parameters() if "lora_" not in name}
    assert base_weights == {torch.bfloat16}  # peft keeps the adapter itself in float32
    assert model.config._attn_implementation == "eager"

    as_saved = saved_run.resolve(compose_config(ckpt, config_name="evaluate")).config
    assert (as_saved.name, as_saved.dtype) == ("tiny_llama", "float32")
    default = saved_run.resolve(compose_config(config_name="evaluate")).config
    assert default.name == "smollm2_135m" and "from_ckpt" not in default
    with pytest.raises(ModelLoadError, match="was trained on model 'tiny_llama'"):
        load_saved(compose_config("model=tiny_qwen2", ckpt, config_name="evaluate"))
    named, _ = load_saved(
        compose_config("model=tiny_llama", ckpt, "model.dtype=bfloat16", config_name="evaluate")
    )
    assert {p.dtype for name, p in named.named_parameters() if "lora_" not in name} == {torch.bfloat16}

    # ckpt= (a run to evaluate) and ckpt_path (a checkpoint to resume) each refuse the other's argument
    last = Path(lora["run_dir"]) / "checkpoints" / "last.ckpt"
    with pytest.raises(
        FileNotFoundError, match=r"a training checkpoint, which train.py resumes from \(ckpt_path="
    ):
        saved_run.resolve(compose_config(f"ckpt={last}", config_name="evaluate"))
    with pytest.raises(
        ConfigError, match="a finished run dir; ckpt_path resumes training from a checkpoint file"
    ):
        check_config(compose_config("model=tiny_llama", f"ckpt_path={lora['run_dir']}"))


def test_train_refuses_the_evaluation_default_model() -> None:
    with pytest.raises(ConfigError, match="model=from_ckpt"):
        check_config(compose_config("model=from_ckpt"))


def test_the_renamed_scratch_key_is_refused_and_runs_saved_with_it_still_load(
    tiny_config, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="model.scratch is now model.architecture"):
        check(compose_config("model=tiny_llama", "model.scratch={model_type: llama}"), "train")
    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=1", "test_after_fit=false"))
    identity_file = Path(lora["final_dir"]) / "base_model.json"
    identity = json.loads(identity_file.read_text())
    trained = identity["config"]["architecture"]
    identity["config"]["scratch"] = identity["config"].pop("architecture")  # as a run saved before the rename
    identity_file.write_text(json.dumps(identity))
    choice = saved_run.resolve(compose_config(f"ckpt={lora['run_dir']}", config_name="evaluate"))
    assert choice.config.architecture == trained and "scratch" not in choice.config
    assert type(saved_run.load(choice)[0].base_model.model).__name__ == "LlamaForCausalLM"


def test_an_evaluation_resolves_its_saved_run_once_and_builds_its_model_once(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evaluation import evaluate
    from modeling import models

    lora = run(tiny_config("model=tiny_llama", "method=lora", "trainer.max_steps=1", "test_after_fit=false"))
    calls = {"resolve": 0, "build": 0, "load_tokenizer": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(saved_run, "resolve", counted("resolve", saved_run.resolve))
    monkeypatch.setattr(models, "build", counted("build", models.build))
    monkeypatch.setattr(models, "load_tokenizer", counted("load_tokenizer", models.load_tokenizer))
    cfg = compose_config(
        f"ckpt={lora['run_dir']}",
        "task.source=bundled",
        "limit=2",
        "generation.max_new_tokens=2",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    assert evaluate.run(cfg)["model"] == "tiny_llama"
    # the base model once, and the tokenizer the run saved beside its adapter once
    assert calls == {"resolve": 1, "build": 1, "load_tokenizer": 1}
