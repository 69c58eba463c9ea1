"""The data-parallel gradient codecs' old import path: they live in `jaxpipe.comm.quant` (the one
quantiser module: its "chunks" format, registered in `jaxpipe.registry.GRAD_CODECS`). Kept so that
`jaxpipe.dp` modules importing `from jaxpipe.dp import quant` work unchanged during the move."""

from __future__ import annotations

from jaxpipe.comm.quant import CHUNK, CODECS, mean_of, wire_bytes
from jaxpipe.comm.quant import chunk_row_bytes as row_bytes
from jaxpipe.comm.quant import decode_chunks as decode
from jaxpipe.comm.quant import encode_chunks as encode
from jaxpipe.comm.quant import encode_chunks_ef as encode_ef

__all__ = ["CHUNK", "CODECS", "decode", "encode", "encode_ef", "mean_of", "row_bytes", "wire_bytes"]
