"""Fresh processes without the import bill. Every `python train.py ...` the suite runs pays about 8 s of
imports (torch, Lightning, transformers, Hydra) before any work, and the documented commands alone are over a
hundred runs. A warm server (`python -m tests.warm_python`, one per pytest worker and environment) imports
those libraries once, then forks a child per command: the child takes the command's working directory,
environment, argv and output files, runs the script or module as `__main__` (as the interpreter does)
and ends as the interpreter would (threads joined, atexit handlers run, streams flushed; an uncaught Ctrl-C
ends it by SIGINT). The libraries are imported with the command's own environment (a server serves one
environment, but for PER_RUN variables, which each child sets), so what they read as they load is what a cold
start reads. The server imports no lmlab module.
tests/test_warm_python.py checks a warm run against a cold run of the same command, file for file.

`run` is the client: it answers with the `subprocess.CompletedProcess` a `subprocess.run` would give."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.machinery
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

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
            _child(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


def _child(request: dict) -> None:
    """Run one command in this forked process and exit with its code; never returns."""
    os.setpgid(0, 0)  # its own group: a timeout stops it and whatever it started
    _redirect(0, os.devnull, os.O_RDONLY)
    _redirect(1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    code, interrupted = 0, False
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            _run_script(argv)
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        interrupted = True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish(code, interrupted)


def _run_script(argv: list[str]) -> None:
    """Run `argv[0]` as the interpreter runs a script: a new `__main__` module whose `__file__` is the
    absolute path, `sys.argv` as given, the script's directory first on the path."""
    script = os.path.abspath(argv[0])
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(script)
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    sys.modules["__main__"] = main
    code = compile(Path(script).read_bytes(), script, "exec")
    exec(code, main.__dict__)


def _redirect(fd: int, path: str, flags: int) -> None:
    target = os.open(path, flags, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _exit_code(code: object) -> int:
    """The exit code the interpreter gives `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _finish(code: int, interrupted: bool) -> None:
    """End as the interpreter ends: join threads, run atexit handlers, flush; a Ctrl-C ends by SIGINT."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter calls at exit
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


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
