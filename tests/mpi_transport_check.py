"""Run under `mpiexec -n 2` by the tests: stage 0 sends one message, stage 1 receives it with the
spec given on the command line; prints what happened so the test can assert the exact outcome."""

import sys

import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

import jaxpipe.transport as tr
from jaxpipe.errors import TransportError
from jaxpipe.schedule import Phase
from jaxpipe.stage import ArraySpec

mode = sys.argv[1]
comm = MPI.COMM_WORLD
t = tr.HostStagedMpi(comm, comm.rank, world_rank_of=lambda s: s)
sent = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
key = tr.MsgKey(step=3, microbatch=1, kind=Phase.FWD)
if comm.rank == 0:
    if mode == "wrong_microbatch":  # A sender bug: micro-batch 2 travels on micro-batch 1's channel.
        tag = tr._tag
        tr._tag = lambda k, part: tag(tr.MsgKey(k.step, 1, k.kind), part)
        t.send(tr.MsgKey(3, 2, Phase.FWD), 1, sent)
    else:
        t.send(key, 1, sent.astype(jnp.bfloat16) if mode == "wrong_dtype" else sent)
    t.flush()
else:
    spec = ArraySpec((2, 4), "float32") if mode == "wrong_shape" else ArraySpec((2, 3), "float32")
    try:
        got = t.recv(key, 0, spec)
        print("OK", np.asarray(got).tolist(), flush=True)
    except TransportError as e:
        print("TransportError:", e, flush=True)
t.close()
