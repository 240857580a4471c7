"""Distributed strategies that need the model to be built (FSDP wraps each decoder layer)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
from lightning.pytorch.strategies import FSDPStrategy
from peft.tuners.lora import ParamWrapper
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
)
from torch.distributed.fsdp._common_utils import clean_tensor_name
from torch.optim import Optimizer

from modeling import architecture


class LayerFSDPStrategy(FSDPStrategy):
    """FSDP with one unit per decoder layer, optionally with activation checkpointing of those layers (through
    the model's own `gradient_checkpointing_enable`, which knows how its layers are called). Also runs on CPU
    processes over gloo: Lightning refuses only the exact FSDPStrategy type on a CPU accelerator, and torch
    FSDP shards CPU tensors once it is told the device."""

    def __init__(self, model: torch.nn.Module, activation_checkpointing: bool = False, **kwargs) -> None:
        if any(isinstance(module, ParamWrapper) for module in model.modules()):
            raise ValueError(
                "trainer=fsdp: method=lora adapts this mixture's fused experts through peft's "
                "target_parameters, which re-registers a torch parametrization on them at every forward, and "
                "FSDP's flat parameters break that; set method.target_parameters=[] (adapters on the other "
                "linear maps only) or use trainer=ddp"
            )
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        super().__init__(auto_wrap_policy=architecture.block_classes(model), **kwargs)
        self.wrapped: FullyShardedDataParallel | None = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the module, once: a later stage of the same run (trainer.test after fit) gets the wrapper fit
        trained. Its units hold the sharded weights; wrapping the module again would find them already
        wrapped, and dropping the outer wrapper would leave the module's own weights as shards."""
        if self.wrapped is not None and self.wrapped.module is model:
            return self.wrapped
        if self.root_device.type != "cpu":
            self.wrapped = super()._setup_model(model)
        else:
            # Lightning passes device_id=root_device.index, None on CPU, which torch FSDP reads as "use the
            # accelerator"
            self.wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
        return self.wrapped

    def _full_state_context(self) -> Any:
        """Full (unsharded) state dicts gathered to rank 0: offloaded to CPU as they are gathered on GPUs; on
        CPU without offloading (torch's offload_to_cpu crashes on CPU shards, and there is nothing to
        offload)."""
        if self.root_device.type != "cpu":
            return _get_full_state_dict_context(self.model, world_size=self.world_size)
        return FullyShardedDataParallel.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def full_state_dict(self) -> dict:
        """Every weight of the module, gathered to rank 0 (other ranks get an empty dict); all ranks must call
        it."""
        with self._full_state_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict:
        """The optimizer state keyed by parameter names, as FSDP gathers it. Lightning re-keys it by parameter
        position; a run resumed from that state (AdamW with decay / no-decay groups) left the uninterrupted
        run's losses from the first step after the checkpoint, keyed by names it resumes exactly
        (tests/test_resume.py)."""
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        with self._full_state_context():
            return FullyShardedDataParallel.optim_state_dict(self.model, optimizer)

    def lightning_module_state_dict(self) -> dict:
        """The module's weights as a single-device run saves them: a frozen base keeps only its trainable
        ones."""
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        state = self.full_state_dict()
        module = self.lightning_module
        if not getattr(module, "base_is_frozen", False):
            return state
        trainable = {clean_tensor_name(name) for name, p in module.named_parameters() if p.requires_grad}
        return {key: value for key, value in state.items() if key in trainable}
