"""MPI transports: host-staged (any MPI, every CPU run) and CUDA-aware (device buffers)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.comm.codec import Codec
from jaxpipe.comm.message import HEADER_LEN, ArraySpec, Kind, MsgKey, tag
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.transport.base import ThreadedTransport, require_thread_multiple
from jaxpipe.comm.transport.device import as_bytes_on_device, from_bytes_on_device, wire_view


class HostStagedMpi(ThreadedTransport):
    """mpi4py on host buffers. The three `_payload*` hooks are where CUDA-aware MPI differs."""

    name = "mpi (host-staged)"

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 to_device: Callable[[np.ndarray], jax.Array] | None = None, net: NetworkEmulator | None = None,
                 codecs: Mapping[Kind, Codec] | None = None):
        require_thread_multiple()
        self.comm = comm
        super().__init__(stage, world_rank_of, to_device, net, codecs)

    def prepare_send(self, x: jax.Array) -> jax.Array:
        x.copy_to_host_async()
        return x

    def _payload_buffer(self, nbytes: int) -> Any:
        return np.empty(nbytes, np.uint8)

    def _payload_to_array(self, payload: Any, spec: ArraySpec) -> jax.Array:
        return self._to_device(payload.view(jnp.dtype(spec.dtype)).reshape(spec.shape))

    def _payload_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        """(byte view to send, what must stay alive with it), once `x` is computed."""
        buf = np.ascontiguousarray(np.asarray(x))  # Waits for the device copy; the GIL is released meanwhile.
        return buf.view(np.uint8).reshape(-1), buf

    def post_recv(self, key: MsgKey, peer: int, spec: ArraySpec) -> Any:
        hdr = np.zeros(HEADER_LEN, np.int64)
        payload = self._payload_buffer(spec.nbytes)
        return (self.comm.Irecv([hdr, MPI.INT64_T], source=peer, tag=tag(key, 0)),
                self.comm.Irecv([payload, MPI.BYTE], source=peer, tag=tag(key, 1)), hdr, payload)

    def complete_recv(self, key: MsgKey, peer: int, spec: ArraySpec, handle: Any) -> jax.Array:
        r_hdr, r_pay, hdr, payload = handle
        r_hdr.Wait()
        self.check_header(key, peer, spec, hdr)
        r_pay.Wait()
        return self._payload_to_array(payload, spec)

    def wire_send(self, state: Any) -> Any:
        key, peer, hdr, payload, _keep = state
        reqs = [self.comm.Isend([hdr, MPI.INT64_T], dest=peer, tag=tag(key, 0)),
                self.comm.Isend([payload, MPI.BYTE], dest=peer, tag=tag(key, 1))]
        return reqs, state  # The buffers stay referenced until the sends complete.

    def finish_sends(self, handles: list[Any]) -> None:
        for reqs, _ in handles:
            MPI.Request.Waitall(reqs)

    def progress_sends(self, handles: list[Any]) -> list[Any]:
        return [h for h in handles if not MPI.Request.Testall(h[0])]


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
    wire_dtypes = frozenset(d for d in ThreadedTransport.wire_dtypes if not d.startswith("float8"))  # as NCCL's

    def __init__(self, comm: Any, stage: int, world_rank_of: Callable[[int], int],
                 net: NetworkEmulator | None = None, codecs: Mapping[Kind, Codec] | None = None):
        import cupy

        self._cupy = cupy
        super().__init__(comm, stage, world_rank_of, net=net, codecs=codecs)

    def prepare_send(self, x: jax.Array) -> jax.Array:
        return wire_view(x)  # Nothing goes through the host.

    def _payload_buffer(self, nbytes: int) -> Any:
        return self._cupy.empty(nbytes, self._cupy.uint8)

    def _payload_to_array(self, payload: Any, spec: ArraySpec) -> jax.Array:
        return from_bytes_on_device(payload, spec)

    def _payload_bytes(self, x: jax.Array) -> tuple[Any, Any]:
        return as_bytes_on_device(x)
