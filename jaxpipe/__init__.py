"""jaxpipe: pipeline- and data-parallel training of GPT-3-class models in JAX/Flax over MPI."""

__version__ = "0.1.0"
