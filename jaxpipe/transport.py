"""Point-to-point activation and gradient exchange between neighbouring stages.

`MpiTransport` moves arrays through host memory with mpi4py (host-staged): receives are posted
ahead (`expect`) into fresh buffers, and sends are handed to a background thread that waits for
the device result, copies it to the host and issues `Isend`, so the main thread can dispatch the
next micro-batch's compute meanwhile. Every payload is preceded by a small header carrying
(step, micro-batch, kind, bytes, dtype), checked on arrival: a message never silently lands in the
wrong slot, and a shape or dtype disagreement names both ranks.

Other transports (CUDA-aware MPI, NCCL, link emulation) implement the same four calls.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.errors import TransportError
from jaxpipe.schedule import Phase
from jaxpipe.stage import ArraySpec

_MAGIC = 0x4A585050  # "JXPP"
_DTYPES = ["float32", "bfloat16", "float16", "int32", "float64", "uint8"]
_HEADER_LEN = 6


@dataclass(frozen=True)
class MsgKey:
    """Identifies one message of a step: micro-batch `microbatch`'s activation (FWD) or gradient (BWD)."""

    step: int
    microbatch: int
    kind: Phase

    def describe(self) -> str:
        what = "activation" if self.kind == Phase.FWD else "gradient"
        return f"{what} of micro-batch {self.microbatch} at step {self.step}"


def _tag(key: MsgKey, part: int) -> int:
    return ((key.microbatch * 2 + int(key.kind)) * 2 + part) % 32767


class Transport(ABC):
    """What the executor needs from a transport; `peer` is a stage index within the pipeline."""

    @abstractmethod
    def expect(self, key: MsgKey, peer: int, spec: ArraySpec) -> None:
        """Posts the receive for `key` now, so the data can arrive while this stage computes."""

    @abstractmethod
    def recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> jax.Array:
        """Blocks until `key` has arrived and returns it on this process's device."""

    @abstractmethod
    def send(self, key: MsgKey, peer: int, x: jax.Array) -> None:
        """Returns at once; the send completes in the background."""

    @abstractmethod
    def flush(self) -> None:
        """Waits until every send has been delivered to MPI and completed; re-raises send errors."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases background resources."""


def _header(key: MsgKey, x: np.ndarray) -> np.ndarray:
    return np.array(
        [_MAGIC, key.step, key.microbatch, int(key.kind), x.nbytes, _DTYPES.index(x.dtype.name)], np.int64
    )


class MpiTransport(Transport):
    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int]):
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "the MPI library does not provide MPI_THREAD_MULTIPLE, which the mpi transport needs "
                "(its sender thread calls MPI while the main thread does)"
            )
        self.comm = comm
        self.stage = stage
        self._world_rank_of = world_rank_of
        self._pending: dict[MsgKey, tuple[Any, Any, np.ndarray, np.ndarray]] = {}
        self._queue: queue.Queue[tuple[MsgKey, int, jax.Array] | None] = queue.Queue()
        self._inflight: list[tuple[list[Any], np.ndarray, np.ndarray]] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._send_loop, name="jaxpipe-send", daemon=True)
        self._thread.start()

    def _who(self, stage: int) -> str:
        return f"stage {stage} (rank {self._world_rank_of(stage)})"

    # -- receiving ---------------------------------------------------------------------------------
    def expect(self, key: MsgKey, peer: int, spec: ArraySpec) -> None:
        if key in self._pending:
            return
        hdr = np.zeros(_HEADER_LEN, np.int64)
        payload = np.empty(spec.nbytes, np.uint8)
        r_hdr = self.comm.Irecv([hdr, MPI.INT64_T], source=peer, tag=_tag(key, 0))
        r_pay = self.comm.Irecv([payload, MPI.BYTE], source=peer, tag=_tag(key, 1))
        self._pending[key] = (r_hdr, r_pay, hdr, payload)

    def recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> jax.Array:
        self.expect(key, peer, spec)
        r_hdr, r_pay, hdr, payload = self._pending.pop(key)
        r_hdr.Wait()
        self._check_header(key, peer, spec, hdr)
        r_pay.Wait()
        return jax.device_put(payload.view(jnp.dtype(spec.dtype)).reshape(spec.shape))

    def _check_header(self, key: MsgKey, peer: int, spec: ArraySpec, hdr: np.ndarray) -> None:
        magic, step, mb, kind, nbytes, dtype_code = (int(v) for v in hdr)
        sender, me = self._who(peer), self._who(self.stage)
        if magic != _MAGIC:
            raise TransportError(f"corrupt message header from {sender} to {me} while waiting for {key.describe()}")
        got = MsgKey(step, mb, Phase(kind))
        if got != key:
            raise TransportError(f"{me} expected {key.describe()} from {sender} but received {got.describe()}")
        dtype = _DTYPES[dtype_code] if 0 <= dtype_code < len(_DTYPES) else f"dtype#{dtype_code}"
        if nbytes != spec.nbytes or dtype != spec.dtype:
            raise TransportError(
                f"{sender} sent {key.describe()} as {nbytes} bytes of {dtype}, but {me} expects "
                f"{spec} ({spec.nbytes} bytes)"
            )

    # -- sending -----------------------------------------------------------------------------------
    def send(self, key: MsgKey, peer: int, x: jax.Array) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((key, peer, x))

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, peer, x = item
                buf = np.ascontiguousarray(np.asarray(x))  # Waits for the device; the GIL is released meanwhile.
                hdr = _header(key, buf)
                reqs = [
                    self.comm.Isend([hdr, MPI.INT64_T], dest=peer, tag=_tag(key, 0)),
                    self.comm.Isend([buf.view(np.uint8).reshape(-1), MPI.BYTE], dest=peer, tag=_tag(key, 1)),
                ]
                with self._lock:
                    self._inflight.append((reqs, hdr, buf))
            except BaseException as e:  # Surfaced on the main thread at the next send or flush.
                self._error = e
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        self._queue.join()
        with self._lock:
            inflight, self._inflight = self._inflight, []
        for reqs, _, _ in inflight:
            MPI.Request.Waitall(reqs)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
