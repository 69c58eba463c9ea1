"""What every transport shares: message keys and headers, the executor's interface, and the
sender/receiver threads around four wire operations.

The executor posts receives ahead (`expect`) and hands outputs to `send`, which returns at once.
Per peer rank, a sender thread waits for each device result and puts it on the wire, and a
receiver thread completes posted receives in order and has the array on the device before the task
that needs it runs. Every payload is preceded by a small header carrying (step, micro-batch, kind,
chunk, bytes, dtype, codec), checked on arrival: a message never silently lands in the wrong slot,
and a shape, dtype or codec disagreement names both ranks. Peers are pipeline ranks (positions in
the pipeline communicator): with several model chunks per rank (interleaved and V-shaped
schedules) any rank may talk to any other, the last rank back to the first included.
"""

from __future__ import annotations

import functools
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.comm.codec import Codec, Identity, codec_name
from jaxpipe.comm.message import DTYPES, MAGIC, ArraySpec, Kind, MsgKey, make_header, parse_header
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.errors import ConfigError, TransportError
from jaxpipe.runtime.trace import TRACE


class Transport(ABC):
    """What the executor needs from a transport; `peer` is a stage index within the pipeline."""

    name = "?"

    @abstractmethod
    def expect(self, key: MsgKey, peer: int, spec: ArraySpec) -> None:
        """Posts the receive for `key` now, so the data can arrive while this stage computes."""

    @abstractmethod
    def recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> jax.Array:
        """Blocks until `key` has arrived and returns it on this process's device(s)."""

    @abstractmethod
    def send(self, key: MsgKey, peer: int, x: jax.Array) -> None:
        """Returns at once; the send completes in the background."""

    @abstractmethod
    def flush(self) -> None:
        """Waits until every send has completed; re-raises errors of the background threads."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases background resources."""


class _Future:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def result(self, timeout: float | None = None) -> Any:
        """Raises TimeoutError if nothing arrived within `timeout` seconds (None: waits forever)."""
        if not self._done.wait(timeout):
            raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


class ThreadedTransport(Transport):
    """Sender and receiver threads around four wire operations that subclasses provide."""

    def __init__(self, stage: int, world_rank_of: Callable[[int], int],
                 to_device: Callable[[np.ndarray], jax.Array] | None = None, net: NetworkEmulator | None = None,
                 codecs: Mapping[Kind, Codec] | None = None):
        self.stage = stage
        self.net = net
        self.codecs: dict[Kind, Codec] = {kind: (codecs or {}).get(kind) or Identity() for kind in Kind}
        self._world_rank_of = world_rank_of
        self._to_device = to_device or jax.device_put
        self._pending: dict[MsgKey, _Future] = {}
        # One sender and one receiver thread per peer: a message waiting for one peer (its
        # compute, or its readiness to receive) never holds up traffic with another.
        self._send_qs: dict[int, queue.Queue[Any]] = {}
        self._recv_qs: dict[int, queue.Queue[Any]] = {}
        self._send_error: BaseException | None = None
        self._send_handles: list[Any] = []
        self._handles_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._bytes = 0  # put on the wire (headers included) since the last `take_bytes`
        self._bytes_lock = threading.Lock()

    # Wire dtypes this transport can put on a link (the header names them; NCCL's CuPy views cannot
    # take float8 arrays). Every built-in codec sends uint8 or the compute dtype.
    wire_dtypes: frozenset[str] = frozenset(DTYPES)

    def check_codecs(self, spec: ArraySpec) -> None:
        """Before anything compiles: every codec's wire array for messages of `spec` is one this
        transport carries."""
        for kind, codec in self.codecs.items():
            wire = codec.wire_spec(spec)
            if wire.dtype not in self.wire_dtypes:
                key = "parallel.act_codec" if kind == Kind.ACT else "parallel.act_grad_codec"
                raise ConfigError(f"{key}={codec.name} sends {wire.dtype} arrays, which the {self.name} transport "
                                  f"cannot carry (it carries {', '.join(sorted(self.wire_dtypes))}): choose "
                                  f"another codec or transport")

    def take_bytes(self) -> int:
        """Bytes this rank put on its links since the last call (payloads and headers)."""
        with self._bytes_lock:
            n, self._bytes = self._bytes, 0
        return n

    def _queue(self, qs: dict[int, queue.Queue[Any]], peer: int, loop: Callable[[queue.Queue[Any]], None],
               name: str) -> queue.Queue[Any]:
        q = qs.get(peer)
        if q is None:  # Only the main thread creates queues and threads.
            q = qs[peer] = queue.Queue()
            t = threading.Thread(target=loop, args=(q,), name=f"jaxpipe-{name}-{peer}", daemon=True)
            self._threads.append(t)
            t.start()
        return q

    def who(self, stage: int) -> str:
        return f"stage {stage} (rank {self._world_rank_of(stage)})"

    # -- wire operations (run on the background threads, except post_recv) ------------------------
    @abstractmethod
    def post_recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> Any:
        """Called on the main thread by `expect`; returns a handle for `complete_recv`."""

    @abstractmethod
    def complete_recv(self, key: MsgKey, peer: int, spec: ArraySpec, handle: Any) -> jax.Array:
        """Receiver thread: waits for the message, checks its header, returns it on the device."""

    @abstractmethod
    def _payload_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        """Sender thread: (the bytes of `x` to put on the wire, what must stay alive with them),
        once `x` has been computed (this waits for it)."""

    def stage_send(self, key: MsgKey, peer: int, x: jax.Array, dtype: str, codec: int) -> tuple[int, Any]:
        """Sender thread: waits for `x` (what `prepare_send` returned for a wire array of `dtype`,
        encoded with codec number `codec`) and readies it for the wire; returns (bytes, state), the
        state (key, peer, header, payload, what keeps the payload alive) for `wire_send`."""
        payload, keep = self._payload_bytes(x)
        hdr = make_header(key, int(payload.nbytes), dtype, codec)
        return int(payload.nbytes) + hdr.nbytes, (key, peer, hdr, payload, keep)

    @abstractmethod
    def wire_send(self, state: Any) -> Any:
        """Puts a staged message on the wire (at once, or when the emulated link delivers it);
        returns something `finish_sends` waits on. Must not block for long."""

    @abstractmethod
    def finish_sends(self, handles: list[Any]) -> None:
        """Main thread, at `flush`: waits for the given sends to complete."""

    def prepare_send(self, x: jax.Array) -> jax.Array:
        """Main thread, at `send`: whatever device work the send needs is queued here, right
        behind the compute that produced `x` (from the sender thread it would queue behind the
        next task's compute and delay the message by a whole task). Returns what the sender
        thread gets."""
        return x

    # -- executor interface --------------------------------------------------------------------------
    # Longest `recv` waits, in seconds (None: forever); jaxpipe.runtime.watchdog keeps it at the run's deadline.
    recv_timeout: float | None = None

    def expect(self, key: MsgKey, peer: int, spec: ArraySpec) -> None:
        """`spec` is the decoded array's; what is posted is the codec's wire array."""
        if key in self._pending:
            return
        fut = _Future()
        self._pending[key] = fut
        wire = self.codecs[key.kind].wire_spec(spec, key)
        q = self._queue(self._recv_qs, peer, self._recv_loop, "recv")
        q.put((key, peer, wire, self.post_recv(key, peer, wire), fut))

    def recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> jax.Array:
        """Waits at most `recv_timeout`: a peer that died or hung must end the job with a message
        naming it, not leave this rank blocked for ever. Decodes on the main thread, so the decode
        is queued on the device right ahead of the program that consumes it."""
        self.expect(key, peer, spec)
        try:
            wire = self._pending.pop(key).result(self.recv_timeout)
            return self.codecs[key.kind].decode(wire, spec, key)
        except TimeoutError:
            raise TransportError(
                f"receive deadline: {self.who(self.stage)} waited {round(self.recv_timeout or 0.0, 1):g} s for "
                f"{self.message_name(key)} "
                f"from {self.who(peer)}: that rank is dead, hung or far slower (deadline: runtime.comm_timeout_s, "
                f"or runtime.first_step_timeout_s in a run's first step)") from None

    @staticmethod
    def message_name(key: MsgKey) -> str:
        """`key` in the log's terms: steps counted from 1, evaluations named as such."""
        what = "activation" if key.kind == Kind.ACT else "gradient"
        when = f"step {key.step + 1}" if key.step >= 0 else f"the evaluation after step {-key.step - 1}"
        return f"the {what} of micro-batch {key.microbatch} of {when}"

    def send(self, key: MsgKey, peer: int, x: jax.Array) -> None:
        if self._send_error is not None:
            raise self._send_error
        codec = self.codecs[key.kind]
        wire = codec.encode(x, key)
        q = self._queue(self._send_qs, peer, self._send_loop, "send")
        q.put((key, peer, self.prepare_send(wire), jnp.dtype(wire.dtype).name, codec.code))

    def flush(self) -> None:
        for q in list(self._send_qs.values()):
            q.join()
        if self.net is not None:  # this transport's sends only (a DP exchange may be in flight)
            self.net.drain(owner=self)
        if self._send_error is not None:
            raise self._send_error
        self.finish_sends(self._take_send_handles())
        for codec in self.codecs.values():
            codec.flush()

    def close(self) -> None:
        for q in [*self._send_qs.values(), *self._recv_qs.values()]:
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        for codec in self.codecs.values():
            getattr(codec, "close", lambda: None)()

    # -- threads -------------------------------------------------------------------------------------
    _POLL_S = 0.0005

    def _add_handle(self, handle: Any) -> None:
        if handle is not None:
            with self._handles_lock:
                self._send_handles.append(handle)

    def _take_send_handles(self) -> list[Any]:
        with self._handles_lock:
            handles, self._send_handles = self._send_handles, []
        return handles

    def progress_sends(self, handles: list[Any]) -> list[Any]:
        """Sender thread, while sends are in flight: drives them and returns those not yet done.

        MPI moves a large (rendezvous) message only while the sending process is inside an MPI
        call; without this the data of the last send before a long compute would wait for the
        next send or the flush."""
        return handles

    def _send_loop(self, q: queue.Queue[Any]) -> None:
        while True:
            with self._handles_lock:
                busy = bool(self._send_handles)
            try:
                item = q.get(timeout=self._POLL_S if busy else None)
            except queue.Empty:
                with self._handles_lock:
                    self._send_handles = self.progress_sends(self._send_handles)
                continue
            try:
                if item is None:
                    return
                key, peer, x, dtype, codec = item
                nbytes, state = self.stage_send(key, peer, x, dtype, codec)
                if TRACE.enabled:  # The computed output is on the host (or ready on the device).
                    TRACE.ready(key.step, key.short(), self._world_rank_of(self.stage), self._world_rank_of(peer))
                with self._bytes_lock:
                    self._bytes += nbytes
                if self.net is None:
                    self._wire_send_traced(key, peer, state)
                else:  # Leaves when the emulated link is free, arrives one delay later.
                    self.net.send(self._world_rank_of(peer), nbytes, functools.partial(self._wire_send_traced, key,
                                                                                       peer, state), owner=self)
            except BaseException as e:  # Surfaced on the main thread at the next send or flush.
                self._send_error = e
            finally:
                q.task_done()

    def _wire_send_traced(self, key: MsgKey, peer: int, state: Any) -> None:
        self._add_handle(self.wire_send(state))
        if TRACE.enabled:
            TRACE.sent(key.step, key.short(), self._world_rank_of(self.stage), self._world_rank_of(peer))

    def _recv_loop(self, q: queue.Queue[Any]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            key, peer, spec, handle, fut = item
            try:
                fut.set(self.complete_recv(key, peer, spec, handle))
                if TRACE.enabled:
                    TRACE.arrived(key.step, key.short(), self._world_rank_of(peer), self._world_rank_of(self.stage))
            except BaseException as e:
                fut.set(error=e)

    def check_header(self, key: MsgKey, peer: int, spec: ArraySpec, hdr: np.ndarray) -> None:
        """Before the payload is used: a message in the wrong slot, of the wrong size or in another
        codec would otherwise be silently trained on. `spec` is the expected wire array."""
        sender, me, name = self.who(peer), self.who(self.stage), self.message_name
        parsed = parse_header(hdr)
        if parsed is None:
            raise TransportError(f"corrupt message header from {sender} to {me} while waiting for {name(key)} "
                                 f"(header words {[int(v) for v in hdr]}, magic {MAGIC})")
        _, got, nbytes, dtype, codec = parsed
        if got != key:
            raise TransportError(f"{me} expected {name(key)} from {sender} but received {name(got)}")
        mine = self.codecs[key.kind]
        if codec != mine.code:
            raise TransportError(
                f"{sender} sent {name(key)} encoded with codec {codec_name(codec)}, but {me} decodes "
                f"{'activations' if key.kind == Kind.ACT else 'gradients'} with {mine.name}: every rank must use "
                f"the same parallel.act_codec and parallel.act_grad_codec")
        if nbytes != spec.nbytes or dtype != spec.dtype:
            raise TransportError(
                f"{sender} sent {name(key)} as {nbytes} bytes of {dtype}, but {me} expects "
                f"{spec} ({spec.nbytes} bytes)"
            )


def require_thread_multiple() -> None:
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise ConfigError(
            "the MPI library does not provide MPI_THREAD_MULTIPLE, which jaxpipe's transports need "
            "(their background threads call MPI while the main thread does)"
        )
