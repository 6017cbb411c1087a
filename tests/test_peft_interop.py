"""Interop with Hugging Face PEFT, both ways: files flashtune writes load in `peft` with the same logits, and
files `peft` writes load in flashtune with the same logits (fp32, atol 1e-5). PEFT is the oracle here."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from flashtune.tuners import LoraConfig, PrefixConfig, attach, load_adapter, save_adapter, unload
from tiny import random_ids, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def smollm2():
    from flashtune.models import load_base_model

    model, _ = load_base_model()
    return model


def _logits(model, ids, arch):
    kwargs = {"decoder_input_ids": ids} if arch == "bart" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _randomize_lora(model, seed=1):
    """Give every LoRA B a random value so that the adapter is not the identity (B = 0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


LORA_CASES = [
    ("gpt2", dict(target_modules=["c_attn"])),
    ("gpt2", dict(target_modules="all-linear", use_rslora=True, lora_alpha=16, r=4)),
    ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=r".*\.(k_proj|down_proj)", r=2, lora_alpha=5)),
    ("qwen2", dict(target_modules="all-linear", r=4, lora_alpha=32)),
]


@pytest.mark.parametrize("arch,kwargs", LORA_CASES)
def test_lora_flashtune_to_peft(tmp_path, arch, kwargs):
    model = tiny_model(arch)
    ids = random_ids(2, 9)
    attach(model, LoraConfig(**kwargs))
    _randomize_lora(model)
    if "modules_to_save" in kwargs:
        with torch.no_grad():
            model.lm_head.copies["default"].weight.mul_(1.5)
    ours = _logits(model, ids, arch)
    save_adapter(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys)

    theirs_model = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    theirs = _logits(theirs_model, ids, arch)
    base = _logits(tiny_model(arch), ids, arch)
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,kwargs", LORA_CASES)
def test_lora_peft_to_flashtune(tmp_path, arch, kwargs):
    pcfg = dict(kwargs)
    pmodel = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(task_type="CAUSAL_LM", **pcfg))
    _randomize_lora(pmodel, seed=2)
    ids = random_ids(2, 9, seed=3)
    theirs = _logits(pmodel, ids, arch)
    pmodel.save_pretrained(str(tmp_path))

    model = tiny_model(arch)
    load_adapter(model, tmp_path)
    ours = _logits(model, ids, arch)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_smollm2_both_ways(tmp_path, smollm2):
    # One copy of the 135M model serves all three: each side's unload() gives the untouched base back.
    model = smollm2
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    attach(model, LoraConfig())  # defaults: r=8, alpha=8, q_proj/v_proj
    _randomize_lora(model, seed=4)
    ours = _logits(model, ids, "llama")
    save_adapter(model, tmp_path / "ours")
    model = unload(model, merge=False)

    theirs_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(theirs_model, ids, "llama"), ours, atol=ATOL, rtol=0)
    _randomize_lora(theirs_model, seed=5)
    theirs = _logits(theirs_model, ids, "llama")
    theirs_model.save_pretrained(str(tmp_path / "theirs"))
    model = theirs_model.unload()

    load_adapter(model, tmp_path / "theirs")
    torch.testing.assert_close(_logits(model, ids, "llama"), theirs, atol=ATOL, rtol=0)
    unload(model, merge=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_prefix_flashtune_to_peft(tmp_path, arch):
    model = tiny_model(arch)
    attach(model, PrefixConfig(num_virtual_tokens=4, encoder_hidden_size=24))  # trained through the MLP
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    ours = _logits(model, ids, arch)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    assert list(load_file(str(tmp_path / "adapter_model.safetensors"))) == ["prompt_embeddings"]

    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, ours, atol=ATOL, rtol=0)
    model.generation_config.eos_token_id = None
    theirs.base_model.generation_config.eos_token_id = None
    ours_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    theirs_gen = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert ours_gen.tolist() == theirs_gen.tolist()


@pytest.mark.parametrize("arch,projection", [("llama", True), ("gpt2", False)])
def test_prefix_peft_to_flashtune(tmp_path, arch, projection):
    pconfig = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection)
    pmodel = peft.get_peft_model(tiny_model(arch), pconfig)
    ids = random_ids(2, 6, seed=3)
    with torch.no_grad():
        theirs = pmodel(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    pmodel.save_pretrained(str(tmp_path))

    model = tiny_model(arch)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(_logits(model, ids, arch), theirs, atol=ATOL, rtol=0)
    base = _logits(tiny_model(arch), ids, arch)
    assert (theirs - base).abs().max() > 1e-3


def test_default_parameter_counts_on_smollm2(smollm2):
    """Each method's default settings on the default model: trainable count == closed-form formula."""
    from flashtune.tuners import AdapterConfig

    cfg = smollm2.config
    layers, d, heads, kv = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = d // heads
    m, p, mid, width = 64, 10, 512, 2 * layers * kv * head_dim
    expected = {
        "lora": layers * 8 * ((d + heads * head_dim) + (d + kv * head_dim)),
        "houlsby": 2 * layers * (2 * d * m + m + d),
        "pfeiffer": layers * (2 * d * m + m + d),
        "prefix": p * d + d * mid + mid + mid * width + width,
    }
    configs = {"lora": LoraConfig(), "houlsby": AdapterConfig(), "pfeiffer": AdapterConfig(adapter_type="pfeiffer"),
               "prefix": PrefixConfig()}
    for name, config in configs.items():
        attach(smollm2, config, adapter_name=name)
        assert sum(p.numel() for p in smollm2.parameters() if p.requires_grad) == expected[name], name
    unload(smollm2, merge=False)
    assert not any(p.requires_grad for p in smollm2.parameters())


# ------------------------------------------------------------------- issue 13: PEFT's behaviour and features
def test_loaded_lora_with_dropout_is_in_eval_mode_like_peft(tmp_path):
    """PEFT's from_pretrained returns the model in eval mode, so its dropout is off: same logits, every call."""
    pmodel = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    _randomize_lora(pmodel, seed=4)
    pmodel.save_pretrained(str(tmp_path))
    ids = random_ids(2, 9, seed=5)
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama").train(), str(tmp_path))
    theirs = _logits(loaded, ids, "llama")
    model = tiny_model("llama").train()          # even a base left in train mode, as PEFT does
    load_adapter(model, tmp_path)
    assert not any(m.training for m in model.modules())
    first, second = _logits(model, ids, "llama"), _logits(model, ids, "llama")
    torch.testing.assert_close(first, theirs, atol=ATOL, rtol=0)
    assert torch.equal(first, second)


def _bdlora():
    from peft.tuners.lora.config import BdLoraConfig

    return BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)


@pytest.mark.filterwarnings("ignore::UserWarning")    # PEFT warns that it saves the embedding layers
@pytest.mark.parametrize("arch,kwargs,feature", [
    ("llama", dict(target_modules=["embed_tokens", "q_proj"]), "LoRA on an embedding layer"),
    ("qwen2", dict(target_modules=["lm_head", "q_proj"]), "LoRA on a tied lm_head"),
    ("qwen2", dict(target_modules=["lm_head", "q_proj"], ensure_weight_tying=True), "ensure_weight_tying"),
    ("llama", dict(target_modules=["q_proj", "o_proj"], use_bdlora="bd"), "BD-LoRA"),
])
def test_peft_features_flashtune_lacks_are_named(tmp_path, arch, kwargs, feature):
    from flashtune.errors import AdapterLoadError

    kwargs = {**kwargs, **({"use_bdlora": _bdlora()} if kwargs.get("use_bdlora") == "bd" else {})}
    pmodel = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(task_type="CAUSAL_LM", r=2, **kwargs))
    pmodel.save_pretrained(str(tmp_path))
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError) as exc:
        load_adapter(model, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and feature in msg, msg
    assert "another base model" not in msg and "does not fit this model" not in msg
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
