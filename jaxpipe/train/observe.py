"""What a run shows besides its log lines: the per-rank trace (`--trace`), TensorBoard scalars
(`--tensorboard`), a live progress line on a terminal, and the throughput the step line reports.

The trainer owns none of this: `Observer` is made once after set-up and called at the start and
end of each step, so the step loop stays about steps. TensorBoard (tensorboardX) and the terminal
line (rich) are imported only when asked for.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from jaxpipe.errors import ConfigError
from jaxpipe.runtime.trace import TRACE

# Dense bfloat16 peak FLOP/s per device, by the start of `jax.Device.device_kind` (vendor data sheets).
PEAK_FLOPS = [("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA GH200", 989e12), ("NVIDIA B200", 2250e12),
              ("NVIDIA A100", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10", 125e12)]


@dataclass
class Observe:
    """The command line's observability flags (all off by default)."""

    trace_dir: str | None = None
    trace_steps: str | None = None  # "A:B", 1-based and inclusive; default the last two steps
    tensorboard_dir: str | None = None
    progress: str = "auto"  # auto (on a terminal), on, off


def parse_trace_steps(text: str | None, steps: int) -> range:
    """`A:B` (1-based, inclusive, as the log counts steps), `N`, `A:` or `:B` -> 0-based range."""
    if text is None:
        return range(max(0, steps - 2), steps)
    a, sep, b = text.partition(":")
    try:
        first = int(a) if a.strip() else 1
        last = (int(b) if b.strip() else steps) if sep else first
    except ValueError:
        raise ConfigError(f"--trace-steps {text!r}: expected A:B (steps from 1, inclusive), e.g. 9:10") from None
    if not 1 <= first <= last <= steps:
        raise ConfigError(f"--trace-steps {text!r}: need 1 <= A <= B <= train.steps ({steps})")
    return range(first - 1, last)


# ---- throughput --------------------------------------------------------------------------------------


def peak_flops(device_kind: str) -> float | None:
    return next((f for name, f in PEAK_FLOPS if device_kind.startswith(name)), None)


def peak_memory(devices: list[Any]) -> int | None:
    """The devices' peak allocation where the backend reports one (GPU); on CPU, where the devices'
    buffers live in the process, the process's peak resident memory."""
    from jaxpipe.runtime.devices import peak_memory_bytes

    peak = peak_memory_bytes(devices)
    if peak is None and devices and devices[0].platform == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peak


@dataclass
class Throughput:
    tflops_per_device: float
    mfu: float | None  # where the device's peak is known (GPU)


def throughput(flops_per_token: float, tokens: int, seconds: float, n_devices: int,
               device_kind: str) -> Throughput:
    tflops = flops_per_token * tokens / seconds / n_devices / 1e12
    peak = peak_flops(device_kind)
    return Throughput(tflops, tflops * 1e12 / peak if peak else None)


# ---- the terminal ------------------------------------------------------------------------------------

_LAUNCHERS = {"mpiexec", "mpiexec.hydra", "mpirun", "orterun", "prterun", "prte", "hydra_pmi_proxy", "orted", "prted"}


def _proc(pid: int) -> tuple[str, str, int] | None:
    """(command name, what fd 1 points at, parent pid) of a process, from /proc (Linux)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        out = os.readlink(f"/proc/{pid}/fd/1")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return name, out, ppid


def launcher_terminal() -> str | None:
    """The terminal the MPI launcher of this process writes to, if any: under mpiexec a rank's
    stdout is a pipe to the launcher, which forwards it to the user's terminal. Looks through the
    launcher's processes only (a rank, its proxy, mpiexec), never past them."""
    info = _proc(os.getpid())
    while info is not None:
        info = _proc(info[2])
        if info is None or info[0] not in _LAUNCHERS:
            return None
        if info[1].startswith(("/dev/pts/", "/dev/tty")):
            return info[1]
    return None


def progress_wanted(mode: str, stream: TextIO) -> tuple[bool, str | None]:
    """(show the live line, the terminal it ends up on): `auto` shows it when stdout is a terminal,
    directly or through the MPI launcher; otherwise the plain step lines stay, for grep."""
    if mode == "off":
        return False, None
    tty = None
    if hasattr(stream, "isatty") and stream.isatty():
        tty = os.ttyname(stream.fileno()) if hasattr(stream, "fileno") else None
        return True, tty
    tty = launcher_terminal()
    return (tty is not None or mode == "on"), tty


def _width(tty: str | None) -> int | None:
    if tty is None:
        return None
    try:
        fd = os.open(tty, os.O_RDONLY | os.O_NOCTTY)
        try:
            columns = os.get_terminal_size(fd).columns
            return columns if columns > 0 else None  # a terminal with no size set (e.g. `script`)
        finally:
            os.close(fd)
    except OSError:
        return None


class ProgressLine:
    """One live line at the bottom of the terminal (rich): step/total, ETA, loss, tokens/s; log
    lines are printed above it."""

    def __init__(self, total: int, start: int, stream: TextIO, tty: str | None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=stream, force_terminal=True, width=_width(tty), highlight=False)
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
            console=self.console, transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", tok_s="-")
        self.progress.start()

    def log(self, line: str) -> None:
        self.console.print(line, markup=False, soft_wrap=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        self.progress.stop()


# ---- TensorBoard -------------------------------------------------------------------------------------


class TensorBoard:
    """Scalars for TensorBoard through tensorboardX (no TensorFlow), written by global rank 0."""

    def __init__(self, logdir: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs tensorboardX: pip install 'jaxpipe[observe]'") from None
        self.writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_tensorboard() -> None:
    """Before anything starts: the flag's library is installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("--tensorboard needs tensorboardX: pip install 'jaxpipe[observe]'")


# ---- the run's observer ------------------------------------------------------------------------------


class Observer:
    """Made once after set-up on every rank; only global rank 0 writes TensorBoard and the progress line.
    `trace_meta` describes this rank for the trace (stage, replica, config, ...)."""

    def __init__(self, observe: Observe, steps: int, start_step: int, reporter: bool,
                 log: Callable[[str], None], stream: TextIO | None = None):
        self.observe = observe
        self.tb: TensorBoard | None = None
        self.progress: ProgressLine | None = None
        self.log = log
        self.pipeline_bytes = 0  # per step, all replicas (the trainer fills it in)
        if reporter and observe.tensorboard_dir:
            self.tb = TensorBoard(observe.tensorboard_dir)
        if reporter:
            stream = stream or sys.stdout
            show, tty = progress_wanted(observe.progress, stream)
            if show:
                self.progress = ProgressLine(steps, start_step, stream, tty)
                self.log = self.progress.log

    def arm_trace(self, comm: Any, meta: dict[str, Any], steps: int, grads: list[Any]) -> None:
        """Collective: when tracing, offsets to rank 0's clock are measured now, before the steps."""
        if self.observe.trace_dir:
            TRACE.enable(parse_trace_steps(self.observe.trace_steps, steps), self.observe.trace_dir)
        if TRACE.armed:
            TRACE.meta = meta
            TRACE.sync_clocks(comm)
            TRACE.warm(grads)

    def step_done(self, step: int, loss: float, tokens_per_s: float, scalars: dict[str, float | None]) -> None:
        if self.progress is not None:
            self.progress.update(step, loss, tokens_per_s)
        if self.tb is not None:
            self.tb.scalars(step, scalars)

    def evaluated(self, step: int, val_loss: float, val_ppl: float) -> None:
        if self.tb is not None:
            self.tb.scalars(step, {"val/loss": val_loss, "val/perplexity": val_ppl})

    def close(self, write_trace: bool = True) -> None:
        """`write_trace`: the run ended normally (or stopped on every rank together), so the
        computations of a window it ended inside have all finished."""
        if self.observe.trace_dir and TRACE.armed:
            if write_trace and TRACE.written is None and TRACE.events:
                TRACE.write()
            TRACE.enabled = TRACE.armed = False
        if self.progress is not None:
            self.progress.close()
        if self.tb is not None:
            self.tb.close()
