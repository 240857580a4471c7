"""Matplotlib for figures written to files, set up in one place: the non-interactive Agg backend, chosen
before pyplot is first imported, so that plotting works without a display (CI, cluster nodes)."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (imported on first use: most runs draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
