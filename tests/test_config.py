import dataclasses
import re
from pathlib import Path

import pytest

from jaxpipe.config import Config, load_config
from jaxpipe.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_REFERENCE = CONFIGS.parent / "docs" / "configuration.md"


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(CONFIGS / "tiny.yaml") == load_config(None) == Config()


def test_xl_config_matches_the_original_setting():
    cfg = load_config(CONFIGS / "gpt3_xl.yaml")
    m = cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.seq_len, m.vocab_size) == (24, 2048, 16, 2048, 50257)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.parallel.pp) == (64, 1, 4)
    assert cfg.num_microbatches == 64


def test_docs_key_table_lists_every_config_key():
    """docs/configuration.md's table is the users' reference for `--set`: a key added without it is a key nobody
    finds."""
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", CONFIG_REFERENCE.read_text(encoding="utf-8"), re.MULTILINE))
    for section in dataclasses.fields(Config):
        listed = {k for k in re.findall(r"`([^`]+)`", rows.get(section.name, "")) if re.fullmatch(r"[a-z_]\w*", k)}
        fields = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert listed == fields, (section.name, sorted(fields - listed), sorted(listed - fields))


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["parallel.pp=2", "parallel.partition=[3, 5]", "model.n_layer=8", "train.lr=1e-3"])
    assert cfg.parallel.pp == 2 and cfg.parallel.partition == [3, 5] and cfg.train.lr == 1e-3


def test_preset_fields_can_be_overridden():
    cfg = load_config(None, ["model.preset=xl", "model.n_layer=4"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.seq_len) == (4, 2048, 2048)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("train.steps=three", "train.steps: expected an integer, got 'three'"),
        ("parallel.schedule=zigzag", "parallel.schedule: 'zigzag' is not one of 'gpipe', '1f1b'"),
        ("model.scan_blocks=3", "model.scan_blocks: expected true or false, got 3"),
        ("optim.lr=3", "unknown config section 'optim'"),
        ("train.micro_batch_size=3", "train.micro_batch_size (3) must divide the per-replica batch"),
        ("model.n_head=5", "model.d_model (128) must be divisible by model.n_head (5)"),
        ("steps=3", "--set steps: keys look like section.name"),
        ("parallel.extra_warmup=2", "parallel.extra_warmup (2) applies to parallel.schedule=1f1b only (got gpipe)"),
        ("parallel.stage_remat=[none,dots]", "parallel.stage_remat has 2 entries, need parallel.pp = 4"),
        ("parallel.stage_remat=[none,none,none,all]", "parallel.stage_remat: 'all' is not one of 'none', 'block'"),
        ("parallel.tied_grad_dtype=int4", "parallel.tied_grad_dtype: 'int4' is not one of 'float32', 'bfloat16'"),
        ("parallel.dp_mode=diloco", "parallel.dp_mode=diloco needs parallel.dp >= 2: DiLoCo's outer step averages"),
        ("parallel.diloco_inner_steps=0", "parallel.diloco_inner_steps must be at least 1, got 0"),
        ("parallel.grad_codec=int4", "parallel.grad_codec=int4 compresses the data-parallel exchange, and with "
                                     "parallel.dp=1 there is none"),
        ("parallel.diloco_stagger=true", "parallel.diloco_stagger staggers DiLoCo's outer steps, but parallel.dp_mode"),
        ("parallel.dp_mode=streaming_diloco parallel.dp=2 parallel.diloco_inner_steps=4 "
         "parallel.diloco_overlap_steps=4",
         "parallel.diloco_overlap_steps (4) must be at least 0 and below parallel.diloco_inner_steps (4)"),
        ("parallel.dp_mode=streaming_diloco parallel.dp=2 parallel.diloco_fragments=9",
         "parallel.diloco_fragments (9) must be between 1 and model.n_layer (8)"),
        ("parallel.dp_mode=nope", "parallel.dp_mode: 'nope' is not one of 'central_ps', 'sharded_ps', 'allreduce', "
                                  "'diloco', 'streaming_diloco'"),
        ("train.loss_scale_init=0", "train.loss_scale_init must be a finite number >= 1 (a power of two such as "
                                    "the default 65536 keeps scaling exact), got 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split(" "))
    assert message in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config nope.yaml: no such file"):
        load_config("nope.yaml")


@pytest.mark.parametrize(("overrides", "message"), [
    # gpipe_ring cuts pp + 1 chunks (issue 24): one more than the layers allow is refused before compiling.
    (["parallel.schedule=gpipe_ring", "model.n_layer=4", "parallel.pp=4"],
     "parallel.schedule=gpipe_ring's 5 chunks is larger than model.n_layer (4): a stage would be empty"),
    (["parallel.schedule=gpipe_ring", "parallel.virtual_stages=2"],
     "parallel.virtual_stages=2 needs a schedule over several chunks per rank (interleaved_1f1b); gpipe_ring runs"),
    (["parallel.schedule=gpipe_ring", "parallel.partition=[2,2]", "parallel.pp=2"],
     "parallel.partition has 2 stages but the schedule cuts 3 chunks"),
])
def test_gpipe_ring_settings_refused_before_compiling(overrides, message):
    from jaxpipe.pipeline.partition import config_partition
    from jaxpipe.pipeline.schedule import config_schedule

    with pytest.raises(ConfigError) as e:
        cfg = load_config(None, overrides)
        config_partition(cfg, config_schedule(cfg))
    assert message in str(e.value)
