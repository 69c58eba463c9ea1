"""Deterministic token streams, addressed by global sample index.

Every sample is `seq_len + 1` tokens; inputs are the first `seq_len`, targets the last `seq_len`.
Samples are addressed by a global index (step × global batch + replica × batch per replica + ...),
so the first stage (inputs) and the last stage (targets) of a pipeline read the same sample
independently and nothing but activations crosses the network, each DP replica reads different
samples, and a single process reading the whole global batch reads exactly the union.

The position in the stream is therefore a function of the step alone: a run resumed from a
checkpoint of step k reads exactly what an uninterrupted run reads from step k on, also when
`data.shuffle` visits each epoch in its own order (drawn from `data.seed` and the epoch number).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
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

    def __init__(self, vocab_size: int, seq_len: int, seed: int, offset: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.offset = offset  # The validation stream is the same language from other start tokens.
        self.successor = np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)

    def samples(self, indices: np.ndarray) -> np.ndarray:
        starts = np.array(
            [np.random.default_rng([self.seed, int(i) + self.offset]).integers(self.vocab_size) for i in indices],
            np.int32,
        )
        out = np.empty((len(indices), self.seq_len + 1), np.int32)
        out[:, 0] = starts
        for t in range(1, self.seq_len + 1):
            out[:, t] = self.successor[out[:, t - 1]]
        return out


class TokenFileSource(TokenSource):
    """A flat binary array of token ids (uint16 or uint32), memory-mapped; sample i is the window
    starting at token i × seq_len (consecutive windows share their boundary token). Indices wrap
    around, i.e. the file is read in epochs; with `shuffle_seed` each epoch visits the windows in
    its own random order, so index i of epoch e is window perm(seed, e)[i mod n]."""

    def __init__(self, path: str, dtype: str, vocab_size: int, seq_len: int, shuffle_seed: int | None = None,
                 key: str = "data.path", expected_tokens: int | None = None):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{key}: no such file '{path}'")
        itemsize = np.dtype(dtype).itemsize
        size = p.stat().st_size
        if size % itemsize:
            raise ConfigError(f"{key} '{path}' is {size} bytes, not a whole number of {dtype} tokens: "
                              f"wrong data.dtype or a truncated file")
        if expected_tokens is not None and size // itemsize != expected_tokens:
            raise ConfigError(f"{key} '{path}' holds {size // itemsize} tokens but {META_FILE} says "
                              f"{expected_tokens}: the file was truncated or replaced after `jaxpipe prepare-data`; "
                              f"prepare the data again")
        self.tokens = np.memmap(p, dtype=dtype, mode="r")
        self.seq_len, self.vocab_size, self.path, self.key = seq_len, vocab_size, path, key
        self.n_samples = (len(self.tokens) - 1) // seq_len
        if self.n_samples < 1:
            raise ConfigError(f"{key} '{path}' holds {len(self.tokens)} tokens, fewer than one sample "
                              f"of model.seq_len + 1 = {seq_len + 1}")
        # Reading the whole file would take minutes for a large corpus: check up to 256 windows spread over it
        # (the first included), which catches a wrong dtype or a foreign file; `samples` checks what it reads.
        for w in np.unique(np.linspace(0, self.n_samples - 1, num=min(self.n_samples, 256)).astype(np.int64)):
            self._check(np.asarray(self.tokens[w * seq_len : w * seq_len + seq_len + 1]), int(w),
                        "wrong data.dtype or a tokenizer with a larger vocabulary")

        self.shuffle_seed = shuffle_seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # Steps cross at most one epoch boundary at a time.
                self._orders.pop(min(self._orders))
            assert self.shuffle_seed is not None  # only shuffled sources have orders
            self._orders[epoch] = np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.n_samples)
        return self._orders[epoch]

    def window_index(self, indices: np.ndarray) -> np.ndarray:
        """Which window of the file each global sample index reads."""
        epoch, pos = np.divmod(np.asarray(indices, np.int64), self.n_samples)
        if self.shuffle_seed is None:
            return pos
        return np.array([self._order(int(e))[p] for e, p in zip(epoch, pos, strict=True)], np.int64)

    def _check(self, window: np.ndarray, w: int, hint: str) -> None:
        """An id beyond the vocabulary would be clamped by the embedding lookup: silent garbage."""
        if window.size and int(window.max()) >= self.vocab_size:
            raise ConfigError(f"{self.key} '{self.path}' holds token id {int(window.max())} >= model.vocab_size "
                              f"({self.vocab_size}) in window {w} (tokens from {w * self.seq_len}): {hint}")

    def samples(self, indices: np.ndarray) -> np.ndarray:
        windows = self.window_index(indices)
        out = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], np.int32) for s in windows * self.seq_len])
        if out.size and int(out.max()) >= self.vocab_size:  # A corrupt region the start-up check did not sample.
            for w, window in zip(windows, out, strict=True):
                self._check(window, int(w), "the file is corrupt; prepare the data again")
        return out


META_FILE = "meta.json"
_VAL_OFFSET = 1 << 40  # Synthetic validation samples: indices no training step reaches.


@dataclass(frozen=True)
class TokenFiles:
    """Where `data.source=tokens` reads, resolved from `data.path`, `data.val_path` and meta.json."""

    train: Path
    val: Path | None
    dtype: str
    vocab_size: int | None  # the tokenizer's, where meta.json says
    tokenizer: Path | None  # tokenizer.json beside the tokens, if any
    train_tokens: int | None = None  # token counts meta.json records, checked against the files
    val_tokens: int | None = None


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read '{path}': {e}") from None


def resolve_token_files(data: DataConfig, model: ModelConfig | None = None) -> TokenFiles:
    """A prepared directory supplies dtype, vocabulary and val.bin; a flat file takes `data.dtype`.
    With `model`, checks that the model's vocabulary holds every id the tokenizer can produce."""
    assert data.path is not None
    path = Path(data.path)
    val = Path(data.val_path) if data.val_path else None
    if not path.is_dir():
        return TokenFiles(path, val, data.dtype, None, None)
    if not (path / META_FILE).is_file():
        raise ConfigError(f"data.path '{path}' is a directory without {META_FILE}: write it with "
                          f"`jaxpipe prepare-data TEXT_FILES --out {path}`")
    meta = read_meta(path)
    val_tokens = None
    try:
        dtype, vocab = str(meta["dtype"]), int(meta["vocab_size"])
        train, train_tokens = path / meta["train"]["file"], int(meta["train"]["tokens"])
        if val is None and meta.get("val"):
            val, val_tokens = path / meta["val"]["file"], int(meta["val"]["tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"'{path / META_FILE}' lacks or mangles the field {e}") from None
    if dtype not in ("uint16", "uint32"):
        raise ConfigError(f"'{path / META_FILE}': dtype {dtype!r} is not uint16 or uint32")
    if model is not None and vocab > model.vocab_size:
        raise ConfigError(f"data.path '{path}' was tokenised with a vocabulary of {vocab} tokens but "
                          f"model.vocab_size is {model.vocab_size}: set model.vocab_size >= {vocab}")
    tokenizer = path / meta["tokenizer"] if meta.get("tokenizer") else None
    return TokenFiles(train, val, dtype, vocab, tokenizer, train_tokens, val_tokens)


def make_source(data: DataConfig, model: ModelConfig) -> TokenSource:
    if data.source == "synthetic":
        return SyntheticSource(model.vocab_size, model.seq_len, data.seed)
    files = resolve_token_files(data, model)
    return TokenFileSource(str(files.train), files.dtype, model.vocab_size, model.seq_len,
                           shuffle_seed=data.seed if data.shuffle else None, expected_tokens=files.train_tokens)


def make_val_source(data: DataConfig, model: ModelConfig) -> TokenSource | None:
    """The validation stream (never shuffled), or None where the data has none."""
    if data.source == "synthetic":
        return SyntheticSource(model.vocab_size, model.seq_len, data.seed, offset=_VAL_OFFSET)
    files = resolve_token_files(data, model)
    if files.val is None:
        return None
    key = "data.val_path" if data.val_path else "data.path (val)"
    return TokenFileSource(str(files.val), files.dtype, model.vocab_size, model.seq_len, key=key,
                           expected_tokens=files.val_tokens)


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
