"""Not a benchmark: `--quick`, a bench script's check of itself. It runs the script's own code path end to end
at its smallest scale (a tiny model, a step or two, one round) and prints every ratio line; each process the
script starts is forked from the script's own (helpers/forked.py), so the check pays no second import bill.
It computes on one thread (a fork of a process whose OpenMP threads have started hangs at its first parallel
region) and caches in a folder of its own, removed at exit (LMLAB_CACHE). Its figures mean nothing. The test
suite runs every script so (tests/test_bench_quick.py). The choice reaches the processes a script starts
through LMLAB_BENCH_QUICK."""

from __future__ import annotations

import argparse
import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from helpers import forked

ENV = "LMLAB_BENCH_QUICK"
ROOT = Path(__file__).resolve().parents[2]


def parse(parser: argparse.ArgumentParser, **smallest: Any) -> argparse.Namespace:
    """Add `--quick` to `parser` and parse the command line; in quick mode (`--quick`, or a process the script
    started in quick mode) the options named in `smallest` take those values, whatever was passed."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the script's own code path at its smallest scale, to check the script: "
        + (", ".join(f"--{name.replace('_', '-')} {value}" for name, value in smallest.items()) or "tiny"),
    )
    args = parser.parse_args()
    if args.quick or on():
        import torch

        if not on():  # the script itself, not a process it started
            cache = tempfile.mkdtemp(prefix="lmlab-quick-cache-")
            atexit.register(_remove_in, os.getpid(), cache)
            os.environ["LMLAB_CACHE"] = cache
        os.environ[ENV], os.environ["OMP_NUM_THREADS"] = "1", "1"
        torch.set_num_threads(1)
        args.quick = True
        for name, value in smallest.items():
            setattr(args, name, value)
    return args


def _remove_in(owner: int, folder: str) -> None:
    """Remove `folder` at the exit of process `owner` (not of the processes forked from it)."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def on() -> bool:
    """Whether this process runs in quick mode."""
    return os.environ.get(ENV) == "1"


def start_python(
    arguments: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen | forked.Started:
    """`python <arguments>` started in the repository root with `env` added to this one's environment, its
    stdout a pipe (text) and its stderr discarded: a new interpreter, or in quick mode a fork of this
    process."""
    environment = {**os.environ, **(env or {})}
    if on():
        return forked.Started(arguments, ROOT, environment)
    return subprocess.Popen(
        [sys.executable, *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=environment,
    )


def run_python(
    arguments: list[str],
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`python <arguments>` in a fresh process with `env` added to this one's environment, its output
    captured: a new interpreter, or in quick mode a fork of this process (where `python` is this
    interpreter). With `check`, a failure raises an error showing the command and the end of its output."""
    environment = {**os.environ, **(env or {})}
    if on() and python == sys.executable:
        done = forked.run(arguments, Path(cwd), environment)
    else:
        command = [python, *arguments]
        done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(map(str, done.args))} exited {done.returncode}:\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done
