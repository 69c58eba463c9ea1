"""What a pipeline message is: its key, its array spec, and the header that precedes it on the wire."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

MAGIC = 0x4A585050  # "JXPP"
DTYPES = ["float32", "bfloat16", "float16", "int32", "float64", "uint8", "int8", "float8_e4m3fn", "float8_e5m2"]
HEADER_LEN = 8


class Kind(enum.IntEnum):
    """What a message carries: an activation (forward) or its gradient (backward)."""

    ACT = 0
    GRAD = 1


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    @property
    def nbytes(self) -> int:
        import jax.numpy as jnp  # here, not at the top: the schedules (and so config checks) import this module

        return int(np.prod(self.shape)) * np.dtype(jnp.dtype(self.dtype)).itemsize


@dataclass(frozen=True)
class MsgKey:
    """One message of a step: micro-batch `microbatch`'s activation (ACT) or gradient (GRAD) that
    model chunk `chunk` receives."""

    step: int
    microbatch: int
    kind: Kind
    chunk: int = 0

    def short(self) -> str:
        return f"{'FB'[int(self.kind)]}{self.chunk}.{self.microbatch}"


def tag(key: MsgKey, part: int) -> int:
    return (((key.microbatch * 64 + key.chunk) * 2 + int(key.kind)) * 2 + part) % 32767


def make_header(key: MsgKey, nbytes: int, dtype: str, codec: int = 0) -> np.ndarray:
    return np.array([MAGIC, key.step, key.microbatch, int(key.kind), key.chunk, nbytes, DTYPES.index(dtype),
                     codec], np.int64)


def parse_header(hdr: np.ndarray) -> tuple[int, MsgKey, int, str, int] | None:
    """(magic, key, bytes, dtype name, codec code), or None if the words cannot be a header."""
    magic, step, mb, kind, chunk, nbytes, dtype_code, codec = (int(v) for v in hdr)
    if magic != MAGIC or kind not in (0, 1) or mb < 0 or chunk < 0 or nbytes < 0:
        return None
    dtype = DTYPES[dtype_code] if 0 <= dtype_code < len(DTYPES) else f"dtype#{dtype_code}"
    return magic, MsgKey(step, mb, Kind(kind), chunk), nbytes, dtype, codec
