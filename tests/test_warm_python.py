"""The warm server (tests/warm_python.py) runs a command as a cold `python` would: same argv, directory,
environment, output, exit code (signals included), atexit handlers and threads; and an entrypoint's run is
the cold run's, number for number."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.results import logged_rows
from tests import warm_python
from tests.conftest import TINY, launch

CLOCKS = re.compile(r"time|per_sec|flops|mfu")
SCRIPT = """
import atexit, json, os, sys, threading, time

def late():
    time.sleep(0.2)
    print("thread done", flush=True)

atexit.register(lambda: print("atexit ran"))
threading.Thread(target=late).start()
seen = {"x": os.environ.get("LMLAB_X"), "test": os.environ.get("PYTEST_CURRENT_TEST")}
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), **seen, "main": __name__}))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(3)
if how == "raise":
    raise ValueError("broken on purpose")
if how == "interrupt":
    raise KeyboardInterrupt
if how == "kill":
    os.kill(os.getpid(), 9)
if how == "hang":
    time.sleep(600)
"""


def both(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(cold, warm) runs of `python <argv>` in tmp_path with LMLAB_X set."""
    env = {**os.environ, "LMLAB_X": "seen"}
    cold = subprocess.run(
        [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    return cold, warm_python.run(list(argv), tmp_path, env, timeout=120)


@pytest.mark.parametrize("how", ["ok", "exit", "raise", "interrupt", "kill"])
def test_a_script_ends_as_it_would_cold(tmp_path: Path, how: str) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    cold, warm = both(tmp_path, "script.py", how)
    assert (
        warm.returncode
        == cold.returncode
        == {"ok": 0, "exit": 3, "raise": 1, "interrupt": -2, "kill": -9}[how]
    )
    assert warm.stdout == cold.stdout
    first = json.loads(warm.stdout.splitlines()[0])
    assert first == {
        "argv": ["script.py", how],
        "cwd": str(tmp_path),
        "x": "seen",
        "test": os.environ["PYTEST_CURRENT_TEST"],  # set anew for every test, on one server
        "main": "__main__",
    }
    if how != "kill":
        assert "thread done" in warm.stdout and warm.stdout.rstrip().endswith("atexit ran")
    assert warm.stderr.startswith("to stderr")
    if how == "raise":
        assert "ValueError: broken on purpose" in warm.stderr and "Traceback" in warm.stderr


def test_a_module_runs_as_main_with_its_arguments(tmp_path: Path) -> None:
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "__init__.py").write_text("")
    (tmp_path / "tool" / "cli.py").write_text(
        textwrap.dedent("""
        import json, sys
        print(json.dumps({"argv": sys.argv[1:], "main": __name__, "path0": sys.path[0]}))
        """)
    )
    cold, warm = both(tmp_path, "-m", "tool.cli", "a=1")
    assert warm.returncode == cold.returncode == 0
    assert (
        json.loads(warm.stdout)
        == json.loads(cold.stdout)
        == {
            "argv": ["a=1"],
            "main": "__main__",
            "path0": str(tmp_path),
        }
    )


def test_a_run_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    with pytest.raises(subprocess.TimeoutExpired):
        warm_python.run(["script.py", "hang"], tmp_path, {**os.environ}, timeout=3)
    after = warm_python.run(["script.py", "ok"], tmp_path, {**os.environ}, timeout=60)
    assert after.returncode == 0  # the server goes on serving


def test_a_training_run_is_the_cold_runs(tmp_path: Path) -> None:
    """The same tiny fine-tuning, warm and cold: every logged number equal (but the clocks')."""
    rows = {}
    for warm in (True, False):
        run_dir = tmp_path / f"warm_{warm}"
        launch(
            "train.py",
            *TINY,
            "model=tiny_llama",
            "method=lora",
            "trainer.max_steps=3",
            "data.batch_size=2",
            f"paths.output_dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            warm=warm,
        )
        rows[warm] = [{k: v for k, v in row.items() if not CLOCKS.search(k)} for row in logged_rows(run_dir)]
    assert len(rows[True]) > 5 and rows[True] == rows[False]
