"""Test-only Lightning callbacks, passed to the real entrypoint with `+callbacks.<name>._target_=...`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from datamodules.packing import model_inputs


class InterruptAtEpoch(L.Callback):
    """Simulates Ctrl-C at the start of epoch `epoch` (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


class PoisonWeightsAtStep(L.Callback):
    """Sets every trainable weight to NaN before optimizer step `step`, so the loss becomes NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(float("nan"))


class DumpWeightsPerRank(L.Callback):
    """Writes each rank's trainable weights to `<dirpath>/weights_rank<r>.safetensors` at the end of fit."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().clone().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad}
        save_file(state, self.dirpath / f"weights_rank{trainer.global_rank}.safetensors")


class InterruptAtStep(L.Callback):
    """Simulates a kill before optimizer step `step` runs: Ctrl-C (KeyboardInterrupt) or a real SIGKILL of the process."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step, self.kill = step, kill

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt


class FailAtTest(L.Callback):
    """Fails the test stage as it starts (after fit), as a crash in a later stage would."""

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise RuntimeError("the test stage broke")


class RecordOutputs(L.Callback):
    """At the end of fit, writes the first validation batch and the trained module's outputs on it (eval mode) to
    `path`: the LM logits, or the class scores of a classifier."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = next(iter(trainer.datamodule.val_dataloader()))
        batch = {key: value.to(pl_module.device) for key, value in batch.items()}
        pl_module.eval()
        with torch.no_grad():
            outputs = module_outputs(pl_module, batch)
        pl_module.train()
        save_file({"outputs": outputs.contiguous(), **{k: v.contiguous() for k, v in batch.items()}}, self.path)


def module_outputs(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A task module's outputs on `batch`: class scores [B, C] (a classifier), else the LM logits [B, T, V]."""
    if hasattr(module, "predict_classes"):
        return module.predict_classes(batch)
    return lm_logits(module.model, batch)


def lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal LM's logits on a collated batch, padded [B, T, V] or padding-free [1, N, V]."""
    return model(**model_inputs({key: value for key, value in batch.items() if key != "labels"})).logits


def greedy_without_cache(model: torch.nn.Module, tokenizer, prompt: str, steps: int) -> str:
    """The reference greedy decode: a full forward of the whole sequence for every new token, no cache."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)
