"""Distributed strategies that need the model to be built (FSDP wraps each decoder layer)."""

from __future__ import annotations

import torch
from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp._common_utils import clean_tensor_name


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """Module classes named by the model's `_no_split_modules` (its transformer blocks)."""
    base = getattr(model, "get_base_model", lambda: model)()
    names = set(getattr(base, "_no_split_modules", None) or [])
    classes = {type(module) for module in base.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(f"{type(base).__name__} declares no _no_split_modules; FSDP cannot pick its wrap units")
    return classes


class LayerFSDPStrategy(FSDPStrategy):
    """FSDP with one unit per decoder layer, optionally with activation checkpointing of those layers (through
    the model's own `gradient_checkpointing_enable`, which knows how its layers are called). Also runs on CPU
    processes over gloo: Lightning refuses only the exact FSDPStrategy type on a CPU accelerator, and torch FSDP
    shards CPU tensors once it is told the device."""

    def __init__(self, model: torch.nn.Module, activation_checkpointing: bool = False, **kwargs) -> None:
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        super().__init__(auto_wrap_policy=decoder_layer_classes(model), **kwargs)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning passes device_id=root_device.index, None on CPU, which torch FSDP reads as "use the accelerator"
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs)


    def full_state_dict(self) -> dict:
        """Every weight of the module, gathered to rank 0 (other ranks get an empty dict); all ranks must call it."""
        if self.root_device.type != "cpu":
            with _get_full_state_dict_context(self.model, world_size=self.world_size):  # offloads to CPU as it gathers
                return self.model.state_dict()
        # torch's full state dict with offload_to_cpu=True crashes on CPU shards; on CPU there is nothing to offload
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()

    def lightning_module_state_dict(self) -> dict:
        """The module's weights as a single-device run saves them: a frozen base keeps only its trainable ones."""
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        state = self.full_state_dict()
        module = self.lightning_module
        if not getattr(module, "base_is_frozen", False):
            return state
        trainable = {clean_tensor_name(name) for name, p in module.named_parameters() if p.requires_grad}
        return {key: value for key, value in state.items() if key in trainable}


def fsdp(model: torch.nn.Module, activation_checkpointing: bool = False, **kwargs) -> FSDPStrategy:
    """FSDP with one unit per decoder layer, optionally with activation checkpointing of those layers."""
    return LayerFSDPStrategy(model, activation_checkpointing, **kwargs)
