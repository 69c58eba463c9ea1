"""Deterministic token streams, addressed by global sample index.

Every sample is `seq_len + 1` tokens; inputs are the first `seq_len`, targets the last `seq_len`.
Samples are addressed by a global index (step × global batch + replica × batch per replica + ...),
so the first stage (inputs) and the last stage (targets) of a pipeline read the same sample
independently and nothing but activations crosses the network, each DP replica reads different
samples, and a single process reading the whole global batch reads exactly the union.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from jaxpipe.config import Config, DataConfig, ModelConfig
from jaxpipe.errors import ConfigError


class TokenSource(ABC):
    seq_len: int

    @abstractmethod
    def samples(self, indices: np.ndarray) -> np.ndarray:
        """int32 [len(indices), seq_len + 1]."""


class SyntheticSource(TokenSource):
    """Learnable synthetic language: each sample walks a fixed random permutation of the vocabulary
    from a random start token, so the next token is a deterministic function of the current one.
    A model that learns the bigram map drives the loss towards zero; chance is log(vocab)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.successor = np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)

    def samples(self, indices: np.ndarray) -> np.ndarray:
        starts = np.array(
            [np.random.default_rng([self.seed, int(i)]).integers(self.vocab_size) for i in indices], np.int32
        )
        out = np.empty((len(indices), self.seq_len + 1), np.int32)
        out[:, 0] = starts
        for t in range(1, self.seq_len + 1):
            out[:, t] = self.successor[out[:, t - 1]]
        return out


class TokenFileSource(TokenSource):
    """A flat binary array of token ids (uint16 or uint32), memory-mapped; sample i is the window
    starting at token i × seq_len (consecutive windows share their boundary token). Indices wrap
    around, i.e. the file is read in epochs."""

    def __init__(self, path: str, dtype: str, vocab_size: int, seq_len: int):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data.path: no such file '{path}'")
        itemsize = np.dtype(dtype).itemsize
        size = p.stat().st_size
        if size % itemsize:
            raise ConfigError(f"data.path '{path}' is {size} bytes, not a whole number of {dtype} tokens: "
                              f"wrong data.dtype or a truncated file")
        self.tokens = np.memmap(p, dtype=dtype, mode="r")
        self.seq_len = seq_len
        self.n_samples = (len(self.tokens) - 1) // seq_len
        if self.n_samples < 1:
            raise ConfigError(f"data.path '{path}' holds {len(self.tokens)} tokens, fewer than one sample "
                              f"of model.seq_len + 1 = {seq_len + 1}")
        # A cheap whole-file check would read it all; check the first window so a wrong dtype is caught.
        head = np.asarray(self.tokens[: seq_len + 1])
        if head.size and int(head.max()) >= vocab_size:
            raise ConfigError(f"data.path '{path}' holds token id {int(head.max())} >= model.vocab_size "
                              f"({vocab_size}): wrong data.dtype or a tokenizer with a larger vocabulary")

    def samples(self, indices: np.ndarray) -> np.ndarray:
        starts = (np.asarray(indices) % self.n_samples) * self.seq_len
        return np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], np.int32) for s in starts])


def make_source(data: DataConfig, model: ModelConfig) -> TokenSource:
    if data.source == "synthetic":
        return SyntheticSource(model.vocab_size, model.seq_len, data.seed)
    assert data.path is not None
    return TokenFileSource(data.path, data.dtype, model.vocab_size, model.seq_len)


def replica_sample_indices(cfg: Config, step: int, replica: int) -> np.ndarray:
    """Global sample indices of `replica`'s batch at `step`, shaped [micro-batches, micro-batch size]."""
    base = step * cfg.train.global_batch_size + replica * cfg.batch_per_replica
    idx = base + np.arange(cfg.batch_per_replica)
    return idx.reshape(cfg.num_microbatches, cfg.train.micro_batch_size)


def global_batch(source: TokenSource, cfg: Config, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole step's (inputs, targets), [global batch, L] each: what one process would train on."""
    idx = step * cfg.train.global_batch_size + np.arange(cfg.train.global_batch_size)
    s = source.samples(idx)
    return s[:, :-1], s[:, 1:]
