"""Run under `mpiexec -n 2` by the tests: stage 0 sends one message, stage 1 receives it with the
spec given on the command line; prints what happened so the test can assert the exact outcome.
Some modes make stage 0 a faulty sender (a corrupted header, a wrong step, nothing at all)."""

import sys

import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

import jaxpipe.comm.transport.mpi as tr
from jaxpipe.comm.codec import Float8E4M3, Int8
from jaxpipe.comm.message import ArraySpec, Kind, MsgKey
from jaxpipe.errors import TransportError
from jaxpipe.runtime.watchdog import abort

mode = sys.argv[1]
comm = MPI.COMM_WORLD
# wrong_codec: the ranks disagree on parallel.act_codec (int8 sent, float8 expected).
codecs = {Kind.ACT: (Int8() if comm.rank == 0 else Float8E4M3())} if mode == "wrong_codec" else None
t = tr.HostStagedMpi(comm, comm.rank, world_rank_of=lambda s: s, codecs=codecs)
sent = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
key = MsgKey(step=3, microbatch=1, kind=Kind.ACT)
if comm.rank == 0:
    if mode in ("bad_magic", "wrong_step"):  # Bits flipped on the way, or a sender a step ahead.
        make_header = tr.make_header

        def corrupt(key, nbytes, dtype, codec):
            hdr = make_header(key, nbytes, dtype, codec)
            if mode == "bad_magic":
                hdr[0] ^= 1 << 4
            else:
                hdr[1] += 1
            return hdr

        tr.make_header = corrupt
    if mode == "deadline":  # A sender that never sends (dead or hung): the receive must give up.
        pass
    elif mode == "wrong_microbatch":  # A sender bug: micro-batch 2 travels on micro-batch 1's channel.
        tag = tr.tag
        tr.tag = lambda k, part: tag(MsgKey(k.step, 1, k.kind), part)
        t.send(MsgKey(3, 2, Kind.ACT), 1, sent)
    else:
        t.send(key, 1, sent.astype(jnp.bfloat16) if mode == "wrong_dtype" else sent)
    t.flush()
else:
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
