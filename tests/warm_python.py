"""Fresh processes without the import bill. Every `python train.py ...` the suite runs pays about 8 s of
imports (torch, Lightning, transformers, Hydra) before any work, and the documented commands alone are over a
hundred runs. A warm server (`python -m tests.warm_python`, one per pytest worker and environment) imports
those libraries once, then forks a child per command that runs it as the interpreter would
(bench/helpers/forked.py: the command's working directory, environment, argv and output files, the script or
module as `__main__`, the interpreter's ending). The libraries are imported with the command's own
environment (a server serves one environment, but for PER_RUN variables, which each child sets), so what they
read as they load is what a cold start reads. The server imports no lmlab module (bench/helpers/forked.py
imports only the standard library).
tests/test_warm_python.py checks a warm run against a cold run of the same command, file for file.

`run` is the client: it answers with the `subprocess.CompletedProcess` a `subprocess.run` would give."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.helpers.forked import run_child

# what every entrypoint imports before it starts work (its import chain: runtime.session, the Lightning
# modules, modeling.models); lmlab's own modules are imported by each child
WARM_MODULES = (
    "torch",
    "lightning.pytorch",
    "transformers",
    "peft",
    "hydra",
    "omegaconf",
    "safetensors.torch",
)
ROOT = Path(__file__).resolve().parent.parent
# variables no library reads as it is imported, which differ from run to run: set in each child only
PER_RUN = {"PYTEST_CURRENT_TEST"}
MAX_SERVERS = 3  # per pytest worker; the least recently used one is stopped beyond that


# -- the server (python -m tests.warm_python)
# -----------------------------------------------------------------------------


def serve() -> None:
    """Import WARM_MODULES, then for each JSON request on stdin fork a child that runs it; answer the child's
    pid, then its exit code (as subprocess reports it: -N for signal N)."""
    for name in WARM_MODULES:
        importlib.import_module(name)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request, own_group=True)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# -- the client
# -------------------------------------------------------------------------------------------------------

_servers: dict[tuple, subprocess.Popen] = {}


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`python <argv>` in `cwd` with exactly `env`, run by a warm server; raises TimeoutExpired (after
    killing the run and everything it started) past `timeout` seconds."""
    server = _server(env)
    with tempfile.TemporaryDirectory(prefix="warm-") as scratch:
        out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        pid = json.loads(_answer(server))["pid"]
        command = [sys.executable, *argv]
        if not select.select([server.stdout], [], [], timeout)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _answer(server)
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
        returncode = json.loads(_answer(server))["returncode"]
        return subprocess.CompletedProcess(command, returncode, out.read_text(), err.read_text())


def _answer(server: subprocess.Popen) -> str:
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the warm python server stopped (exit code {server.wait()})")
    return line


def _server(env: dict[str, str]) -> subprocess.Popen:
    """The live server for `env`, started (and its imports done) on first use."""
    key = tuple(sorted((name, value) for name, value in env.items() if name not in PER_RUN))
    server = _servers.pop(key, None)
    if server is None or server.poll() is not None:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.warm_python"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
    _servers[key] = server  # most recently used last
    while len(_servers) > MAX_SERVERS:
        _stop(_servers.pop(next(iter(_servers))))
    return server


def _stop(server: subprocess.Popen) -> None:
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


@atexit.register
def _stop_all() -> None:
    while _servers:
        _stop(_servers.popitem()[1])


if __name__ == "__main__":
    serve()
