"""Resident memory of the benchmarking process: now (VmRSS), and the peak over a block sampled every 5 ms."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def resident_mib() -> float:
    """This process's resident memory (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakMemory:
    """Samples resident memory every 5 ms on a thread; `peak` is the highest value seen."""

    def __init__(self) -> None:
        self.peak, self.running = resident_mib(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_mib())
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
