"""Fine-tuning from a checkpoint (`train.init_from`): the run adopts the checkpoint's model section.

`train.init_from=CKPT` starts from CKPT's weights with a fresh optimizer at step 0 (unlike
`--resume`, which continues a run: optimizer, step, data position). The model is the checkpoint's:
its model section replaces the config's, and a model key the user set (in the file, by `--set`, or
through a preset) that disagrees with it is refused, naming the key, before anything runs. Keys
that fix no parameter stay the user's: the compute dtype, attention kernel, scan/remat, and for
llama a shorter `seq_len` (rotary positions have no table).

The data must speak the checkpoint's tokenizer: when both the checkpoint and the prepared data
directory hold a tokenizer.json and the two differ, the run is refused (prepare the data with
`jaxpipe prepare-data --tokenizer CKPT/tokenizer.json`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxpipe.config import Config, ModelConfig, config_from_dict, load_tree, resolve_world
from jaxpipe.errors import ConfigError

FREE_KEYS = ("preset", "dtype", "attention", "scan_blocks", "remat", "init_std")


def adopt_model(tree: dict[str, Any], saved: dict[str, Any], ckpt: str) -> dict[str, Any]:
    """`tree` (a raw config) with its model section replaced by the checkpoint's (`saved`), keeping
    the user's free keys; a disagreeing model key is a ConfigError naming every one."""
    from jaxpipe.config import _apply_model_preset

    saved = {**dataclasses.asdict(ModelConfig()), **saved}
    given = dict(tree.get("model") or {})
    explicit = _apply_model_preset(given) if "preset" in given else given
    kept, bad = {}, []
    for key, value in explicit.items():
        if key not in saved:
            continue  # an unknown key: config_from_dict names it
        if key in FREE_KEYS:
            kept[key] = value
        elif key == "seq_len" and saved["arch"] == "llama" and isinstance(value, int) and value <= saved[key]:
            kept[key] = value  # RoPE: no parameter depends on the length
        elif value != saved[key]:
            bad.append(f"model.{key}={value!r} (the checkpoint's is {saved[key]!r})")
    if bad:
        raise ConfigError(f"train.init_from={ckpt}: the run adopts the checkpoint's model section, and "
                          f"{'; '.join(bad)} disagree{'s' if len(bad) == 1 else ''} with it: drop "
                          f"{'it' if len(bad) == 1 else 'them'} (only model.dtype, attention, scan_blocks, remat"
                          f"{' and a shorter seq_len' if saved['arch'] == 'llama' else ''} may differ)")
    kept.pop("preset", None)
    return {**tree, "model": {**saved, **kept}}


def check_tokenizer(cfg: Config, ckpt: Path) -> None:
    from jaxpipe.train.checkpoint import TOKENIZER_FILE

    if cfg.data.source != "tokens" or not cfg.data.path or not Path(cfg.data.path).is_dir():
        return
    ours, theirs = ckpt / TOKENIZER_FILE, Path(cfg.data.path) / TOKENIZER_FILE
    if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
        raise ConfigError(f"data.path '{cfg.data.path}' was tokenised with another tokenizer than train.init_from's "
                          f"('{theirs}' differs from '{ours}'): prepare the data with `jaxpipe prepare-data "
                          f"--tokenizer {ours} ...`")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """`jaxpipe.config.load_config`, with `train.init_from`'s model section adopted (see the module)."""
    tree = load_tree(path, overrides)
    ckpt = (tree.get("train") or {}).get("init_from") if isinstance(tree.get("train"), dict) else None
    if ckpt:
        from jaxpipe.train import checkpoint

        resolved = checkpoint.resolve(str(ckpt))
        tree = adopt_model(tree, checkpoint.read_state(resolved)["config"]["model"], str(ckpt))
    cfg = config_from_dict(tree)
    if ckpt:
        check_tokenizer(cfg, resolved)
    return cfg if world_size is None else resolve_world(cfg, world_size)


def check_init_from(ckpt: str, names: list[str]) -> Path:
    """The resolved checkpoint, after the items this rank reads were checked against their checksums."""
    from jaxpipe.train import checkpoint

    resolved = checkpoint.resolve(ckpt)
    if (bad := checkpoint.verify(resolved, names)) is not None:
        raise ConfigError(f"train.init_from '{ckpt}' is damaged or incomplete: {bad}")
    return resolved
