"""Property-based tests of the config validation layer (issue 13, item 1).

For every numeric field of TrainConfig and of each tuner config: any non-finite, wrongly typed or
out-of-range value is a one-line ConfigError that names the field; any valid value is accepted and the config
round-trips through to_dict / JSON / from_dict unchanged. The oracle is each field's documented range, written
out here independently of the code that checks it.
"""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtune.errors import ConfigError
from flashtune.training import TrainConfig
from flashtune.tuners import AdapterConfig, LoraConfig, PrefixConfig

# (config class, base kwargs that make the rest valid, field, integer?, low, high, low_open, high_open)
FIELDS = [
    (TrainConfig, {"max_steps": 1}, "lr", False, 0, 1e3, True, False),
    (TrainConfig, {"max_steps": 1}, "weight_decay", False, 0, None, False, False),
    (TrainConfig, {}, "max_steps", True, 0, None, False, False),
    (TrainConfig, {"max_steps": 1}, "epochs", False, 0, None, False, False),
    (TrainConfig, {}, "batch_size", True, 1, None, False, False),
    (TrainConfig, {}, "grad_accum", True, 1, None, False, False),
    (TrainConfig, {}, "max_grad_norm", False, 0, None, False, False),
    (TrainConfig, {}, "warmup_steps", True, 0, None, False, False),
    (TrainConfig, {}, "min_lr_ratio", False, 0, 1, False, False),
    (TrainConfig, {}, "eval_every", True, 0, None, False, False),
    (TrainConfig, {}, "save_every", True, 0, None, False, False),
    (TrainConfig, {}, "log_every", True, 1, None, False, False),
    (TrainConfig, {}, "seed", True, 0, None, False, False),
    (TrainConfig, {}, "keep_checkpoints", True, 1, None, False, False),
    (TrainConfig, {}, "ce_chunk_size", True, 0, None, False, False),
    (TrainConfig, {}, "gradient_checkpointing", False, 0, 1, False, False),
    (LoraConfig, {}, "r", True, 1, None, False, False),
    (LoraConfig, {}, "lora_alpha", False, 0, None, True, False),
    (LoraConfig, {}, "lora_dropout", False, 0, 1, False, True),
    (AdapterConfig, {}, "bottleneck_size", True, 1, None, False, False),
    (PrefixConfig, {}, "num_virtual_tokens", True, 1, None, False, False),
    (PrefixConfig, {}, "encoder_hidden_size", True, 1, None, False, False),
    (PrefixConfig, {}, "prefix_dropout", False, 0, 1, False, True),
]
IDS = [f"{c.__name__}.{f}" for c, _, f, *_ in FIELDS]
BIG = 10**12
PROFILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid(integer, low, high, low_open, high_open):
    if integer:
        lo = low + (1 if low_open else 0)
        hi = BIG if high is None else high - (1 if high_open else 0)
        return st.integers(lo, hi)
    floats = st.floats(low, 1e30 if high is None else high, exclude_min=low_open, exclude_max=high_open,
                       allow_nan=False, allow_infinity=False)
    ints = st.integers(low + (1 if low_open else 0), BIG if high is None else math.ceil(high) - 1)
    return floats | ints


def _invalid(integer, low, high, low_open, high_open):
    bad = [st.sampled_from([math.nan, math.inf, -math.inf, True, False, "1", None, [1]])]
    if not integer:
        bad.append(st.just(10**400))                       # an int no float can hold
    below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False, allow_infinity=False)
    bad.append(below.map(int).filter(lambda v: v < low or (low_open and v == low)) if integer else below)
    if high is not None:
        above = st.floats(min_value=high, exclude_min=not high_open, allow_nan=False, allow_infinity=False)
        bad.append(above)
    if integer:
        bad.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)))
        bad.append(st.integers(low + 1, BIG).map(float))        # 3.0 is not an integer field's value
    return st.one_of(bad)


def _one_line_naming(exc, field):
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{field}="), msg


@pytest.mark.parametrize("cls,base,field,integer,low,high,low_open,high_open", FIELDS, ids=IDS)
def test_bad_value_is_a_config_error_naming_the_field(cls, base, field, integer, low, high, low_open, high_open):
    @PROFILE
    @given(_invalid(integer, low, high, low_open, high_open))
    def check(value):
        if field == "gradient_checkpointing" and isinstance(value, bool):
            return                                  # documented: False / True mean 0 / 1
        with pytest.raises(ConfigError) as exc:
            cls(**{**base, field: value})
        _one_line_naming(exc, field)

    check()


@pytest.mark.parametrize("cls,base,field,integer,low,high,low_open,high_open", FIELDS, ids=IDS)
def test_valid_value_is_accepted_and_round_trips(cls, base, field, integer, low, high, low_open, high_open):
    @PROFILE
    @given(_valid(integer, low, high, low_open, high_open))
    def check(value):
        if cls is TrainConfig and field == "epochs" and value == 0 and not base.get("max_steps"):
            return
        config = cls(**{**base, field: value})
        assert getattr(config, field) == value
        data = json.loads(json.dumps(config.to_dict(), allow_nan=False))
        assert cls.from_dict(data) == config

    check()


@pytest.mark.parametrize("cls", [TrainConfig, LoraConfig, AdapterConfig, PrefixConfig])
def test_from_dict_refuses_what_is_not_a_table(cls):
    with pytest.raises(ConfigError, match="table of fields"):
        cls.from_dict([("lr", 1.0)])


@pytest.mark.parametrize("field", ["compile", "fused_lora", "resume", "overwrite", "drop_last"])
def test_train_flags_must_be_booleans(field):
    for value in (1, "yes", None, math.nan):
        with pytest.raises(ConfigError) as exc:
            TrainConfig(**{field: value})
        _one_line_naming(exc, field)


@pytest.mark.parametrize("value", ["", 5, None, "a\x00b"])
def test_train_out_dir_must_be_a_path(value):
    with pytest.raises(ConfigError) as exc:
        TrainConfig(out_dir=value)
    _one_line_naming(exc, "out_dir")
