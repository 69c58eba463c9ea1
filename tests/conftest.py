import os
import sys
from pathlib import Path

# Tests import the helpers beside them (reference.py, mpi_util.py) and run on CPU only.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
