"""The DP algorithms' home: importing it registers every class `parallel.dp_mode` can name into
`jaxpipe.registry.DP_ALGORITHMS` (each module registers its own classes), the exact modes first, so
error messages list them in that order."""

from __future__ import annotations

import importlib

from jaxpipe.registry import DP_ALGORITHMS

MODULES = ("jaxpipe.dp.sync", "jaxpipe.dp.diloco", "jaxpipe.dp.streaming")
for _module in MODULES:
    importlib.import_module(_module)

__all__ = ["DP_ALGORITHMS", "MODULES"]
