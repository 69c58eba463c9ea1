"""NCCL, set up in one place: CuPy's binding (imported lazily: CPU installs never need it), a
communicator over an MPI group or between two ranks, and the streams transfers run on.

Three users share it: the pipeline transport (jaxpipe.comm.transport.nccl, a communicator per
direction of each neighbour pair), the tied-embedding sum (jaxpipe.comm.tied, the 2-rank group of
the first and last stage) and the DP collectives (jaxpipe.dp.nccl, a stage's DP group). Each takes
its own communicator (NCCL orders operations per communicator, and the three run on different
threads) and its own non-blocking stream: work on CUDA's legacy default stream would wait for all of
JAX's queued compute and serialise the pipeline.
"""

from __future__ import annotations

from typing import Any

from jaxpipe.errors import ConfigError


def load() -> tuple[Any, Any]:
    """(cupy, cupy.cuda.nccl), or a ConfigError saying what to change."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:
        raise ConfigError(f"parallel.transport=nccl needs CuPy with NCCL ({e}); use parallel.transport=mpi") from None
    return cupy, nccl


def group_communicator(comm: Any) -> tuple[Any, Any]:
    """(NCCL communicator, non-blocking stream) over the members of MPI communicator `comm`, in its rank
    order (collective over `comm`: rank 0 draws the id and broadcasts it)."""
    cupy, nccl = load()
    rank = int(comm.Get_rank())
    uid = comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
    cupy.cuda.Device(0).use()
    return nccl.NcclCommunicator(int(comm.Get_size()), uid, rank), new_stream()


def pair_communicator(comm: Any, me: int, lo: int, hi: int, tag: int) -> Any:
    """A 2-rank NCCL communicator between ranks `lo` < `hi` of MPI communicator `comm` (`me` is one of
    them; rank 0 of the pair is `lo`), its id sent from lo to hi with `tag`."""
    cupy, nccl = load()
    if me == lo:
        uid = nccl.get_unique_id()
        comm.send(uid, dest=hi, tag=tag)
    else:
        uid = comm.recv(source=lo, tag=tag)
    cupy.cuda.Device(0).use()
    return nccl.NcclCommunicator(2, uid, 0 if me == lo else 1)


def new_stream() -> Any:
    cupy, _ = load()
    return cupy.cuda.Stream(non_blocking=True)


def nccl_type(buf: Any) -> int:
    """NCCL's type of a CuPy buffer (float32 data, or bytes)."""
    _, nccl = load()
    return {"float32": nccl.NCCL_FLOAT32, "uint8": nccl.NCCL_UINT8}[buf.dtype.name]
