"""Run under `mpiexec -n 2` by the tests: stage 0 sends one message, stage 1 receives it with the
spec given on the command line; prints what happened so the test can assert the exact outcome."""

import sys

import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from jaxpipe.errors import TransportError
from jaxpipe.schedule import Phase
from jaxpipe.stage import ArraySpec
from jaxpipe.transport import MpiTransport, MsgKey

mode = sys.argv[1]
comm = MPI.COMM_WORLD
t = MpiTransport(comm, comm.rank, world_rank_of=lambda s: s)
sent = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
key = MsgKey(step=3, microbatch=1, kind=Phase.FWD)
if comm.rank == 0:
    sent_key = MsgKey(3, 2, Phase.FWD) if mode == "wrong_microbatch" else key
    t.send(sent_key, 1, sent.astype(jnp.bfloat16) if mode == "wrong_dtype" else sent)
    t.flush()
else:
    spec = ArraySpec((2, 4), "float32") if mode == "wrong_shape" else ArraySpec((2, 3), "float32")
    if mode == "wrong_microbatch":  # the receive posted for micro-batch 1 must not accept micro-batch 2
        t.expect(key, 0, spec)
        t._pending[key][0].Cancel()
        t._pending.pop(key)
        import jaxpipe.transport as tr
        hdr = np.zeros(6, np.int64)
        payload = np.empty(spec.nbytes, np.uint8)
        k2 = MsgKey(3, 2, Phase.FWD)
        t._pending[key] = (comm.Irecv([hdr, MPI.INT64_T], 0, tr._tag(k2, 0)),
                           comm.Irecv([payload, MPI.BYTE], 0, tr._tag(k2, 1)), hdr, payload)
    try:
        got = t.recv(key, 0, spec)
        print("OK", np.asarray(got).tolist(), flush=True)
    except TransportError as e:
        print("TransportError:", e, flush=True)
t.close()
