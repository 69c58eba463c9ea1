"""The DP algorithms' home: importing it registers every class `parallel.dp_mode` can name into
`jaxpipe.registry.DP_ALGORITHMS` (each module registers its own classes)."""

from __future__ import annotations

from jaxpipe.dp import (
    diloco,  # noqa: F401
    sync,  # noqa: F401 - registers the exact modes first (the order `names` lists)
)
from jaxpipe.registry import DP_ALGORITHMS

__all__ = ["DP_ALGORITHMS"]
