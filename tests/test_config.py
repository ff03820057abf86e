"""Config validation: every numeric field has a range, checked with one message naming the key and the range."""

import math

import pytest

from dyntrm.config import PRESETS, ConfigError, apply_overrides, fields, from_dict, preset, to_dict, validate
from helpers import assert_user_error, cli

# (override, words the message must hold): the probes of issue 15, item 7, and the other fields' ends
BAD = [
    ("train.lr=-1", "train.lr=-1.0: must be > 0"),
    ("train.lr=nan", "train.lr=nan"),
    ("train.lr=inf", "train.lr=inf"),
    ("train.beta1=2", "train.beta1=2.0: must be in [0, 1)"),
    ("train.beta2=1", "train.beta2=1.0: must be in [0, 1)"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0: must be >= 0"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.warmup=-1", "train.warmup=-1: must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.keep=-1", "train.keep"),
    ("train.save_every=-2", "train.save_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.eval_tasks=0", "train.eval_tasks"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.threads=-1", "train.threads"),
    ("train.act_gamma=1.5", "train.act_gamma"),
    ("train.act_weight=-1", "train.act_weight"),
    ("train.time_budget_s=-5", "train.time_budget_s"),
    ("train.routing_lr_mult=-1", "train.routing_lr_mult"),
    ("train.seed=-1", "train.seed=-1"),
    ("train.l1_init=nan", "train.l1_init=nan"),
    ("train.l1_factor=nan", "train.l1_factor=nan"),
    ("train.steps=0", "train.steps=0: must be >= 1"),
    ("model.n_heads=0", "model.n_heads=0: must be >= 1"),
    ("model.d_model=0", "model.d_model=0: must be >= 1"),
    ("model.d_model=-4", "model.d_model=-4"),
    ("model.attn_experts=0", "model.attn_experts=0: must be >= 1"),
    ("model.attn_hidden=-1", "model.attn_hidden"),
    ("model.ffn_experts=0", "model.ffn_experts"),
    ("model.ffn_mult=0", "model.ffn_mult=0: must be >= 1"),
    ("model.vocab_size=1", "model.vocab_size=1"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0: must be in (0, 1)"),
    ("model.norm_eps=0", "model.norm_eps"),
    ("model.rope_base=0", "model.rope_base=0.0: must be > 1"),
    ("model.halt_threshold=nan", "model.halt_threshold=nan: must be in [0, 1]"),
    ("model.halt_threshold=1.5", "model.halt_threshold"),
    ("model.max_positions=-1", "model.max_positions"),
    ("model.ffn_active=nan", "model.ffn_active"),
    ("shaping.meta_weight=-1", "shaping.meta_weight"),
    ("shaping.fars_weight=nan", "shaping.fars_weight"),
    ("shaping.token_rate=0", "shaping.token_rate"),
    ("data.repeats=0", "data.repeats"),
    ("data.max_side=31", "data.max_side"),
]


@pytest.mark.parametrize("override,words", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_values_are_refused_naming_key_and_range(override, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(preset("debug"), [override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_field_has_a_range_and_every_preset_is_valid():
    from dyntrm.config import RANGES

    numeric = {k for k, (_, _, tp) in fields(preset("debug")).items() if tp in (int, float)}
    assert numeric == set(RANGES)
    for name in PRESETS:
        validate(preset(name))
        validate(from_dict(to_dict(preset(name))))


def test_a_config_file_with_a_nan_or_a_section_of_the_wrong_kind_is_refused():
    d = to_dict(preset("debug"))
    d["model"]["halt_threshold"] = math.nan  # json.loads reads NaN
    with pytest.raises(ConfigError, match=r"model.halt_threshold=nan: must be in \[0, 1\]"):
        from_dict(d)
    with pytest.raises(ConfigError, match="model: expected a JSON object of keys, got list"):
        from_dict({"model": [1, 2]})


@pytest.mark.parametrize("override", ["model.n_heads=0", "train.lr=-1", "model.halt_threshold=nan"])
def test_the_cli_refuses_them_in_one_line(capsys, tmp_path, override):
    assert_user_error(cli(capsys, "train", "--preset", "debug", "--out", tmp_path / "run", "--set", "train.steps=1",
                          "--set", override),
                      override.split("=")[0])
    assert not (tmp_path / "run").exists()
