"""Point-to-point activation and gradient exchange between neighbouring stages.

All transports share one shape (`ThreadedTransport`): the executor posts receives ahead
(`expect`) and hands outputs to `send`, which returns at once. Per neighbour, a sender thread
waits for each device result and puts it on the wire, and a receiver thread completes posted
receives in order and has the array on the device before the task that needs it runs. Every payload is preceded
by a small header carrying (step, micro-batch, kind, bytes, dtype), checked on arrival: a message
never silently lands in the wrong slot, and a shape or dtype disagreement names both ranks.

- `HostStagedMpi` (`parallel.transport=mpi`, MPI not CUDA-aware, and every CPU run): device→host
  copy started asynchronously at `send`, mpi4py Isend/Irecv on host buffers, host→device copy in
  the receiver thread.
- `CudaAwareMpi` (`mpi` where the MPI library reports CUDA support): mpi4py on device buffers.
- `Nccl` (`parallel.transport=nccl`): NCCL send/recv through CuPy directly on the JAX buffers
  (DLPack, no copy), one 2-rank communicator per neighbour pair and direction, with the unique id
  sent over MPI.
"""

from __future__ import annotations

import ctypes
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

from jaxpipe.errors import ConfigError, TransportError
from jaxpipe.netem import NetworkEmulator
from jaxpipe.schedule import Phase
from jaxpipe.stage import ArraySpec
from jaxpipe.timeline import TIMELINE

_MAGIC = 0x4A585050  # "JXPP"
_DTYPES = ["float32", "bfloat16", "float16", "int32", "float64", "uint8"]
_HEADER_LEN = 6


@dataclass(frozen=True)
class MsgKey:
    """Identifies one message of a step: micro-batch `microbatch`'s activation (FWD) or gradient (BWD)."""

    step: int
    microbatch: int
    kind: Phase

    def short(self) -> str:
        return f"{'FB'[int(self.kind)]}{self.microbatch}"

    def describe(self) -> str:
        what = "activation" if self.kind == Phase.FWD else "gradient"
        return f"{what} of micro-batch {self.microbatch} at step {self.step}"


def _tag(key: MsgKey, part: int) -> int:
    return ((key.microbatch * 2 + int(key.kind)) * 2 + part) % 32767


def make_header(key: MsgKey, nbytes: int, dtype: str) -> np.ndarray:
    return np.array([_MAGIC, key.step, key.microbatch, int(key.kind), nbytes, _DTYPES.index(dtype)], np.int64)


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
                 to_device: Callable[[np.ndarray], jax.Array] | None = None, net: NetworkEmulator | None = None):
        self.stage = stage
        self.net = net
        self._world_rank_of = world_rank_of
        self._to_device = to_device or jax.device_put
        self._pending: dict[MsgKey, _Future] = {}
        # One sender and one receiver thread per neighbour: a message waiting for one neighbour
        # (its compute, or its readiness to receive) never holds up traffic with the other.
        self._send_qs: dict[int, queue.Queue[Any]] = {}
        self._recv_qs: dict[int, queue.Queue[Any]] = {}
        self._send_error: BaseException | None = None
        self._send_handles: list[Any] = []
        self._handles_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

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
    def stage_send(self, key: MsgKey, peer: int, x: jax.Array, dtype: str) -> tuple[int, Any]:
        """Sender thread: waits for `x` (what `prepare_send` returned for an array of `dtype`) and
        readies it for the wire; returns (bytes, state)."""

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
    # Longest `recv` waits, in seconds (None: forever); jaxpipe.watchdog keeps it at the run's deadline.
    recv_timeout: float | None = None

    def expect(self, key: MsgKey, peer: int, spec: ArraySpec) -> None:
        if key in self._pending:
            return
        fut = _Future()
        self._pending[key] = fut
        q = self._queue(self._recv_qs, peer, self._recv_loop, "recv")
        q.put((key, peer, spec, self.post_recv(key, peer, spec), fut))

    def recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> jax.Array:
        """Waits at most `recv_timeout`: a peer that died or hung must end the job with a message
        naming it, not leave this rank blocked for ever."""
        self.expect(key, peer, spec)
        try:
            return self._pending.pop(key).result(self.recv_timeout)
        except TimeoutError:
            raise TransportError(
                f"receive deadline: {self.who(self.stage)} waited {round(self.recv_timeout, 1):g} s for "
                f"{self.message_name(key)} "
                f"from {self.who(peer)}: that rank is dead, hung or far slower (deadline: runtime.comm_timeout_s, "
                f"or runtime.first_step_timeout_s in a run's first step)") from None

    @staticmethod
    def message_name(key: MsgKey) -> str:
        """`key` in the log's terms: steps counted from 1, evaluations named as such."""
        what = "activation" if key.kind == Phase.FWD else "gradient"
        when = f"step {key.step + 1}" if key.step >= 0 else f"the evaluation after step {-key.step - 1}"
        return f"the {what} of micro-batch {key.microbatch} of {when}"

    def send(self, key: MsgKey, peer: int, x: jax.Array) -> None:
        if self._send_error is not None:
            raise self._send_error
        q = self._queue(self._send_qs, peer, self._send_loop, "send")
        q.put((key, peer, self.prepare_send(x), jnp.dtype(x.dtype).name))

    def flush(self) -> None:
        for q in list(self._send_qs.values()):
            q.join()
        if self.net is not None:
            self.net.drain()
        if self._send_error is not None:
            raise self._send_error
        self.finish_sends(self._take_send_handles())

    def close(self) -> None:
        for q in [*self._send_qs.values(), *self._recv_qs.values()]:
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)

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
                key, peer, x, dtype = item
                nbytes, state = self.stage_send(key, peer, x, dtype)
                TIMELINE.mark("ready", key.short())
                if self.net is None:
                    self._add_handle(self.wire_send(state))
                    TIMELINE.mark("sent", key.short())
                else:  # Leaves when the emulated link is free, arrives one delay later.
                    self.net.send(self._world_rank_of(peer), nbytes,
                                  lambda st=state: self._add_handle(self.wire_send(st)))
            except BaseException as e:  # Surfaced on the main thread at the next send or flush.
                self._send_error = e
            finally:
                q.task_done()

    def _recv_loop(self, q: queue.Queue[Any]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            key, peer, spec, handle, fut = item
            try:
                fut.set(self.complete_recv(key, peer, spec, handle))
                TIMELINE.mark("arrived", key.short())
            except BaseException as e:
                fut.set(error=e)

    def check_header(self, key: MsgKey, peer: int, spec: ArraySpec, hdr: np.ndarray) -> None:
        """Before the payload is used: a message in the wrong slot or of the wrong size would
        otherwise be silently trained on."""
        magic, step, mb, kind, nbytes, dtype_code = (int(v) for v in hdr)
        sender, me, name = self.who(peer), self.who(self.stage), self.message_name
        if magic != _MAGIC or kind not in (0, 1) or mb < 0 or nbytes < 0:
            raise TransportError(f"corrupt message header from {sender} to {me} while waiting for {name(key)} "
                                 f"(header words {[int(v) for v in hdr]}, magic {_MAGIC})")
        got = MsgKey(step, mb, Phase(kind))
        if got != key:
            raise TransportError(f"{me} expected {name(key)} from {sender} but received {name(got)}")
        dtype = _DTYPES[dtype_code] if 0 <= dtype_code < len(_DTYPES) else f"dtype#{dtype_code}"
        if nbytes != spec.nbytes or dtype != spec.dtype:
            raise TransportError(
                f"{sender} sent {name(key)} as {nbytes} bytes of {dtype}, but {me} expects "
                f"{spec} ({spec.nbytes} bytes)"
            )


def _require_thread_multiple() -> None:
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise ConfigError(
            "the MPI library does not provide MPI_THREAD_MULTIPLE, which jaxpipe's transports need "
            "(their background threads call MPI while the main thread does)"
        )


class HostStagedMpi(ThreadedTransport):
    """mpi4py on host buffers. The three `_payload*` hooks are where CUDA-aware MPI differs."""

    name = "mpi (host-staged)"

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 to_device: Callable[[np.ndarray], jax.Array] | None = None, net: NetworkEmulator | None = None):
        _require_thread_multiple()
        self.comm = comm
        super().__init__(stage, world_rank_of, to_device, net)

    def prepare_send(self, x: jax.Array) -> jax.Array:
        x.copy_to_host_async()
        return x

    def _payload_buffer(self, nbytes: int) -> Any:
        return np.empty(nbytes, np.uint8)

    def _payload_to_array(self, payload: Any, spec: ArraySpec) -> jax.Array:
        return self._to_device(payload.view(jnp.dtype(spec.dtype)).reshape(spec.shape))

    def _payload_of(self, x: jax.Array) -> tuple[Any, Any]:
        """(byte view to send, what must stay alive with it), once `x` is computed."""
        buf = np.ascontiguousarray(np.asarray(x))  # Waits for the device copy; the GIL is released meanwhile.
        return buf.view(np.uint8).reshape(-1), buf

    def post_recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> Any:
        hdr = np.zeros(_HEADER_LEN, np.int64)
        payload = self._payload_buffer(spec.nbytes)
        return (self.comm.Irecv([hdr, MPI.INT64_T], source=peer, tag=_tag(key, 0)),
                self.comm.Irecv([payload, MPI.BYTE], source=peer, tag=_tag(key, 1)), hdr, payload)

    def complete_recv(self, key: MsgKey, peer: int, spec: ArraySpec, handle: Any) -> jax.Array:
        r_hdr, r_pay, hdr, payload = handle
        r_hdr.Wait()
        self.check_header(key, peer, spec, hdr)
        r_pay.Wait()
        return self._payload_to_array(payload, spec)

    def stage_send(self, key: MsgKey, peer: int, x: jax.Array, dtype: str) -> tuple[int, Any]:
        payload, keep = self._payload_of(x)
        hdr = make_header(key, int(payload.nbytes), dtype)
        return int(payload.nbytes) + hdr.nbytes, (key, peer, hdr, payload, keep)

    def wire_send(self, state: Any) -> Any:
        key, peer, hdr, payload, _keep = state
        reqs = [self.comm.Isend([hdr, MPI.INT64_T], dest=peer, tag=_tag(key, 0)),
                self.comm.Isend([payload, MPI.BYTE], dest=peer, tag=_tag(key, 1))]
        return reqs, state  # The buffers stay referenced until the sends complete.

    def finish_sends(self, handles: list[Any]) -> None:
        for reqs, _ in handles:
            MPI.Request.Waitall(reqs)

    def progress_sends(self, handles: list[Any]) -> list[Any]:
        return [h for h in handles if not MPI.Request.Testall(h[0])]


# ---- GPU-resident transports (CuPy is imported lazily: CPU installs never need it) -----------------

def _wait_stream(stream: Any) -> None:
    """Waits for a CuPy stream. CuPy's synchronize releases the GIL while it waits (polling an
    event with sleeps instead measured slower: every wake-up takes the GIL from the main thread)."""
    stream.synchronize()


def _wire_view(x: jax.Array) -> jax.Array:
    """`x` in a dtype CuPy knows (it has no bfloat16: uint16 bits). Dispatched on the main thread."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _as_bytes_on_device(x: jax.Array) -> Any:
    """A CuPy uint8 view of a JAX GPU array (already through `_wire_view`), without a copy."""
    import cupy

    x.block_until_ready()
    return cupy.from_dlpack(x).ravel().view(cupy.uint8), x


def _from_bytes_on_device(buf: Any, spec: ArraySpec) -> jax.Array:
    """The inverse: a JAX array over a CuPy byte buffer (zero-copy through DLPack)."""
    dtype = jnp.dtype(spec.dtype)
    if dtype == jnp.bfloat16:
        arr = jax.dlpack.from_dlpack(buf.view("uint16"))
        return jax.lax.bitcast_convert_type(arr, jnp.bfloat16).reshape(spec.shape)
    return jax.dlpack.from_dlpack(buf.view(dtype.name)).reshape(spec.shape)


def mpi_is_cuda_aware() -> bool:
    """Asks the MPI library itself (Open MPI's MPIX_Query_cuda_support); False where it cannot say."""
    for lib in (None, "libmpi.so.40", "libmpi.so"):
        try:
            fn = ctypes.CDLL(lib).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        return bool(fn())
    return False


class CudaAwareMpi(HostStagedMpi):
    """mpi4py on device buffers; chosen for `transport=mpi` on GPU when the MPI is CUDA-aware."""

    name = "mpi (CUDA-aware)"

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 net: NetworkEmulator | None = None):
        import cupy

        self._cupy = cupy
        super().__init__(comm, stage, world_rank_of, net=net)

    def prepare_send(self, x: jax.Array) -> jax.Array:
        return _wire_view(x)  # Nothing goes through the host.

    def _payload_buffer(self, nbytes: int) -> Any:
        return self._cupy.empty(nbytes, self._cupy.uint8)

    def _payload_to_array(self, payload: Any, spec: ArraySpec) -> jax.Array:
        return _from_bytes_on_device(payload, spec)

    def _payload_of(self, x: jax.Array) -> tuple[Any, Any]:
        return _as_bytes_on_device(x)


class ReadyHandshake(ThreadedTransport):
    """A device-to-device transport whose transfers block until both sides take part (NCCL's
    send/recv): the header travels over MPI, the receiver checks it and answers "ready" over MPI,
    and only then do both sides start the transfer, so no transfer ever waits long for its peer.
    A transfer kernel that spins on the GPU waiting for a peer can otherwise meet a device-wide
    synchronisation on that GPU (buffer import or export, an allocation) while the peer waits for
    this rank in turn, which hangs schedules that send both ways at once (1F1B).

    Subclasses provide the device side: `_alloc`, `_device_bytes`, `_to_array`, `_transfer_send`,
    `_transfer_recv` (each transfer returns once complete)."""

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 net: NetworkEmulator | None = None):
        _require_thread_multiple()
        self.comm = comm
        super().__init__(stage, world_rank_of, net=net)

    @abstractmethod
    def _alloc(self, link: tuple[int, int], nbytes: int) -> Any: ...

    @abstractmethod
    def _device_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        """(byte buffer, what must stay alive with it) for `x`, once `x` has been computed."""

    @abstractmethod
    def _to_array(self, buf: Any, spec: ArraySpec) -> jax.Array: ...

    @abstractmethod
    def _transfer_send(self, link: tuple[int, int], buf: Any) -> None: ...

    @abstractmethod
    def _transfer_recv(self, link: tuple[int, int], buf: Any) -> None: ...

    def post_recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> Any:
        hdr = np.zeros(_HEADER_LEN, np.int64)
        return self.comm.Irecv([hdr, MPI.INT64_T], source=peer, tag=_tag(key, 0)), hdr

    def complete_recv(self, key: MsgKey, peer: int, spec: ArraySpec, handle: Any) -> jax.Array:
        req, hdr = handle
        req.Wait()
        self.check_header(key, peer, spec, hdr)  # The size is right before the transfer is set up.
        link = (peer, self.stage)
        payload = self._alloc(link, spec.nbytes)
        self.comm.Send([np.ones(1, np.int64), MPI.INT64_T], dest=peer, tag=_tag(key, 1))  # ready
        self._transfer_recv(link, payload)
        return self._to_array(payload, spec)

    def stage_send(self, key: MsgKey, peer: int, x: jax.Array, dtype: str) -> tuple[int, Any]:
        buf, keep = self._device_bytes(x)
        hdr = make_header(key, int(buf.nbytes), dtype)
        return int(buf.nbytes) + hdr.nbytes, (key, peer, hdr, buf, keep)

    def wire_send(self, state: Any) -> Any:
        key, peer, hdr, buf, _keep = state  # `_keep` holds the source alive until the transfer is done.
        self.comm.Send([hdr, MPI.INT64_T], dest=peer, tag=_tag(key, 0))
        self.comm.Recv([np.empty(1, np.int64), MPI.INT64_T], source=peer, tag=_tag(key, 1))  # peer ready
        self._transfer_send((self.stage, peer), buf)
        return None

    def finish_sends(self, handles: list[Any]) -> None:
        return None  # wire_send waited for each transfer (it blocks the emulator thread meanwhile).


class Nccl(ReadyHandshake):
    """NCCL send/recv on the JAX buffers through CuPy (DLPack, no copy). Per neighbour pair two 2-rank
    communicators, one per direction, so the sender thread and the receiver thread never share a
    communicator and each sees its operations in the one order the schedule fixes. Every CuPy
    operation runs on this transport's own non-blocking streams: work on CUDA's legacy default
    stream would wait for all of JAX's queued compute and serialise the pipeline."""

    name = "nccl"

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 net: NetworkEmulator | None = None):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as e:
            raise ConfigError(
                f"parallel.transport=nccl needs CuPy with NCCL ({e}); use parallel.transport=mpi") from None
        self._cupy, self._nccl = cupy, nccl
        n = comm.Get_size()
        # comms[(a, b)]: the communicator carrying messages from stage a to stage b (|a - b| = 1).
        self._comms: dict[tuple[int, int], Any] = {}
        self._streams: dict[tuple[int, int], Any] = {}
        cupy.cuda.Device(0).use()
        for lo in range(n - 1):  # Stages set up pairs in one global order: no init deadlock.
            if stage not in (lo, lo + 1):
                continue
            for src, dst in ((lo, lo + 1), (lo + 1, lo)):
                uid = nccl.get_unique_id() if stage == lo else None
                if stage == lo:
                    comm.send(uid, dest=lo + 1, tag=900 + src)
                else:
                    uid = comm.recv(source=lo, tag=900 + src)
                self._comms[(src, dst)] = nccl.NcclCommunicator(2, uid, 0 if stage == lo else 1)
                self._streams[(src, dst)] = cupy.cuda.Stream(non_blocking=True)
        super().__init__(comm, stage, world_rank_of, net)

    def _nccl_rank(self, link: tuple[int, int]) -> int:
        peer = link[0] if link[1] == self.stage else link[1]
        return 0 if peer < self.stage else 1

    def _alloc(self, link: tuple[int, int], nbytes: int) -> Any:
        cp = self._cupy
        cp.cuda.Device(0).use()
        stream = self._streams[link]
        with stream:
            buf = cp.empty(nbytes, cp.uint8)
        return buf  # Used on `stream` only, so no wait for the allocation is needed.

    def prepare_send(self, x: jax.Array) -> jax.Array:
        return _wire_view(x)

    def _device_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        self._cupy.cuda.Device(0).use()
        return _as_bytes_on_device(x)  # Waits for the compute that produced `x`.

    def _to_array(self, buf: Any, spec: ArraySpec) -> jax.Array:
        return _from_bytes_on_device(buf, spec)

    def _transfer_send(self, link: tuple[int, int], buf: Any) -> None:
        self._cupy.cuda.Device(0).use()
        stream = self._streams[link]
        self._comms[link].send(buf.data.ptr, int(buf.nbytes), self._nccl.NCCL_UINT8, self._nccl_rank(link),
                               stream.ptr)
        _wait_stream(stream)

    def _transfer_recv(self, link: tuple[int, int], buf: Any) -> None:
        self._cupy.cuda.Device(0).use()
        stream = self._streams[link]
        self._comms[link].recv(buf.data.ptr, int(buf.nbytes), self._nccl.NCCL_UINT8, self._nccl_rank(link),
                               stream.ptr)
        _wait_stream(stream)

    def close(self) -> None:
        super().close()
        for c in self._comms.values():
            c.destroy()


class NcclPairSum:
    """Sum of one array over a 2-rank MPI communicator, on the GPUs (NCCL through CuPy): the tied
    embedding's gradient between the first and last stage, which through the host costs a
    device→host copy, an MPI exchange and a host→device copy of 412 MB (GPT-3 XL, float32).
    With two ranks a + b = b + a exactly, so both ends get identical bits."""

    def __init__(self, comm: Any):
        import cupy
        from cupy.cuda import nccl

        self._cupy, self._nccl = cupy, nccl
        rank = comm.Get_rank()
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = comm.bcast(uid, root=0)
        cupy.cuda.Device(0).use()
        self._comm = nccl.NcclCommunicator(2, uid, rank)
        self._stream = cupy.cuda.Stream(non_blocking=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        cp = self._cupy
        cp.cuda.Device(0).use()
        x.block_until_ready()
        with self._stream:
            src = cp.from_dlpack(x)
            out = cp.empty_like(src)
        self._comm.allReduce(src.data.ptr, out.data.ptr, src.size, self._nccl.NCCL_FLOAT32, self._nccl.NCCL_SUM,
                             self._stream.ptr)
        _wait_stream(self._stream)
        return jax.dlpack.from_dlpack(out)

    def close(self) -> None:
        self._comm.destroy()


def make_pair_sum(name: str, comm: Any) -> NcclPairSum | None:
    """The device-side tied-embedding sum that goes with transport `name`, if it has one."""
    if name == "nccl" and jax.default_backend() == "gpu":
        return NcclPairSum(comm)
    return None


def make_transport(name: str, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                   to_device: Callable[[np.ndarray], jax.Array] | None = None,
                   single_device: bool = True, net: NetworkEmulator | None = None) -> ThreadedTransport:
    on_gpu = jax.default_backend() == "gpu"
    if name == "nccl":
        if not on_gpu:
            raise ConfigError("parallel.transport=nccl needs GPUs; on CPU use parallel.transport=mpi")
        if not single_device:
            raise ConfigError("parallel.transport=nccl supports one GPU per process; with "
                              "runtime.devices_per_process > 1 use parallel.transport=mpi")
        return Nccl(comm, stage, world_rank_of, net)
    if on_gpu and single_device and mpi_is_cuda_aware():
        return CudaAwareMpi(comm, stage, world_rank_of, net)
    return HostStagedMpi(comm, stage, world_rank_of, to_device, net)


# Kept for callers that name the host-staged transport directly.
MpiTransport = HostStagedMpi
