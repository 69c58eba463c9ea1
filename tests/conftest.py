import os
import sys
from pathlib import Path

# Tests import the helpers beside them (reference.py, mpi_util.py) and run on CPU only.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mpi_util import configure_test_environment

# Before JAX starts its backend: this process (the single-process references) compiles with the same
# XLA flags and the same persistent cache as the ranks the tests launch.
configure_test_environment()
