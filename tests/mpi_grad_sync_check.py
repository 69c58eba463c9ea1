"""Run under `mpiexec -n N` by the tests: every data-parallel mode with every codec averages buffers of
awkward sizes over N ranks, over MPI's collectives, over emulated links and through the NCCL protocol's
CPU stand-in; prints one line per case that fails.

- `grad_codec=none`: the float64 mean, to float32 rounding;
- a codec: exactly what a NumPy reference that applies the same quantisation gives (each replica's
  buffer quantised, the decoded buffers summed in rank order in float32 and divided by N, and, for
  the central and sharded PS, the result quantised again);
- error feedback: on a constant gradient the accumulated error of K exchanges stays within a
  quantisation step (it does not grow with K), while without it the error grows K-fold.

The emulated algorithms send views of the buffer they are reducing (no copies): a chunk written
again before its send left would show up here as a wrong average or as replicas that disagree.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from handshake_transport import MpiPlaysNccl
from mpi4py import MPI

from jaxpipe.comm import quant
from jaxpipe.comm.netem import LinkSpec, NetworkEmulator
from jaxpipe.dp.collectives import Emulated, HostMPI
from jaxpipe.dp.exchange import MODES, Exchange

comm = MPI.COMM_WORLD
net = NetworkEmulator(comm.rank, LinkSpec(delay_s=0.0005, rate_bps=50e9))
BACKENDS = {"mpi": HostMPI(comm), "emulated": Emulated(comm, net, lambda i: i), "nccl-stand-in": MpiPlaysNccl(comm)}
LEVELS = {"int8": 127, "int4": 7}


def q_ref(y: np.ndarray, codec: str) -> np.ndarray:
    """decode(encode(y)) row by row, in NumPy."""
    rows = y.reshape(-1, quant.CHUNK)
    if codec == "none":
        return rows.copy()
    if codec == "bfloat16":
        return rows.astype(ml_dtypes.bfloat16).astype(np.float32)
    levels = np.float32(LEVELS[codec])
    s = np.abs(rows).max(axis=1) * np.float32(1.0 / LEVELS[codec])
    inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.round(rows * inv[:, None])
    return (np.clip(q, -levels, levels) * s[:, None]).astype(np.float32)


def padded(x: np.ndarray, ex: Exchange) -> np.ndarray:
    out = np.zeros(ex.rows * ex.chunk, np.float32)
    out[:x.size] = x
    return out


def expected(ranks: list[np.ndarray], mode: str, codec: str, ex: Exchange) -> np.ndarray:
    ups = [q_ref(padded(x, ex), codec) for x in ranks]
    total = ups[0]
    for u in ups[1:]:
        total = total + u
    mean = total * np.float32(1.0 / len(ranks))
    out = mean if mode == "allreduce" else q_ref(mean, codec)
    return out.reshape(-1)[:ranks[0].size]


bad = []
# Sizes: fewer elements than ranks, not a whole number of rows, more than one 4 MiB chunk.
for n in (1, 1001, 1_100_001):
    ranks = [np.random.default_rng([r, n]).standard_normal(n).astype(np.float32) for r in range(comm.size)]
    want64 = np.mean(ranks, axis=0, dtype=np.float64)
    for how, coll in BACKENDS.items():
        for mode in MODES:
            for codec in quant.CODECS:
                ex = Exchange(mode, codec, coll, n)
                got = np.asarray(ex.run(jnp.asarray(ranks[comm.rank])))
                replicas = comm.allgather(got)
                what = f"{mode} + {codec} {how} n={n}"
                if not all(np.array_equal(replicas[0], g) for g in replicas):
                    bad.append(f"{what}: replicas differ")
                elif codec == "none" and not np.allclose(got, want64, rtol=1e-5, atol=1e-6):
                    bad.append(f"{what}: off by {np.abs(got - want64).max():.3g}")
                elif codec != "none" and not np.array_equal(got, want := expected(ranks, mode, codec, ex)):
                    bad.append(f"{what}: {np.sum(got != want)} elements differ from the quantising reference "
                               f"(by up to {np.abs(got - want).max():.3g})")

# Error feedback on a constant gradient: K exchanges of the same buffers.
n, K = 3000, 40
ranks = [np.random.default_rng([7, r]).standard_normal(n).astype(np.float32) for r in range(comm.size)]
true = np.mean(ranks, axis=0, dtype=np.float64)
for mode in MODES:
    for codec in ("bfloat16", "int8", "int4"):
        ex = Exchange(mode, codec, BACKENDS["mpi"], n)
        acc = np.zeros(n, np.float64)
        worst = 0.0
        for k in range(1, K + 1):
            acc += np.asarray(ex.run(jnp.asarray(ranks[comm.rank])))
            ex.commit(True)
            worst = max(worst, float(np.abs(acc - k * true).max()))
        fresh = Exchange(mode, codec, BACKENDS["mpi"], n)
        without = float(np.abs(K * np.asarray(fresh.run(jnp.asarray(ranks[comm.rank]))) - K * true).max())
        # One quantisation step of the largest row (the residues stay within half a step each way).
        step = max(float(np.abs(x).max()) for x in ranks) * (2.0**-8 if codec == "bfloat16" else 1.0 / LEVELS[codec])
        if not (worst <= 2 * step and without > 5 * worst):
            bad.append(f"error feedback {mode} + {codec}: accumulated error {worst:.3g} after up to {K} steps "
                       f"(one step {step:.3g}), {without:.3g} without error feedback")
net.close()
if comm.rank == 0:
    print("\n".join(bad) or f"all averages right on {comm.size} ranks")
