"""Run under `mpiexec -n 2` by the tests: for each mode given on the command line, stage 0 sends one
message and stage 1 receives it with the spec the mode says; prints `MODE <mode>` and then what happened,
so the test can assert the exact outcome of each. Some modes make stage 0 a faulty sender (a corrupted
header, a wrong step, nothing at all). Each mode runs on its own duplicate of the communicator, so what one
mode leaves behind cannot reach another. `deadline` ends the job (as the CLI does), so it comes last."""

import sys
from contextlib import contextmanager

import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

import jaxpipe.comm.transport.base as base
import jaxpipe.comm.transport.mpi as tr
from jaxpipe.comm.codec import Float8E4M3, Int8
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey
from jaxpipe.errors import TransportError
from jaxpipe.runtime.watchdog import abort

world = MPI.COMM_WORLD
sent = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
key = MsgKey(step=3, microbatch=1, kind=Kind.ACT)


@contextmanager
def faulty_sender(mode: str):
    """Bits flipped on the way, a sender a step ahead, or micro-batch 2 on micro-batch 1's channel."""
    make_header, tag = base.make_header, tr.tag
    if mode in ("bad_magic", "wrong_step"):
        def corrupt(key, nbytes, dtype, codec):
            hdr = make_header(key, nbytes, dtype, codec)
            if mode == "bad_magic":
                hdr[0] ^= 1 << 4
            else:
                hdr[1] += 1
            return hdr

        base.make_header = corrupt
    elif mode == "wrong_microbatch":
        tr.tag = lambda k, part: tag(MsgKey(k.step, 1, k.kind), part)
    try:
        yield
    finally:
        base.make_header, tr.tag = make_header, tag


def check(mode: str) -> None:
    comm = world.Dup()
    # wrong_codec: the ranks disagree on parallel.act_codec (int8 sent, float8 expected).
    codecs = {Kind.ACT: (Int8() if comm.rank == 0 else Float8E4M3())} if mode == "wrong_codec" else None
    t = tr.HostStagedMpi(comm, comm.rank, world_rank_of=lambda s: s, codecs=codecs)
    if comm.rank == 0:
        with faulty_sender(mode):
            if mode == "deadline":  # A sender that never sends (dead or hung): the receive must give up.
                pass
            elif mode == "wrong_microbatch":  # A sender bug: micro-batch 2 travels on micro-batch 1's channel.
                t.send(MsgKey(3, 2, Kind.ACT), 1, sent)
            else:
                t.send(key, 1, sent.astype(jnp.bfloat16) if mode == "wrong_dtype" else sent)
            t.flush()
    else:
        print("MODE", mode, flush=True)
        spec = ArraySpec((2, 4), "float32") if mode == "wrong_shape" else ArraySpec((2, 3), "float32")
        t.recv_timeout = 1.0 if mode == "deadline" else 60.0
        try:
            got = t.recv(key, 0, spec)
            print("OK", np.asarray(got).tolist(), flush=True)
        except TransportError as e:
            if mode == "deadline":  # As the CLI does: the receive is still posted, so end the job.
                abort(f"TransportError: {e}", code=3)  # (Once mpiexec has the message: see watchdog.abort.)
            print("TransportError:", e, flush=True)
    t.close()
    world.Barrier()


for m in sys.argv[1:]:
    check(m)
