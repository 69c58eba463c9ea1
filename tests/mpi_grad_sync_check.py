"""Run under `mpiexec -n N` by the tests: every data-parallel mode averages buffers of awkward sizes
over N ranks, with MPI collectives and over emulated links; prints one line per case that fails.

The emulated algorithms send views of the buffer they are reducing (no copies): a chunk written
again before its send left would show up here as a wrong average or as replicas that disagree.
"""

import numpy as np
from mpi4py import MPI

from jaxpipe.comm.netem import LinkSpec, NetworkEmulator
from jaxpipe.config import ParallelConfig
from jaxpipe.dp.base import DPContext
from jaxpipe.dp.sync import DP_MODES

comm = MPI.COMM_WORLD
net = NetworkEmulator(comm.rank, LinkSpec(delay_s=0.0005, rate_bps=50e9))
bad = []
# Sizes: fewer elements than ranks, not divisible by the ranks, and more than one 4 MiB chunk.
for n in (1, 5, 1001, 3_000_001):
    ranks = [np.random.default_rng([r, n]).standard_normal(n).astype(np.float32) for r in range(comm.size)]
    want = np.mean(ranks, axis=0, dtype=np.float64)
    for mode, cls in DP_MODES.items():
        sync = cls(DPContext(comm, net, lambda i: i, ParallelConfig(), place=lambda t: t))
        for how, average in (("mpi", sync.average), ("emulated", sync.average_emulated)):
            got = average(ranks[comm.rank].copy())
            replicas = comm.allgather(got)
            if not all(np.array_equal(replicas[0], g) for g in replicas):
                bad.append(f"{mode} {how} n={n}: replicas differ")
            elif not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                bad.append(f"{mode} {how} n={n}: off by {np.abs(got - want).max():.3g}")
net.close()
if comm.rank == 0:
    print("\n".join(bad) or f"all averages right on {comm.size} ranks")
