"""Text to tokens (`jaxpipe prepare-data`) and the token loader: round trip, layout, determinism,
disjoint replicas, resumable position."""

import json

import numpy as np
import pytest
from mpi_util import REPO

from jaxpipe.cli import main
from jaxpipe.config import load_config
from jaxpipe.data.prepare import EOT, load_tokenizer, play_to_text, prepare_data
from jaxpipe.data.source import TokenFileSource, make_source, make_val_source, replica_sample_indices
from jaxpipe.errors import ConfigError


def corpus_files(tmp_path):
    """Real English and code from this repository: no download, and enough text for a 300-token BPE."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text((REPO / "README.md").read_text(encoding="utf-8") + "Ünïcödé survives: ✓ 日本語\n", encoding="utf-8")
    code = "".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "jaxpipe").glob("*.py")))
    b.write_text(code.replace(EOT, "EOT"), encoding="utf-8")  # text spelling out EOT would encode as EOT
    return [a, b]


def test_tokenizer_round_trip_and_token_files(tmp_path):
    files = corpus_files(tmp_path)
    out = tmp_path / "data"
    meta = prepare_data(files, out, vocab_size=300, val_fraction=0.1, log=lambda s: None)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["tokenizer"] == "tokenizer.json"
    assert json.loads((out / "meta.json").read_text()) == meta
    train = np.fromfile(out / "train.bin", np.uint16)
    val = np.fromfile(out / "val.bin", np.uint16)
    assert (train.size, val.size) == (meta["train"]["tokens"], meta["val"]["tokens"])
    assert val.size == round(0.1 * (train.size + val.size))
    assert int(max(train.max(), val.max())) < 300
    tok = load_tokenizer(out / "tokenizer.json")
    eot = tok.token_to_id(EOT)
    stream = np.concatenate([train, val]).tolist()
    assert stream.count(eot) == 2 and stream[-1] == eot  # one end-of-text after each file
    cut = stream.index(eot)
    texts = [f.read_text(encoding="utf-8") for f in files]
    assert tok.decode(stream[:cut]) == texts[0]  # byte-level BPE is lossless, Unicode included
    assert tok.decode(stream[cut + 1 : -1]) == texts[1]
    assert tok.encode(texts[0][:2000]).ids == stream[: len(tok.encode(texts[0][:2000]).ids)]

    # An existing tokenizer gives the same token files, and the CLI writes the same thing.
    again = tmp_path / "again"
    main(["prepare-data", *map(str, files), "--out", str(again), "--tokenizer", str(out / "tokenizer.json"),
          "--val-fraction", "0.1"])
    np.testing.assert_array_equal(np.fromfile(again / "train.bin", np.uint16), train)
    np.testing.assert_array_equal(np.fromfile(again / "val.bin", np.uint16), val)


def test_prepared_directory_as_data_path(tmp_path):
    out = tmp_path / "data"
    prepare_data(corpus_files(tmp_path), out, vocab_size=300, log=lambda s: None)
    cfg = load_config(None, ["data.source=tokens", f"data.path={out}", "model.vocab_size=320", "model.seq_len=16"])
    src, val = make_source(cfg.data, cfg.model), make_val_source(cfg.data, cfg.model)
    np.testing.assert_array_equal(src.samples(np.array([0]))[0], np.fromfile(out / "train.bin", np.uint16)[:17])
    np.testing.assert_array_equal(val.samples(np.array([0]))[0], np.fromfile(out / "val.bin", np.uint16)[:17])
    with pytest.raises(ConfigError, match="vocabulary of 300 tokens but model.vocab_size is 256"):
        make_source(cfg.data, load_config(None, ["model.vocab_size=256"]).model)
    with pytest.raises(ConfigError, match="directory without meta.json: write it with `jaxpipe prepare-data"):
        make_source(load_config(None, ["data.source=tokens", f"data.path={tmp_path}"]).data, cfg.model)
    with pytest.raises(ConfigError, match="give exactly one of --vocab-size"):
        prepare_data(corpus_files(tmp_path), out, log=lambda s: None)


def test_shuffled_loader_is_deterministic_per_epoch_and_disjoint_across_replicas(tmp_path):
    path = tmp_path / "t.bin"
    (np.arange(10 * 8 + 1) % 97).astype(np.uint16).tofile(path)  # 10 windows of 8 + 1
    src = TokenFileSource(str(path), "uint16", 97, 8, shuffle_seed=7)
    epoch0, epoch1 = src.window_index(np.arange(10)), src.window_index(np.arange(10, 20))
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))  # every window once per epoch
    assert list(epoch0) != list(epoch1) and list(epoch0) != list(range(10))
    # No hidden state: a fresh loader reading step k alone reads what a loader that read 0..k does.
    fresh = TokenFileSource(str(path), "uint16", 97, 8, shuffle_seed=7)
    np.testing.assert_array_equal(fresh.samples(np.arange(25, 30)), src.samples(np.arange(25, 30)))
    np.testing.assert_array_equal(src.window_index(np.arange(10)), epoch0)
    s = src.samples(np.array([3]))[0]
    assert s[0] == 8 * epoch0[3] and list(s) == list(range(s[0], s[0] + 9))  # a window of seq_len + 1 tokens
    # DP replicas: disjoint windows within an epoch (global batch 10 = one epoch).
    cfg = load_config(None, ["parallel.pp=1", "parallel.dp=2", "train.global_batch_size=10",
                             "train.micro_batch_size=5", "train.warmup_steps=1"])
    r0 = src.window_index(replica_sample_indices(cfg, 1, 0).ravel())
    r1 = src.window_index(replica_sample_indices(cfg, 1, 1).ravel())
    assert not set(r0) & set(r1) and sorted([*r0, *r1]) == list(range(10))
    assert TokenFileSource(str(path), "uint16", 97, 8, shuffle_seed=8).window_index(np.arange(10)).tolist() != \
        epoch0.tolist()


def test_play_markdown_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
          "**BERNARDO**  \nWho's there?  \n_\\[Aside]_  \nNay\\-say.\n")
    assert play_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and\nFRANCISCO\n\n"
                                "BERNARDO:\nWho's there?\n[Aside]\nNay-say.\n")
