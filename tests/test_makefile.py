"""The Makefile's venv: built once, rebuilt when pyproject.toml or the torch build it was made with changes
(`TORCH`, `TORCH_INDEX`), never silently kept with another torch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

STAMP = ".venv/.lmlab-installed"


def make(directory: Path, *arguments: str) -> str:
    """Run the venv's recipe with stand-in python and uv that record their arguments; what they recorded."""
    log = directory / "calls.log"
    log.write_text("")
    done = subprocess.run(["make", "-C", str(directory), STAMP, *arguments], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return log.read_text()


def test_another_torch_build_redoes_the_install(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "uv"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls.log"\n')
        (bin_dir / tool).chmod(0o755)
    first = make(tmp_path, "TORCH=torch==2.13.0")
    assert "python -m pip install -q torch==2.13.0" in first and "uv pip install" in first
    assert make(tmp_path, "TORCH=torch==2.13.0") == ""  # the same build: nothing installed again
    other = make(tmp_path, "TORCH=torch==2.6.0", "TORCH_INDEX=https://example.org/cu124")
    assert "python -m pip install -q torch==2.6.0 --index-url https://example.org/cu124" in other
    assert make(tmp_path, "TORCH=torch==2.6.0", "TORCH_INDEX=https://example.org/cu124") == ""
