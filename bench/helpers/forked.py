"""Not a benchmark: `python <argv>` run in a fork of this process instead of a fresh interpreter. The fork
has every library this process imported, so it skips the interpreter's start and its imports (8 s for torch,
Lightning and transformers); otherwise it runs as the interpreter would: the script or module as `__main__`
with its own argv, working directory, environment and output files, ended as the interpreter ends (threads
joined, atexit handlers run, streams flushed; an uncaught Ctrl-C ends it by SIGINT). The bench scripts' quick
modes (helpers/quick.py) and the test suite's warm interpreters (tests/warm_python.py) run commands so."""

from __future__ import annotations

import atexit
import contextlib
import importlib.machinery
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import weakref
from pathlib import Path


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python <argv>` in `cwd` with exactly `env`, in a fork of this process; its output captured, as
    `subprocess.run(..., capture_output=True, text=True)` gives it."""
    with tempfile.TemporaryDirectory(prefix="forked-") as scratch:
        out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request, own_group=False)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(), err.read_text())


class Started:
    """`python <argv>` started in a fork of this process, its stdout a pipe read line by line and its stderr
    discarded, with the part of `subprocess.Popen`'s interface the bench scripts use."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            output = f"/proc/self/fd/{write}"
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": output, "stderr": os.devnull}
            run_child(request, own_group=False)
        os.close(write)
        self.args, self.stdout, self.returncode = [sys.executable, *argv], os.fdopen(read), None

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code; raises subprocess.TimeoutExpired past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self) -> tuple[str, None]:
        """The rest of its output, once it has ended."""
        output = self.stdout.read()
        self.wait()
        return output, None


def run_child(request: dict, own_group: bool) -> None:
    """Run `request` (argv, cwd, env, stdout and stderr paths) in this forked process and exit with its code;
    never returns. `own_group`: start a process group, so that stopping it stops whatever it started."""
    if own_group:
        os.setpgid(0, 0)
    _forget_inherited_finalizers()
    _redirect(0, os.devnull, os.O_RDONLY)
    _redirect(1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # what PYTHONPATH adds goes on the path, as the interpreter puts it there at start
    added = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    sys.path[1:1] = [entry for entry in added if entry not in sys.path]
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


def _forget_inherited_finalizers() -> None:
    """Keep the parent's objects out of this process's exit: their finalizers (a temporary directory's would
    delete the parent's folder) do not run here. The atexit handlers the imported modules registered stay, as
    a fresh interpreter registers them too."""
    for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
        finalizer.atexit = False


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
