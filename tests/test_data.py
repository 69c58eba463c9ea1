import numpy as np
import pytest

from jaxpipe.config import load_config
from jaxpipe.data.source import SyntheticSource, TokenFileSource, global_batch, make_source, replica_sample_indices
from jaxpipe.errors import ConfigError


def test_synthetic_is_deterministic_and_learnable():
    a = SyntheticSource(64, 16, seed=5).samples(np.arange(8))
    b = SyntheticSource(64, 16, seed=5).samples(np.arange(8))
    np.testing.assert_array_equal(a, b)
    succ = SyntheticSource(64, 16, seed=5).successor
    np.testing.assert_array_equal(a[:, 1:], succ[a[:, :-1]])  # next token is a function of the current one
    assert len(set(a[:, 0])) > 1


def test_replicas_read_disjoint_samples_that_make_up_the_global_batch():
    cfg = load_config(None, ["parallel.dp=2", "parallel.pp=2", "train.global_batch_size=8"])
    for step in range(3):
        r0 = replica_sample_indices(cfg, step, 0)
        r1 = replica_sample_indices(cfg, step, 1)
        assert r0.shape == (cfg.num_microbatches, cfg.train.micro_batch_size)
        assert not set(r0.ravel()) & set(r1.ravel())
        assert sorted([*r0.ravel(), *r1.ravel()]) == list(range(step * 8, step * 8 + 8))
    source = make_source(cfg.data, cfg.model)
    inputs, targets = global_batch(source, cfg, 1)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_token_file(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 50
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    src = TokenFileSource(str(path), "uint16", vocab_size=50, seq_len=10)
    assert src.n_samples == 99
    s = src.samples(np.array([0, 1, 99]))
    np.testing.assert_array_equal(s[0], tokens[:11])
    np.testing.assert_array_equal(s[1], tokens[10:21])
    np.testing.assert_array_equal(s[2], s[0])  # wraps around: the next epoch


def test_token_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path: no such file"):
        TokenFileSource(str(tmp_path / "missing.bin"), "uint16", 50, 10)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 41)
    with pytest.raises(ConfigError, match="not a whole number of uint16 tokens"):
        TokenFileSource(str(odd), "uint16", 50, 10)
    big = tmp_path / "big.bin"
    (np.arange(100, dtype=np.uint16) + 60).tofile(big)
    with pytest.raises(ConfigError, match="token id 70 >= model.vocab_size"):
        TokenFileSource(str(big), "uint16", 50, 10)
