"""Bad input: one-line errors that name the problem, and a model left exactly as it was after a failed load."""

from __future__ import annotations

import json

import pytest
import torch

from flashtune.errors import AdapterLoadError, ConfigError, FlashtuneError
from flashtune.tuners import (AdapterConfig, LoraConfig, PrefixConfig, attach, delete_adapter, disable_adapters,
                              load_adapter, merge_adapter, save_adapter, set_active_adapter)
from tiny import random_ids, readonly, tiny_model


def snapshot(model):
    """Everything a failed load must leave untouched: tensors, module tree, grad flags, adapter state."""
    state = model.__dict__.get("_flashtune_tuners")
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": None if state is None else (sorted(state.configs), state.active, state.disabled),
        "hooks": (len(model._forward_pre_hooks), sum(len(m._forward_pre_hooks) for m in model.modules())),
    }


def assert_same(before, after):
    assert after["tree"] == before["tree"]
    assert after["grad"] == before["grad"]
    assert after["adapters"] == before["adapters"]
    assert after["hooks"] == before["hooks"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("targets,shown", [(["nope_proj"], "nope_proj"), ("layers.9.*", "layers.9"),
                                           (["lm_hea"], "lm_hea")])
def test_targets_matching_nothing(targets, shown):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        attach(model, LoraConfig(target_modules=targets))
    text = one_line(exc)
    assert shown in text and "q_proj" in text and "target_modules" in text
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("make,field", [
    (lambda: LoraConfig(r=0), "r"), (lambda: LoraConfig(r=2.5), "r"), (lambda: LoraConfig(r=True), "r"),
    (lambda: LoraConfig(lora_alpha=0), "lora_alpha"), (lambda: LoraConfig(lora_alpha=-4), "lora_alpha"),
    (lambda: LoraConfig(lora_dropout=1.0), "lora_dropout"), (lambda: LoraConfig(target_modules=[]), "target_modules"),
    (lambda: LoraConfig(target_modules="q_proj("), "target_modules"),
    (lambda: PrefixConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: PrefixConfig(num_virtual_tokens=-3), "num_virtual_tokens"),
    (lambda: PrefixConfig(num_virtual_tokens=2.0), "num_virtual_tokens"),
    (lambda: PrefixConfig(encoder_hidden_size=0), "encoder_hidden_size"),
    (lambda: AdapterConfig(bottleneck_size=0), "bottleneck_size"),
    (lambda: AdapterConfig(adapter_type="parallel"), "adapter_type"),
    (lambda: AdapterConfig(non_linearity="softmax"), "non_linearity"),
])
def test_invalid_config_fields(make, field):
    with pytest.raises(ConfigError) as exc:
        make()
    assert one_line(exc).startswith(f"{field}=")


def test_choice_errors_list_allowed_values():
    with pytest.raises(ConfigError, match="'houlsby', 'pfeiffer'"):
        AdapterConfig(adapter_type="parallel")


@pytest.mark.parametrize("config", [LoraConfig(r=3, lora_alpha=6.5, target_modules=["q_proj"], use_rslora=True),
                                    AdapterConfig(adapter_type="pfeiffer", bottleneck_size=7, init="identity"),
                                    PrefixConfig(num_virtual_tokens=4, prefix_projection=False)])
def test_config_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config
    with pytest.raises(ConfigError, match="no field"):
        type(config).from_dict({**data, "rank": 4})


def _lora_dir(tmp_path, **overrides):
    model = tiny_model("llama", **overrides)
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "adapter")


def test_adapter_for_another_base_names_first_differing_key(tmp_path):
    path = _lora_dir(tmp_path, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as exc:
        load_adapter(model, path)
    text = one_line(exc)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in text
    assert "(4, 48)" in text and "(4, 32)" in text
    assert_same(before, snapshot(model))


def test_adapter_with_more_layers_is_rejected(tmp_path):
    path = _lora_dir(tmp_path, num_hidden_layers=3)
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=r"layers\.2\."):
        load_adapter(model, path)
    assert_same(before, snapshot(model))


def test_prefix_for_another_base(tmp_path):
    other = tiny_model("llama", num_hidden_layers=3)
    attach(other, PrefixConfig(num_virtual_tokens=2))
    save_adapter(other, tmp_path)
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match="prompt_embeddings"):
        load_adapter(model, tmp_path)
    assert_same(before, snapshot(model))


def _corrupt(kind, path):
    if kind == "missing_dir":
        return path / "nowhere"
    if kind == "missing_weights":
        (path / "adapter_model.safetensors").unlink()
    elif kind == "missing_config":
        (path / "adapter_config.json").unlink()
    elif kind == "bad_json":
        (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    elif kind == "unknown_type":
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, "peft_type": "IA3"}))
    elif kind == "bad_field":
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, "r": 0}))
    elif kind == "unsupported":
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, "use_dora": True}))
    elif kind == "truncated":
        blob = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif kind == "garbage":
        (path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return path


@pytest.mark.parametrize("kind", ["missing_dir", "missing_weights", "missing_config", "bad_json", "unknown_type",
                                  "bad_field", "unsupported", "truncated", "garbage"])
def test_missing_or_corrupt_files(tmp_path, kind):
    path = _corrupt(kind, _lora_dir(tmp_path))
    model = tiny_model("llama")
    attach(model, AdapterConfig(bottleneck_size=3), adapter_name="kept")  # a failed load must not touch it
    with disable_adapters(model):
        pass
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as exc:
        load_adapter(model, path, adapter_name="new")
    one_line(exc)
    assert_same(before, snapshot(model))


def test_name_clash_and_unknown_names():
    model = tiny_model("gpt2")
    attach(model, LoraConfig())
    with pytest.raises(ConfigError, match="already attached"):
        attach(model, LoraConfig(), adapter_name="default")
    with pytest.raises(ConfigError, match="identifier"):
        attach(model, LoraConfig(), adapter_name="a.b")
    with pytest.raises(FlashtuneError, match="no adapter named 'other'"):
        set_active_adapter(model, "other")
    with pytest.raises(FlashtuneError, match="no adapters"):
        save_adapter(tiny_model("gpt2"), "/tmp/never-written")


def test_merged_model_refuses_to_switch(tmp_path):
    model = tiny_model("llama")
    attach(model, LoraConfig(), adapter_name="a")
    attach(model, AdapterConfig(), adapter_name="b")
    set_active_adapter(model, "a")
    merge_adapter(model)
    with pytest.raises(FlashtuneError, match="unmerge_adapter"):
        set_active_adapter(model, "b")
    with pytest.raises(FlashtuneError, match="unmerge_adapter"):
        delete_adapter(model, "a")


def test_three_methods_on_one_model():
    model = tiny_model("llama")
    ids = random_ids(2, 5)
    base = model(ids).logits
    outs = {}
    for name, config in (("lora", LoraConfig(init_lora_weights=False)), ("adapter", AdapterConfig()),
                         ("prefix", PrefixConfig(num_virtual_tokens=2))):
        attach(model, config, adapter_name=name)
        outs[name] = model(ids).logits
    for name, out in outs.items():
        set_active_adapter(model, name)
        torch.testing.assert_close(model(ids).logits, out, atol=0, rtol=0)
        assert (out - base).abs().max() > 0
    for name in list(outs):
        delete_adapter(model, name)
    torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in tiny_model("llama").named_modules()]
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_prefix_refuses_gradient_checkpointing(arch):
    model = tiny_model(arch)
    attach(model, PrefixConfig(num_virtual_tokens=2))
    model.gradient_checkpointing_enable()
    model.train()
    ids = random_ids(1, 4)
    kwargs = {"decoder_input_ids": ids} if arch == "bart" else {}
    with pytest.raises(FlashtuneError, match="gradient checkpointing") as exc:
        model(input_ids=ids, labels=ids, **kwargs)
    one_line(exc)


# ------------------------------------------------------------------------------ issue 13: hostile adapters
def _rewrite_weights(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: fn(v) for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind,words", [("nan", "NaN or inf"), ("inf_one", "NaN or inf"), ("int32", "dtype int32"),
                                        ("float64_ok", None)])
def test_non_finite_or_integer_adapter_is_refused_before_the_model_changes(tmp_path, kind, words):
    path = _lora_dir(tmp_path)
    if kind == "nan":
        _rewrite_weights(path, lambda t: torch.full_like(t, float("nan")))
    elif kind == "inf_one":
        _rewrite_weights(path, lambda t: t.flatten().index_fill(0, torch.tensor([0]), float("inf")).view_as(t))
    elif kind == "int32":
        _rewrite_weights(path, lambda t: t.to(torch.int32))
    else:                                     # another float dtype is fine: PEFT casts too
        _rewrite_weights(path, lambda t: t.double())
    model = tiny_model("llama")
    before = snapshot(model)
    if words is None:
        load_adapter(model, path)
        return
    with pytest.raises(AdapterLoadError) as exc:
        load_adapter(model, path)
    assert words in one_line(exc) and "adapter_model.safetensors" in str(exc.value)
    assert_same(before, snapshot(model))


def test_save_adapter_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    model = tiny_model("llama")
    attach(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(FlashtuneError) as exc:
        save_adapter(model, tmp_path / "out")
    assert "non-finite" in one_line(exc) and "lora_B" in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["read_only", "under_a_file", "is_a_file"])
def test_save_adapter_into_an_unwritable_place_is_one_line(tmp_path, monkeypatch, where):
    model = tiny_model("llama")
    attach(model, LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "f").write_text("a file")
    if where == "read_only":
        target = tmp_path / "ro"
        target.mkdir()
        readonly(monkeypatch, target)
        word = "permission"
    else:
        target = tmp_path / "f" / "adapter" if where == "under_a_file" else tmp_path / "f"
        word = "not a folder"
    try:
        with pytest.raises(FlashtuneError) as exc:
            save_adapter(model, target)
        assert word in one_line(exc) and str(target) in str(exc.value)
    finally:
        (tmp_path / "ro").chmod(0o755) if (tmp_path / "ro").exists() else None
    assert (tmp_path / "f").read_text() == "a file"


def test_saved_adapter_files_follow_the_umask(tmp_path):
    import os
    import stat

    model = tiny_model("llama")
    attach(model, LoraConfig(r=2, target_modules=["q_proj"]))
    old = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "a")
    finally:
        os.umask(old)
    for f in (tmp_path / "a").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
