"""GRPO's rollouts sampled by a vLLM engine (`objective.generation_backend=vllm`, modeling/vllm_policy.py):
the weights handed to the engine are what `save_pretrained` writes for the merged policy, on every family, and
leave the training model bit-for-bit as it was; the engine's model gives the policy's logits; a run samples
every generation batch from the engine with the current weights (its exact resume: tests/test_objectives.py);
what vLLM cannot serve is refused by key. vLLM does not install here: the engine is the stand-in of
tests/fixtures/vllm_stand_in, which loads weights by checkpoint name and refuses unknown or missing ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lightning_modules.grpo import GRPOModule
from modeling.vllm_policy import VLLMPolicySampler, checkpoint_weights
from runtime.results import logged_rows
from runtime.training import build_trainable_model, run
from runtime.validate import ConfigError, check
from tests.families import FAMILIES, MIXTURES, overrides
from tests.helpers import lm_logits
from tests.test_lora_variants import variant_config
from tests.test_objectives import GRPO_SMALL, LETTERS, letters  # noqa: F401 (a fixture)

VLLM = ["objective.generation_backend=vllm", "+objective.vllm.engine_args.enforce_eager=true"]
SETTINGS = {"dtype": None, "gpu_memory_utilization": 0.3, "engine_args": {}, "check_tolerance": None}


def trained_adapter(cfg) -> tuple[torch.nn.Module, object]:
    """The config's model with every adapter weight set away from its start (a merge that changes outputs)."""
    torch.manual_seed(0)
    model, tokenizer, _, _ = build_trainable_model(cfg)
    with torch.no_grad():
        for value in model.parameters():
            if value.requires_grad:
                value.add_(torch.randn_like(value) * 0.05)
    return model, tokenizer


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(MIXTURES))
def test_the_engine_gets_what_save_pretrained_writes_for_the_merged_policy(
    minimind_dir: Path, tmp_path: Path, name: str
) -> None:
    model, _ = trained_adapter(variant_config(tmp_path, *overrides(name, minimind_dir), "method=lora"))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    weights = checkpoint_weights(model)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # merged into copies only
    copy.deepcopy(model).merge_and_unload().save_pretrained(tmp_path / "merged")
    (saved,) = (tmp_path / "merged").glob("*.safetensors")
    expected = load_file(saved)
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_the_engine_model_gives_the_policy_logits_after_a_sync(tmp_path: Path, stand_in: Path) -> None:
    model, tokenizer = trained_adapter(variant_config(tmp_path, "method=lora", "method.use_dora=true"))
    sampler = VLLMPolicySampler(model, tokenizer, SETTINGS)
    batch = {"input_ids": torch.tensor([tokenizer("Write letters 3:")["input_ids"]])}
    assert not torch.allclose(lm_logits(sampler.engine.base, batch), lm_logits(model.eval(), batch))
    sampler.sync(model, batch["input_ids"][0].tolist())
    torch.testing.assert_close(lm_logits(sampler.engine.base, batch), lm_logits(model, batch))
    [engine] = [json.loads(line)["engine"] for line in stand_in.read_text().splitlines()[:1]]
    assert engine["load_format"] == "dummy" and engine["dtype"] == "float32"


def test_an_engine_that_does_not_compute_the_policy_after_a_reload_is_refused(
    tmp_path: Path, stand_in: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose in-place reload leaves the engine off the policy (vLLM 0.32's CPU build on Mixtral)."""
    model, tokenizer = trained_adapter(variant_config(tmp_path, "method=lora"))
    sampler = VLLMPolicySampler(model, tokenizer, SETTINGS)
    reload = sampler.engine.collective_rpc

    def one_tensor_off(method: str, timeout=None, args=(), kwargs=None) -> list:
        weights = dict(kwargs["weights_iterator"])
        weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
        return reload(method, kwargs=kwargs | {"weights_iterator": iter(weights.items())})

    monkeypatch.setattr(sampler.engine, "collective_rpc", one_tensor_off)
    with pytest.raises(
        RuntimeError, match=r"differ from the policy's by .* \(tolerance 0\.01 in torch\.float32\)"
    ):
        sampler.sync(model, tokenizer("Write letters 3:")["input_ids"])


def test_the_check_compares_the_policy_in_its_own_precision_under_mixed_precision(
    tmp_path: Path, stand_in: Path
) -> None:
    """A mixed-precision training step runs in autocast; neither the adapter merge, the engine (in this
    thread) nor the check's forward of the float32 policy may run in bf16 (sharp logits make it show)."""
    model, tokenizer = trained_adapter(variant_config(tmp_path, "method=lora"))
    with torch.no_grad():
        model.get_base_model().model.norm.weight.mul_(16)  # bf16 anywhere: 0.02 off; float32: 1e-6
    sampler = VLLMPolicySampler(model, tokenizer, SETTINGS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampler.sync(model, tokenizer("Write letters 3:")["input_ids"])
    assert sampler.checked


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("prompt_tuning", "PROMPT_TUNING prepends trained virtual tokens"),
        ("adapter", "weights its architecture"),
    ],
)
def test_a_policy_vllm_cannot_serve_is_refused_by_key(
    tmp_path: Path, stand_in: Path, method: str, message: str
) -> None:
    model, tokenizer = trained_adapter(variant_config(tmp_path, f"method={method}"))
    with pytest.raises(ValueError, match=rf"objective\.generation_backend=vllm: .*{message}"):
        VLLMPolicySampler(model, tokenizer, SETTINGS)


def test_refusals_before_any_weights_load(
    tiny_config, stand_in: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config("objective=grpo", "objective.generation_backend=sglang")
    with pytest.raises(ConfigError, match=r"objective\.generation_backend='sglang': one of lmlab, vllm"):
        check(cfg, "train")
    with pytest.raises(ConfigError, match=r"model\.quantization=nf4 with objective\.generation_backend=vllm"):
        check(tiny_config("objective=grpo", *VLLM, "model.quantization=nf4"), "train")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"needs vLLM, which is not installed: pip install 'lmlab\[vllm\]'"):
        check(tiny_config("objective=grpo", *VLLM), "train")


def test_a_run_samples_every_generation_batch_from_the_engine_with_the_current_weights(
    tiny_config,
    tmp_path: Path,
    stand_in: Path,
    letters: list[str],  # noqa: F811
) -> None:
    overrides = [*letters, *GRPO_SMALL, *VLLM, "method=lora", "data.max_train_samples=6", "optim.lr=1e-2"]
    run(tiny_config(*overrides, "test_after_fit=false", "data.max_eval_samples=2", run_dir=tmp_path / "run"))
    log = [json.loads(line) for line in stand_in.read_text().splitlines()]
    engines = [entry for entry in log if "engine" in entry]
    reloads = [entry["reload"]["sum"] for entry in log if "reload" in entry]
    # each request is followed by its answer; the first sync's check asks for a prompt's log-probs once
    pairs = [(entry, log[i + 1]["completions"]) for i, entry in enumerate(log) if "params" in entry]
    checks = [entry for entry, _ in pairs if entry["params"][0]["prompt_logprobs"] is not None]
    asked, answers = zip(*[(entry, answer) for entry, answer in pairs if entry not in checks], strict=True)
    assert len(engines) == len(checks) == 1 and len(reloads) == len(asked) == 3  # 6 prompts, 2 a step
    assert len(set(reloads)) == 3  # each batch sampled with the weights the previous step left
    for request in asked:
        assert [p["n"] for p in request["params"]] == [2, 2] and request["params"][0]["max_tokens"] == 6
        assert len({p["seed"] for p in request["params"]}) == 2
    lengths = {int(r["step"]): r["train/completion_length"] for r in logged_rows(tmp_path / "run")
               if "train/completion_length" in r}  # fmt: skip
    sampled = [sum(len(c) for group in answer for c in group) / 4 for answer in answers]
    assert sorted(lengths) == [0, 1, 2] and [lengths[step] for step in sorted(lengths)] == sampled


def test_more_than_one_training_process_is_refused(tiny_config, stand_in: Path, letters: list[str]) -> None:  # noqa: F811
    cfg = tiny_config(*letters, *GRPO_SMALL, *VLLM)
    model, _, datamodule, _ = build_trainable_model(cfg)
    module = GRPOModule.from_config(model, cfg, datamodule.task)
    module._trainer = SimpleNamespace(world_size=2, estimated_stepping_batches=1)  # two DDP processes
    with pytest.raises(ValueError, match=r"one engine in one training process, not 2"):
        module.on_fit_start()
