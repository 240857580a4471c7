"""Every config composes; bad names and mismatches fail before any weights load, naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import get_class, instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import open_dict
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from modeling import models
from runtime.validate import ConfigError, check_config
from tests.conftest import CONF_DIR, compose_config

MODEL_NAMES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
REQUIRED_MODELS = {
    "smollm2_135m",
    "diffllama",
    "llama",
    "gpt2",
    "gpt2_medium",
    "gpt2_large",
    "gpt2_xl",
    "llama2_7b",
    "llama2_13b",
    "llama2_70b",
    "qwen1_5_7b_chat",
    "tiny_llama",
    "tiny_diffllama",
    "tiny_gpt2",
    "tiny_qwen2",
}


def test_the_required_model_configs_exist() -> None:
    assert set(MODEL_NAMES) >= REQUIRED_MODELS


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_model_config_composes_and_validates(name: str, method: str) -> None:
    cfg = compose_config(f"model={name}", f"method={method}")
    if name == "from_ckpt":  # evaluate.py's default: a ckpt= run's model, else SmolLM2; not one to train
        assert cfg.model.name == "smollm2_135m" and cfg.model.from_ckpt
        with pytest.raises(ConfigError, match="model=from_ckpt is evaluate.py's and the analyses' default"):
            check_config(cfg)
        return
    assert cfg.model.name == name
    if name == "hf_causal_lm":  # a template: the user supplies the hub id
        with pytest.raises(ConfigError, match="model.hub_id"):
            check_config(cfg)
        return
    check_config(cfg)
    assert cfg.model.lora_target_modules is None  # every linear map of the blocks, found in the built model
    # on only where the checkpoint ships its own code
    assert cfg.model.trust_remote_code is (name == "minimind2")


def test_unknown_model_name_lists_the_valid_names() -> None:
    with pytest.raises(MissingConfigException) as error:
        compose_config("model=llama9000")
    message = str(error.value)
    assert "llama9000" in message
    for name in ("tiny_llama", "smollm2_135m", "gpt2_xl"):
        assert name in message


def test_method_that_cannot_train_the_task_module_is_rejected() -> None:
    cfg = compose_config("method=lora")
    with open_dict(cfg):
        cfg.task.module = "classifier"
    with pytest.raises(ConfigError, match="method 'lora' cannot train task 'gsm8k'.*'classifier'"):
        check_config(cfg)


def test_missing_resume_checkpoint_names_ckpt_path(tmp_path) -> None:
    cfg = compose_config(f"ckpt_path={tmp_path}/nope.ckpt")
    with pytest.raises(ConfigError, match="ckpt_path"):
        check_config(cfg)


def test_submitit_slurm_launcher_composes_for_multi_node() -> None:
    cfg = compose_config(
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_fsdp_trainer_wraps_each_decoder_layer() -> None:
    cfg = compose_config("trainer=fsdp", "model=tiny_llama")
    model, _ = models.build(cfg.model)
    strategy = instantiate(cfg.trainer.strategy)(model)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}


def test_debug_trainer_is_a_fast_dev_run() -> None:
    cfg = compose_config("trainer=debug")
    assert cfg.trainer.fast_dev_run == 1
