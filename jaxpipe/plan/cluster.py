"""Clusters to plan for: a cluster file, or one of DT-FM's five scenarios, in listed or shuffled order.

`resolve_cluster("dtfm:case4_worldwide", shuffle_seed=1)` builds DT-FM's eight-city scenario from
`dtfm_networks.yaml` (its measured delays and bandwidths between cloud regions, as data) and hands
its ranks out in a random order, as a real launcher would; `resolve_cluster("cluster.yaml")` loads a
file (`jaxpipe.comm.cluster`). How the 64 GPUs sit in the scenarios (DT-FM's config.py): case 0
eight instances of eight GPUs; case 1 eight spot instances of four GPUs (ranks 0-31) and 32
single-GPU machines; case 2 ranks 0-31 in Ohio and 32-63 in Virginia; case 3 four US regions of 16;
case 4 eight cities of eight.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from jaxpipe.comm.cluster import Cluster, load_cluster, region_cluster
from jaxpipe.errors import ConfigError

DTFM_FILE = Path(__file__).with_name("dtfm_networks.yaml")
DTFM_CASES = ("case0_datacenter", "case1_spot", "case2_two_universities", "case3_regional", "case4_worldwide")


@cache
def _dtfm_data() -> dict[str, Any]:
    return yaml.safe_load(DTFM_FILE.read_text())


def dtfm_scenario(name: str, nodes: int = 64) -> Cluster:
    """DT-FM's scenario `name` (a key of DTFM_CASES, or its prefix such as `case4`) with ranks in
    the listed order (grouped by instance or region)."""
    matches = [c for c in DTFM_CASES if c == name or c.split("_")[0] == name]
    if not matches:
        raise ConfigError(f"--cluster dtfm:{name}: no such DT-FM scenario (one of: {', '.join(DTFM_CASES)})")
    case = matches[0]
    data = _dtfm_data()
    sc = data["scenarios"][case]
    source = f"dtfm:{case} (DT-FM's scheduler/heuristic_evolutionary_solver/config.py)"

    def pair(v: list[float]) -> tuple[float, float]:
        return float(v[0]), float(v[1])

    if case == "case0_datacenter":
        regions = [f"instance{i // 8}" for i in range(nodes)]
        return region_cluster(regions, pair(sc["inside_instance"]), pair(sc["between_instances"]), regions, source)
    if case == "case1_spot":
        regions = [f"spot{i // 4}" if i < nodes // 2 else f"single{i}" for i in range(nodes)]
        return region_cluster(regions, pair(sc["inside_instance"]), pair(sc["between_machines"]), regions, source)
    if case == "case2_two_universities":
        regions = ["Ohio" if i < nodes // 2 else "Virginia" for i in range(nodes)]
        return region_cluster(regions, pair(sc["inside_region"]), pair(sc["across"]), source=source)
    if case == "case3_regional":
        order = ["Virginia", "Oregon", "California", "Ohio"]
        regions = [order[i * 4 // nodes] for i in range(nodes)]
        between = {tuple(k.split("-")): pair(v) for k, v in sc["pairs"].items()}
        return region_cluster(regions, pair(sc["inside_region"]), between, source=source)
    cities = ["Oregon", "Virginia", "Ohio", "Tokyo", "Seoul", "London", "Frankfurt", "Ireland"]
    regions = [cities[i * 8 // nodes] for i in range(nodes)]
    between = {tuple(k.split("-")): pair(v) for k, v in data["regions_pairs"].items()}
    return region_cluster(regions, pair(sc["inside_region"]), between, source=source)


def resolve_cluster(spec: str, shuffle_seed: int | None = None) -> Cluster:
    """`spec`: a cluster file, or `dtfm:<case>`; with `shuffle_seed` the ranks come in a random order."""
    if spec.startswith("dtfm:"):
        cluster = dtfm_scenario(spec[len("dtfm:"):])
    else:
        cluster = load_cluster(spec, f"--cluster {spec}")
    if shuffle_seed is not None:
        cluster = cluster.shuffled(shuffle_seed)
        cluster = Cluster(cluster.hosts, cluster.delay_ms, cluster.bandwidth_gbit, cluster.speed, cluster.memory_gb,
                          cluster.regions, f"{cluster.source or spec}, ranks shuffled with seed {shuffle_seed}")
    return cluster


def two_region_cluster(n: int, inside: tuple[float, float] = (1.0, 10.0), across: tuple[float, float] = (50.0, 0.5),
                       alternate: bool = True) -> Cluster:
    """`n` ranks in two regions, fast inside, slow across; with `alternate` rank r is in region r % 2
    (a launcher that interleaves the sites), else the first half is in region A."""
    regions = [("A" if (r % 2 == 0 if alternate else r < n // 2) else "B") for r in range(n)]
    order = "alternating" if alternate else "grouped"
    return region_cluster(regions, inside, across,
                          source=f"two regions, inside {inside[0]:g} ms / {inside[1]:g} Gbit/s, across "
                                 f"{across[0]:g} ms / {across[1]:g} Gbit/s, ranks {order}")
