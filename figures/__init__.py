"""Every figure lmlab draws, in one package below every other layer (it imports nothing of lmlab's: each
function takes plain data and a path and writes a PNG): the figures of training and evaluation runs (runs.py:
sweeps, SVD-LoRA rank maps, confusion matrices, a grid's bar charts) and of the analyses (analysis.py). And
matplotlib set up for them in one place: the non-interactive Agg backend, chosen before pyplot is first
imported, so that plotting works without a display (CI, cluster nodes)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (imported on first use: most runs draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_png(path: Path) -> np.ndarray:
    """A figure's PNG as an RGB array [H, W, 3] (to log it as an image)."""
    import matplotlib.image

    return matplotlib.image.imread(path)[..., :3]
