"""Checks a composed config before any weights load, so mistakes fail in seconds with a clear message. The
session runs `check(cfg, job_type)` when an entrypoint's run starts: every config rule of that entrypoint is
here (what can only be known once a model or task is loaded is checked where it is loaded: a fresh model
spread over devices in modeling/models.py, offloaded weights in the analyses that differentiate them, a task's
evaluation kind against the vLLM backend)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from omegaconf import DictConfig

from stats import sampled

# the weights train.py's test stage measures: as training ended, or the best-by-validation checkpoint
TEST_CHECKPOINTS = ("last", "best")


class ConfigError(ValueError):
    """The composed config is inconsistent; the message names the config key."""


ACCELERATORS = ("auto", "cpu", "cuda")  # evaluate.py's `accelerator`
BACKENDS = ("lmlab", "vllm")  # evaluate.py's `generation.backend`, GRPO's `objective.generation_backend`


def check(cfg: DictConfig, job_type: str) -> None:
    """Every config rule of the entrypoint whose run starts (`job_type`: train, evaluate, analysis)."""
    if (cfg.get("model") or {}).get("scratch") is not None:
        raise ConfigError(
            "model.scratch is now model.architecture (the config.json fields of a fresh model; "
            "model.from_scratch asks for fresh weights in the architecture of a weight source)"
        )
    if job_type == "train":
        check_config(cfg)
    elif job_type == "evaluate":
        check_evaluation(cfg)


def uses_cuda(cfg: DictConfig) -> bool:
    """evaluate.py's `accelerator`: cuda, or auto where a CUDA device is visible."""
    accelerator = cfg.get("accelerator") or "auto"
    return accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())


def check_evaluation(cfg: DictConfig) -> None:
    """evaluate.py's rules: `devices` a positive count, one process for a model sharded by `model.device_map`,
    a known `accelerator` with a device for every process, the k of pass@k within the samples, and what the
    vLLM backend cannot run."""
    devices, device_map = cfg.get("devices", 1), cfg.model.get("device_map")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"devices={devices!r}: the number of evaluation processes, a positive integer")
    if devices > 1 and device_map is not None:
        raise ConfigError(
            f"devices={devices} with model.device_map={device_map}: a model sharded over the "
            "devices runs in one process; set devices=1 or model.device_map=null"
        )
    accelerator = cfg.get("accelerator") or "auto"
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"accelerator={accelerator!r}: auto, cpu or cuda")
    if uses_cuda(cfg) and devices > torch.cuda.device_count():
        raise ConfigError(f"devices={devices}: only {torch.cuda.device_count()} CUDA devices are visible")
    generation = cfg.get("generation") or {}
    if generation:
        try:
            sampled.ks(generation.num_samples, generation.get("k"))
        except ValueError as error:
            raise ConfigError(str(error)) from error
    backend = generation.get("backend") or "lmlab"
    if backend not in BACKENDS:
        raise ConfigError(f"generation.backend={backend!r}: one of {', '.join(BACKENDS)}")
    if backend != "vllm":
        return
    if devices > 1:
        raise ConfigError(
            f"devices={devices} with generation.backend=vllm: vLLM spreads one engine over GPUs itself; "
            "set generation.vllm.tensor_parallel_size (and pipeline_parallel_size) instead"
        )
    if device_map is not None:
        raise ConfigError(
            f"model.device_map={device_map} with generation.backend=vllm: vLLM places the model "
            "itself; set generation.vllm.tensor_parallel_size instead"
        )
    if cfg.model.get("architecture") or cfg.model.get("from_scratch"):
        raise ConfigError(
            f"model '{cfg.model.name}' is a fresh model (model.architecture / model.from_scratch): vLLM "
            "loads "
            "saved weights; train it first and evaluate ckpt=<run dir>"
        )


def check_config(cfg: DictConfig) -> None:
    """train.py's rules: raise ConfigError for a model without weight source, a method that cannot train the
    task, a missing ckpt_path."""
    model = cfg.model
    if model.get("from_ckpt"):
        raise ConfigError(
            "model=from_ckpt is evaluate.py's and the analyses' default (the model a ckpt= run was trained "
            "on); train.py trains a named model: model=<name> (conf/model/)"
        )
    if not (model.get("path") or model.get("architecture") or model.get("gguf") or model.get("hub_id")):
        raise ConfigError(
            f"model '{model.name}' has no weight source: set model.hub_id, model.path or model.architecture"
        )
    if model.get("path") and model.get("architecture"):
        raise ConfigError(
            "model.path and model.architecture are both set: pick one (a saved model or a fresh one)"
        )
    if model.get("device_map") is not None:
        raise ConfigError(
            f"model.device_map={model.device_map}: a model spread over devices is for evaluate.py and the "
            "analyses that read it; train.py shards with trainer=fsdp (docs/scaling.md)"
        )
    from lightning_modules import methods
    from lightning_modules.task_modules import TASK_MODULES, task_module_name

    module, method = task_module_name(cfg), cfg.method
    if (cfg.get("objective") or {}).get("module"):
        check_objective(cfg)
        module = "causal_lm"  # what the method must train: the causal LM's own outputs

    if module not in TASK_MODULES:
        raise ConfigError(
            f"task.module={module}: not a registered task module (lightning_modules/task_modules.py: "
            f"{sorted(TASK_MODULES)})"
        )
    offered = list(cfg.task.get("modules") or [cfg.task.module])
    if module not in offered and not (cfg.get("objective") or {}).get("module"):
        raise ConfigError(
            f"method '{method.name}' trains with the '{module}' module, which task '{cfg.task.name}' "
            f"does not offer (task.modules: {offered}); e.g. method=projection_head needs task=classification"
        )
    supported = methods.supports(method)
    if module not in supported:
        raise ConfigError(
            f"method '{method.name}' cannot train task '{cfg.task.name}': the task uses the '{module}' "
            f"module and the method supports {list(supported)} (lightning_modules/methods/{method.name}.py)"
        )
    _check_data_and_optim(cfg)
    # FSDP state_dict_type=sharded
    sharded = cfg.get("ckpt_path") and _is_sharded_checkpoint(Path(cfg.ckpt_path))
    if cfg.get("ckpt_path") and not sharded and Path(cfg.ckpt_path, "final").is_dir():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a finished run dir; ckpt_path resumes training from a checkpoint "
            f"file ({cfg.ckpt_path}/checkpoints/last.ckpt), ckpt= evaluates or analyses a run "
            "(evaluate.py ckpt=<run dir>)"
        )
    if cfg.get("ckpt_path") and not sharded and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: no such checkpoint file (runs keep them in <run dir>/checkpoints)"
        )
    if cfg.get("ckpt_path") and not sharded and Path(cfg.ckpt_path).stat().st_size == 0:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: the checkpoint file is empty (0 bytes); resume from another "
            f"checkpoint in {Path(cfg.ckpt_path).parent} (last.ckpt.previous or best-*.ckpt)"
        )
    if cfg.get("test_ckpt", "last") not in TEST_CHECKPOINTS:
        raise ConfigError(f"test_ckpt={cfg.test_ckpt}: one of {', '.join(TEST_CHECKPOINTS)}")
    if cfg.trainer.get("fast_dev_run") and cfg.get("ckpt_path"):
        raise ConfigError(
            "trainer=debug (fast_dev_run) writes no checkpoints; drop ckpt_path or use another trainer"
        )


def check_objective(cfg: DictConfig) -> None:
    """objective=grpo|dpo: a task with a reward (or preference pairs whose mapped columns the data has),
    groups of 2 or more completions that divide data.batch_size, known loss and scaling names."""
    from hydra.utils import get_class

    from datamodules.task import Task
    from lightning_modules import policy_losses

    objective, task = cfg.objective, get_class(cfg.task.definition._target_)
    if objective.name == "grpo":
        if task.score is Task.score or (task.reward_score is None and not objective.reward):
            raise ConfigError(
                f"objective=grpo: task '{cfg.task.name}' has no reward (no scorer"
                + (")" if task.score is Task.score else ", and objective.reward names no score of it)")
            )
        group, batch = objective.num_generations, cfg.data.batch_size
        if not isinstance(group, int) or group < 2:
            raise ConfigError(
                f"objective.num_generations={group}: GRPO compares completions within a group of 2 or more"
            )
        if batch % group:
            raise ConfigError(
                f"data.batch_size={batch} is not divisible by objective.num_generations={group}: the batch "
                "counts completions, num_generations per prompt"
            )
        if objective.num_iterations < 1:
            raise ConfigError(f"objective.num_iterations={objective.num_iterations}: at least 1")
        for key, known in (
            ("loss_type", policy_losses.GRPO_LOSS_TYPES),
            ("scale_rewards", policy_losses.REWARD_SCALES),
        ):
            if objective[key] not in known:
                raise ConfigError(f"objective.{key}={objective[key]!r}: one of {', '.join(known)}")
        _check_sampling_backend(cfg)
    elif objective.name == "dpo":
        if not hasattr(task, "tokenize_pairs"):
            raise ConfigError(
                f"objective=dpo trains on preference pairs: task '{cfg.task.name}' has none (use "
                "task=preferences with your file in task.data_files and its columns in task.columns)"
            )
        if objective.loss_type not in policy_losses.DPO_LOSS_TYPES:
            raise ConfigError(
                f"objective.loss_type={objective.loss_type!r}: one of {policy_losses.DPO_LOSS_TYPES}"
            )
        _check_pair_columns(cfg)


def _check_sampling_backend(cfg: DictConfig) -> None:
    """objective.generation_backend: lmlab, or vllm where vLLM is installed and the base is not quantized."""
    import importlib.util

    from modeling.vllm_policy import INSTALL_HINT

    backend = cfg.objective.generation_backend
    if backend not in BACKENDS:
        raise ConfigError(f"objective.generation_backend={backend!r}: one of {', '.join(BACKENDS)}")
    if backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"objective.generation_backend=vllm needs vLLM, which is not installed: {INSTALL_HINT}"
        )
    if cfg.model.get("quantization"):
        raise ConfigError(
            f"model.quantization={cfg.model.quantization} with objective.generation_backend=vllm: the engine "
            "would need the quantized base and the adapter separately; use objective.generation_backend=lmlab"
        )


def _check_pair_columns(cfg: DictConfig) -> None:
    """The first training record of a preference task holds every mapped column (read before any weights)."""
    from omegaconf import OmegaConf

    from datamodules.preferences import pair_text
    from datamodules.sources import load_split

    source = OmegaConf.to_container(cfg.task.definition.source, resolve=True)
    first = load_split(source | {"max_records": 1}, cfg.task.definition.splits.train, "train")[:1]
    for record in first:
        try:
            pair_text(record, cfg.task.columns)
        except ValueError as error:
            raise ConfigError(str(error)) from error


def _check_data_and_optim(cfg: DictConfig) -> None:
    """Batch sizes and lengths are positive; `optim` holds only the keys the task module's optimiser takes."""
    for key in ("batch_size", "eval_batch_size", "max_length"):
        value = (cfg.get("data") or {}).get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"data.{key}={value}: must be a positive integer")
    if "optim" in cfg:
        from lightning_modules.base import OptimisedModule

        accepted = [
            name
            for name in inspect.signature(OptimisedModule.__init__).parameters
            if name not in ("self", "backbone", "metrics_every_n_steps")
        ]  # the last is metrics.every_n_steps
        unknown = sorted(set(cfg.optim) - set(accepted))
        if unknown:
            raise ConfigError(f"optim.{unknown[0]}: unknown optimiser key; optim takes {accepted}")
