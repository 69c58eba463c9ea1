"""Sampling from a checkpoint on one process (`jaxpipe generate`; no MPI job needed).

The per-layer checkpoint is loaded into the whole model (a StageModel that is first and last). Each
new token runs the model on a fixed-length window of the last `seq_len` tokens, padded at the end:
attention is causal, so the padding does not change the logits at the last real position, and one
compiled program serves every step. Without a KV cache this costs a full forward per token, which is
fine for the model sizes one samples from on one host while checking a run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.errors import ConfigError
from jaxpipe.model.gpt import Params, StageModel
from jaxpipe.train import checkpoint


class Sampler:
    def __init__(self, ckpt: str | Path, tokenizer: str | Path | None = None):
        from jaxpipe.data.prepare import EOT, load_tokenizer

        self.ckpt = checkpoint.resolve(ckpt)
        self.model, self.params = checkpoint.load_model(self.ckpt)
        tok_path = Path(tokenizer) if tokenizer else self.ckpt / checkpoint.TOKENIZER_FILE
        if not tok_path.is_file():
            raise ConfigError(f"no tokenizer: '{tok_path}' does not exist (pass --tokenizer FILE)")
        self.tokenizer = load_tokenizer(tok_path)
        self.eot = self.tokenizer.token_to_id(EOT)
        self.n_vocab = min(self.tokenizer.get_vocab_size(), self.model.vocab_size)
        module = StageModel(self.model, n_layers=self.model.n_layer, first=True, last=True)

        def logits_at(params: Params, window: jax.Array, pos: jax.Array) -> jax.Array:
            logits: jax.Array = module.apply({"params": params}, window)  # type: ignore[assignment]
            return logits[0, pos]

        self._logits_at: Callable[..., Any] = jax.jit(logits_at)

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """float64 logits of the token after `ids` (the model sees at most the last seq_len)."""
        ctx = ids[-self.model.seq_len :]
        window = np.zeros((1, self.model.seq_len), np.int32)
        window[0, : len(ctx)] = ctx
        logits = np.asarray(self._logits_at(self.params, jnp.asarray(window), jnp.int32(len(ctx) - 1)), np.float64)
        return logits[: self.n_vocab]  # Ids past the tokenizer's vocabulary decode to nothing.

    def generate(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int = 0,
                 greedy: bool = False, seed: int = 0, stop_at_eot: bool = True) -> str:
        if temperature <= 0 and not greedy:
            raise ConfigError("--temperature must be > 0 (or use --greedy)")
        ids = self.tokenizer.encode(prompt).ids if prompt else []
        if not ids:
            ids = [self.eot if self.eot is not None else 0]
        rng = np.random.default_rng(seed)
        for _ in range(max_new_tokens):
            logits = self.next_logits(ids)
            if greedy:
                nxt = int(np.argmax(logits))
            else:
                logits = logits / temperature
                if 0 < top_k < logits.size:
                    logits = np.where(logits >= np.sort(logits)[-top_k], logits, -np.inf)
                p = np.exp(logits - logits.max())
                nxt = int(rng.choice(logits.size, p=p / p.sum()))
            if stop_at_eot and nxt == self.eot:
                break
            ids.append(nxt)
        return self.tokenizer.decode(ids)  # Byte-level BPE: the prompt comes back exactly.
