"""Elastic restarts: which hosts are still usable, and what to launch on them.

    jaxpipe supervise --elastic --hosts hosts.txt [--probe CMD] -- \\
        mpiexec -f {hostfile} -n {n} jaxpipe train --config run.yaml      # run.yaml: parallel.dp: auto

How supervise learns which host died: before every attempt (the first one included) it re-reads the
hosts file (so an operator or a node-health agent can take a host out, or put one back) and runs the
probe command for every host (`{host}` substituted; by default `ssh -o BatchMode=yes -o
ConnectTimeout=10 {host} true`; the host supervise runs on is not probed). A host whose probe fails or
does not answer within the probe timeout is left out. The job's failure only says that something
died; the probe says which machine is gone, and a machine that answers again is used again.

A layout function turns the usable hosts into a `Launch`: how many ranks, the hosts in rank order
(written as the hostfile that `{hostfile}` names) and extra `--set` overrides for the job. The default,
`even_replicas`, keeps parallel.pp and takes the most replicas D the slots allow with D × micro-batch
dividing the global batch; the job, launched with parallel.dp=auto, finds D = N / PP itself and resumes
from the newest checkpoint (which loads into any partition and replica count) with the same global
batch, spread over more micro-batches per replica. A layout function is also the seam for a placement
planner: given the survivors it may return another host order and placement overrides.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from jaxpipe.errors import ConfigError

DEFAULT_PROBE = "ssh -o BatchMode=yes -o ConnectTimeout=10 {host} true"
PLACEHOLDERS = ("{n}", "{hostfile}", "{hosts}")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int = 1


@dataclass(frozen=True)
class Launch:
    """What one attempt runs: `n` ranks filling `hosts` in order, the job's command plus `overrides`."""

    n: int
    hosts: tuple[Host, ...]
    overrides: tuple[str, ...] = ()  # --set items, e.g. a planner's parallel.placement
    note: str = ""  # for the log, e.g. "PP 2 x DP 1"


# The usable hosts -> a Launch, or a sentence saying why they cannot run the job.
Layout = Callable[[Sequence[Host]], "Launch | str"]

_OPEN_MPI = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)")
_MPICH = re.compile(r"^([^\s:]+)(?::(\d+))?$")


def parse_hosts(text: str, source: str = "the hosts file") -> list[Host]:
    """`host`, `host:slots` (MPICH) or `host slots=N` (Open MPI) per line; `#` starts a comment."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _OPEN_MPI.match(line) or _MPICH.match(line)
        if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ConfigError(f"{source}, line {number}: {raw.strip()!r}: expected 'host', 'host:slots' or "
                              f"'host slots=N' with N >= 1")
        hosts.append(Host(m.group(1), int(m.group(2) or 1)))
    return hosts


def read_hosts(path: str | Path) -> list[Host]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--hosts {path}: {e.strerror or e}") from None
    return parse_hosts(text, f"--hosts {path}")


def hostfile_text(hosts: Sequence[Host]) -> str:
    """MPICH's format (`host:slots`); Open MPI's `mpirun --hostfile` wants `host slots=N`: use {hosts}."""
    return "".join(f"{h.name}:{h.slots}\n" for h in hosts)


def _is_local(name: str) -> bool:
    return name in ("localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn())


def probe(hosts: Sequence[Host], template: str = DEFAULT_PROBE,
          timeout_s: float = 30.0) -> tuple[list[Host], list[tuple[Host, str]]]:
    """(usable hosts in their order, [(left-out host, why)]); the probes run in parallel."""

    def check(host: Host) -> str | None:
        if template == DEFAULT_PROBE and _is_local(host.name):
            return None
        cmd = template.replace("{host}", shlex.quote(host.name))
        try:
            done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"probe `{cmd}` did not answer in {timeout_s:g} s"
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            return f"probe `{cmd}` failed with exit status {done.returncode}" + (f": {said[-1]}" if said else "")
        return None

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
        verdicts = list(pool.map(check, hosts))
    alive = [h for h, why in zip(hosts, verdicts, strict=True) if why is None]
    dead = [(h, why) for h, why in zip(hosts, verdicts, strict=True) if why is not None]
    return alive, dead


def take_slots(hosts: Sequence[Host], n: int) -> tuple[Host, ...]:
    """The first `n` slots of `hosts`, in order (ranks fill hosts in hostfile order)."""
    used, left = [], n
    for h in hosts:
        if left <= 0:
            break
        used.append(Host(h.name, min(h.slots, left)))
        left -= used[-1].slots
    return tuple(used)


def even_replicas(pp: int, global_batch: int, micro_batch: int) -> Layout:
    """The default layout: parallel.pp kept, as many replicas as the slots allow and the batch divides."""

    def layout(hosts: Sequence[Host]) -> Launch | str:
        slots = sum(h.slots for h in hosts)
        for dp in range(slots // pp, 0, -1):
            if global_batch % (dp * micro_batch) == 0:
                return Launch(pp * dp, take_slots(hosts, pp * dp), (), f"PP {pp} x DP {dp}")
        if slots < pp:
            return f"{slots} usable slot(s) are fewer than parallel.pp = {pp}"
        return (f"no replica count up to {slots // pp} divides train.global_batch_size {global_batch} into "
                f"micro-batches of {micro_batch}")

    return layout


def render(cmd: Sequence[str], launch: Launch, hostfile: str | Path) -> list[str]:
    """The job's command for `launch`: {n}, {hostfile} and {hosts} (host:slots,...) filled in, the
    layout's overrides appended as --set items."""
    hosts = ",".join(f"{h.name}:{h.slots}" for h in launch.hosts)
    out = [a.replace("{n}", str(launch.n)).replace("{hostfile}", str(hostfile)).replace("{hosts}", hosts)
           for a in cmd]
    for item in launch.overrides:
        out += ["--set", item]
    return out


@dataclass
class Elastic:
    """What `supervise --elastic` needs: where the hosts are listed, how to probe them, the layout."""

    hosts_file: str | Path
    layout: Layout
    hostfile_out: str | Path
    probe: str = DEFAULT_PROBE
    probe_timeout_s: float = 30.0

    def prepare(self, cmd: Sequence[str], log: Callable[[str], None]) -> tuple[list[str], Launch] | str:
        """The next attempt's command and launch, or why none can run."""
        listed = read_hosts(self.hosts_file)
        alive, dead = probe(listed, self.probe, self.probe_timeout_s)
        for host, why in dead:
            log(f"jaxpipe supervise: host {host.name} ({host.slots} slot(s)) left out: {why}")
        launch = self.layout(alive)
        if isinstance(launch, str):
            return f"{launch} (usable hosts: {', '.join(f'{h.name}:{h.slots}' for h in alive) or 'none'})"
        Path(self.hostfile_out).write_text(hostfile_text(launch.hosts))
        return render(cmd, launch, self.hostfile_out), launch
