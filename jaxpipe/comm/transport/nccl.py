"""Device-to-device transports whose transfers block until both sides take part (NCCL)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from mpi4py import MPI

from jaxpipe.comm import nccl as nccl_setup
from jaxpipe.comm.codec import Codec
from jaxpipe.comm.message import HEADER_LEN, ArraySpec, Kind, MsgKey, tag
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.transport.base import ThreadedTransport, require_thread_multiple
from jaxpipe.comm.transport.device import as_bytes_on_device, from_bytes_on_device, wait_stream, wire_view


class ReadyHandshake(ThreadedTransport):
    """A device-to-device transport whose transfers block until both sides take part (NCCL's
    send/recv): the header travels over MPI, the receiver checks it and answers "ready" over MPI,
    and only then do both sides start the transfer, so no transfer ever waits long for its peer.
    A transfer kernel that spins on the GPU waiting for a peer can otherwise meet a device-wide
    synchronisation on that GPU (buffer import or export, an allocation) while the peer waits for
    this rank in turn, which hangs schedules that send both ways at once (1F1B).

    Subclasses provide the device side: `_alloc`, `_payload_bytes`, `_to_array`, `_transfer_send`,
    `_transfer_recv` (each transfer returns once complete)."""

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 net: NetworkEmulator | None = None, codecs: Mapping[Kind, Codec] | None = None):
        require_thread_multiple()
        self.comm = comm
        super().__init__(stage, world_rank_of, net=net, codecs=codecs)

    @abstractmethod
    def _alloc(self, link: tuple[int, int], nbytes: int) -> Any: ...

    @abstractmethod
    def _to_array(self, buf: Any, spec: ArraySpec) -> jax.Array: ...

    @abstractmethod
    def _transfer_send(self, link: tuple[int, int], buf: Any) -> None: ...

    @abstractmethod
    def _transfer_recv(self, link: tuple[int, int], buf: Any) -> None: ...

    def post_recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> Any:
        hdr = np.zeros(HEADER_LEN, np.int64)
        return self.comm.Irecv([hdr, MPI.INT64_T], source=peer, tag=tag(key, 0)), hdr

    def complete_recv(self, key: MsgKey, peer: int, spec: ArraySpec, handle: Any) -> jax.Array:
        req, hdr = handle
        req.Wait()
        self.check_header(key, peer, spec, hdr)  # The size is right before the transfer is set up.
        link = (peer, self.stage)
        payload = self._alloc(link, spec.nbytes)
        self.comm.Send([np.ones(1, np.int64), MPI.INT64_T], dest=peer, tag=tag(key, 1))  # ready
        self._transfer_recv(link, payload)
        return self._to_array(payload, spec)

    def wire_send(self, state: Any) -> Any:
        key, peer, hdr, buf, _keep = state  # `_keep` holds the source alive until the transfer is done.
        self.comm.Send([hdr, MPI.INT64_T], dest=peer, tag=tag(key, 0))
        self.comm.Recv([np.empty(1, np.int64), MPI.INT64_T], source=peer, tag=tag(key, 1))  # peer ready
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
    # CuPy (DLPack) has no float8 dtypes; bfloat16 travels as its uint16 bits (device.wire_view).
    wire_dtypes = frozenset(d for d in ThreadedTransport.wire_dtypes if not d.startswith("float8"))

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 net: NetworkEmulator | None = None, codecs: Mapping[Kind, Codec] | None = None,
                 links: Iterable[tuple[int, int]] | None = None):
        """`links`: the pairs of pipeline ranks that exchange messages (the same list on every
        rank; by default neighbours in a line, and with several chunks per rank the last rank and
        the first too)."""
        cupy, nccl = nccl_setup.load()
        self._cupy, self._nccl = cupy, nccl
        n = comm.Get_size()
        pairs = sorted({(min(a, b), max(a, b)) for a, b in (links or [(i, i + 1) for i in range(n - 1)])})
        # comms[(a, b)]: the communicator carrying messages from pipeline rank a to rank b.
        self._comms: dict[tuple[int, int], Any] = {}
        self._streams: dict[tuple[int, int], Any] = {}
        cupy.cuda.Device(0).use()
        for lo, hi in pairs:  # Every rank sets up its pairs in one global order: no init deadlock.
            if stage not in (lo, hi):
                continue
            for src, dst in ((lo, hi), (hi, lo)):
                self._comms[(src, dst)] = nccl_setup.pair_communicator(comm, stage, lo, hi, tag=900 + src)
                self._streams[(src, dst)] = nccl_setup.new_stream()
        super().__init__(comm, stage, world_rank_of, net, codecs)

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
        return wire_view(x)

    def _payload_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        self._cupy.cuda.Device(0).use()
        return as_bytes_on_device(x)  # Waits for the compute that produced `x`.

    def _to_array(self, buf: Any, spec: ArraySpec) -> jax.Array:
        return from_bytes_on_device(buf, spec)

    def _transfer_send(self, link: tuple[int, int], buf: Any) -> None:
        self._cupy.cuda.Device(0).use()
        stream = self._streams[link]
        self._comms[link].send(buf.data.ptr, int(buf.nbytes), self._nccl.NCCL_UINT8, self._nccl_rank(link),
                               stream.ptr)
        wait_stream(stream)

    def _transfer_recv(self, link: tuple[int, int], buf: Any) -> None:
        self._cupy.cuda.Device(0).use()
        stream = self._streams[link]
        self._comms[link].recv(buf.data.ptr, int(buf.nbytes), self._nccl.NCCL_UINT8, self._nccl_rank(link),
                               stream.ptr)
        wait_stream(stream)

    def close(self) -> None:
        super().close()
        for c in self._comms.values():
            c.destroy()
