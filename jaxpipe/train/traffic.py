"""Compressed pipeline traffic, as the trainer sets it up: the codecs of one rank's messages
(`parallel.act_codec`, `parallel.act_grad_codec`, `parallel.act_delta`) and what they put on the
links per step (the first log line's estimate).

Delta mode needs, at every chunk boundary that crosses ranks, one copy per training sample at each
of its two ends (`jaxpipe.comm.codec.DeltaStore`): samples × seq_len × d_model values of the compute
dtype. Both ends hold identical copies, so checkpoints carry one of them (the receiving end's) and
both ends load it on resume: the copies cannot be rebuilt, as each is what that sample's last visit
delivered under the parameters of that step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm.codec import Codec, Delta, DeltaStore, RowQuant, make_codec
from jaxpipe.comm.message import HEADER_LEN, ArraySpec, Kind, MsgKey
from jaxpipe.comm.topology import Topology
from jaxpipe.comm.traffic import tied_traffic
from jaxpipe.config import Config
from jaxpipe.data.source import TokenFileSource, TokenSource, replica_sample_indices
from jaxpipe.pipeline.partition import Partition
from jaxpipe.pipeline.schedule import Lowered, Op, Schedule

HEADER_BYTES = HEADER_LEN * 8


def delta_boundaries(schedule: Schedule, rank: int) -> list[tuple[int, bool]]:
    """(consuming chunk, this rank receives) for every boundary that crosses ranks and has an end here."""
    out = []
    for c in range(1, schedule.n_chunks):
        src, dst = schedule.rank_of(c - 1), schedule.rank_of(c)
        if src != dst and rank in (src, dst):
            out.append((c, rank == dst))
    return out


def pipeline_codecs(cfg: Config, topo: Topology, schedule: Schedule, partition: Partition, source: TokenSource,
                    act_spec: ArraySpec, place: Callable[[np.ndarray], jax.Array]) -> tuple[dict[Kind, Codec],
                                                                                           list[Any]]:
    """This rank's codecs per message kind, and the state among them that checkpoints carry."""
    p = cfg.parallel
    act = make_codec(p.act_codec, Kind.ACT, cfg, topo.replica)
    grad = make_codec(p.act_grad_codec, Kind.GRAD, cfg, topo.replica)
    if not p.act_delta:
        return {Kind.ACT: act, Kind.GRAD: grad}, []
    assert isinstance(act, RowQuant)
    assert isinstance(source, TokenFileSource)  # validated: act_delta needs data.source=tokens
    n_samples = source.n_samples
    stores = {c: DeltaStore(f"act_delta.layer{partition.stage(c).start}.r{topo.replica}", n_samples,
                            act_spec.shape[1:], act_spec.dtype, p.act_delta_dir, save=receives)
              for c, receives in delta_boundaries(schedule, topo.stage)}

    def sample_ids(key: MsgKey) -> np.ndarray:
        return source.window_index(replica_sample_indices(cfg, key.step, topo.replica)[key.microbatch])

    return {Kind.ACT: Delta(act, sample_ids, stores, place), Kind.GRAD: grad}, list(stores.values())


def tied_wire_bytes(cfg: Config) -> int:
    """Bytes one end of the tied embedding sends per step (`parallel.tied_grad_dtype`)."""
    return tied_traffic(cfg.model.vocab_size, cfg.model.d_model, cfg.parallel.tied_grad_dtype).egress(0)


def _messages(lowered: Lowered) -> dict[Op, int]:
    """Sends per step over all ranks of one pipeline, by op, between ranks only."""
    n = {Op.SEND_ACT: 0, Op.SEND_GRAD: 0}
    for actions in lowered.ranks:
        for a in actions:
            if a.op in n:
                n[a.op] += 1
    return n


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


def describe_traffic(cfg: Config, lowered: Lowered, act_spec: ArraySpec, n_samples: int | None,
                     tied_bytes: int) -> str:
    """The first log line's part on pipeline traffic: codecs, bytes per message and per step (all
    replicas), and in delta mode the copies' memory."""
    p = cfg.parallel
    n = _messages(lowered)
    act, grad = make_codec(p.act_codec, Kind.ACT, cfg), make_codec(p.act_grad_codec, Kind.GRAD, cfg)
    first = make_codec("int8", Kind.ACT)
    a_b, g_b = act.wire_spec(act_spec).nbytes, grad.wire_spec(act_spec).nbytes
    per_step = p.replicas * (n[Op.SEND_ACT] * (a_b + HEADER_BYTES) + n[Op.SEND_GRAD] * (g_b + HEADER_BYTES))
    tied = p.replicas * tied_bytes
    act_name = f"{act.name} deltas" if p.act_delta else act.describe()
    s = (f"pipeline traffic: act {act_name} {a_b / 1024:.4g} KiB, grad {grad.describe()} {g_b / 1024:.4g} KiB per "
         f"message, {n[Op.SEND_ACT] + n[Op.SEND_GRAD]} messages per pipeline: ~{_mb(per_step)} per step")
    if p.act_delta:
        f_b = first.wire_spec(act_spec).nbytes
        first_step = per_step + p.replicas * n[Op.SEND_ACT] * (f_b - a_b)
        crossing = sum(1 for c in range(1, lowered.schedule.n_chunks)
                       if lowered.schedule.rank_of(c - 1) != lowered.schedule.rank_of(c))
        per_copy = int(np.prod(act_spec.shape[1:])) * np.dtype(jnp.dtype(act_spec.dtype)).itemsize
        store = (n_samples or 0) * per_copy
        total = store * 2 * crossing * p.replicas
        where = f"files in {p.act_delta_dir}" if p.act_delta_dir else "host memory"
        s += (f" once every sample was seen (~{_mb(first_step)} while first visits go in int8, {f_b / 1024:.4g} KiB); "
              f"delta copies: {n_samples:,} samples x {per_copy / 1024:.4g} KiB at {crossing} boundaries x 2 ends x "
              f"{p.replicas} replicas = {total / 2**30:.3g} GiB of {where} ({store / 2**30:.3g} GiB per boundary end)")
    if tied:
        s += f"; tied embedding {p.tied_grad_dtype} ~{_mb(tied)} per step"
    return s
