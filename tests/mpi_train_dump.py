"""Run under mpiexec by the tests: trains per the given overrides and writes what the tests compare.

Each rank writes `rank<r>.npz` with its stage's parameters in the per-layer layout and
`rank<r>.json` with the steps it skipped and the updates it applied; global rank 0 also writes
`result.json` with per-step losses and gradient norms.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from mpi4py import MPI

from jaxpipe.config import load_config
from jaxpipe.model.layout import flatten_per_layer
from jaxpipe.train.trainer import train

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--handshake-transport", action="store_true",
                    help="use tests/handshake_transport.py (the NCCL transport's protocol and tied sum on CPU)")
args = parser.parse_args()
if args.handshake_transport:
    import handshake_transport

    import jaxpipe.train.trainer

    jaxpipe.train.trainer.make_transport = handshake_transport.make_transport
    jaxpipe.train.trainer.make_tied_exchange = handshake_transport.make_tied_exchange

cfg = load_config(None, args.overrides)
res = train(cfg, log=lambda s: None)
out = Path(args.out)
spec = res.stage
flat = flatten_per_layer(cfg.model, spec.layers, spec.first, spec.last, res.params)
rank = MPI.COMM_WORLD.Get_rank()
np.savez(out / f"rank{rank}.npz", **{k: np.asarray(v) for k, v in flat.items()})
(out / f"rank{rank}.json").write_text(json.dumps({"skipped_steps": res.skipped_steps, "updates": res.updates}))
if rank == 0:
    (out / "result.json").write_text(json.dumps({"losses": res.losses, "grad_norms": res.grad_norms}))
