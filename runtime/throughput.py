"""Lightning's ThroughputMonitor with a peak FLOP/s on every device, so that MFU is logged on a CPU too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor

from modeling.flops import measured_peak_flops


class PeakThroughputMonitor(ThroughputMonitor):
    """steps/s, samples/s, tokens/s and, from the module's `flops_per_batch`, FLOP/s and MFU against the
    device's peak: Lightning's table on a known GPU, else `peak_flops` if given, else the float32 matmul rate
    measured on the device once per process."""

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int],
        length_fn: Callable[[Any], int] | None = None,
        peak_flops: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size_fn, length_fn, **kwargs)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None:
            self.available_flops = self.peak_flops or measured_peak_flops(trainer.strategy.root_device)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops
