"""LoRA oracles (SPEC §6): plain-PyTorch reference for the branch, Conv1D transposes, alpha scaling, merges."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flashtune.tuners import (LoraConfig, attach, delete_adapter, disable_adapters, merge_adapter,
                              merged_state_dict, set_active_adapter, unload, unmerge_adapter)
from tiny import random_ids, tiny_model


def _randomize(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_c_attn_branch_matches_plain_formula():
    """GPT-2's c_attn is a Conv1D (y = x W + b, W: [in, out]): the wrapped output must equal
    x W + b + s * x A^T B^T computed by hand, and the merged weight W + s (B A)^T."""
    model = tiny_model("gpt2")
    layer = model.transformer.h[0].attn.c_attn
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    attach(model, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"]))
    _randomize(model)
    wrapped = model.transformer.h[0].attn.c_attn
    a = wrapped.lora_A["default"].weight.detach()  # [r, in]
    bb = wrapped.lora_B["default"].weight.detach()  # [out, r]
    assert a.shape == (3, 32) and bb.shape == (96, 3)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    s = 6 / 3
    expected = x @ w.double() + b.double() + s * (x @ a.double().T @ bb.double().T)
    torch.testing.assert_close(wrapped(x.float()).double(), expected, atol=1e-5, rtol=0)
    merge_adapter(model)
    torch.testing.assert_close(wrapped.base_layer.weight.double(), w.double() + s * (bb.double() @ a.double()).T,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_doubling_alpha_doubles_delta(rslora):
    deltas = []
    for alpha in (4.0, 8.0):
        model = tiny_model("llama")
        attach(model, LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj"]))
        _randomize(model, seed=7)
        before = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
        merge_adapter(model)
        deltas.append(model.model.layers[0].self_attn.q_proj.base_layer.weight.detach() - before)
    torch.testing.assert_close(deltas[1], 2 * deltas[0], atol=1e-6, rtol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    expected_scale = 8.0 / (math.sqrt(4) if rslora else 4)
    assert q.scaling["default"] == pytest.approx(expected_scale)


def test_kaiming_init_and_zero_b():
    model = tiny_model("llama")
    attach(model, LoraConfig(r=8, target_modules=["v_proj"]))
    layer = model.model.layers[1].self_attn.v_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0
    # kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(a.shape[1])
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound


def test_dropout_is_applied_only_in_training():
    model = tiny_model("llama")
    attach(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    _randomize(model)
    ids = random_ids(1, 6)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    torch.manual_seed(0)
    first = model(ids).logits
    torch.manual_seed(1)
    assert not torch.allclose(first, model(ids).logits)


def test_two_adapters_switch_delete_and_unload():
    model = tiny_model("qwen2")
    ids = random_ids(2, 6)
    base = model(ids).logits
    attach(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="one")
    _randomize(model, seed=1)
    out_one = model(ids).logits
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), adapter_name="two")
    with torch.no_grad():  # only adapter "two" is trainable now: randomize it alone
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out_two = model(ids).logits
    assert (out_two - out_one).abs().max() > 1e-3
    set_active_adapter(model, "one")
    torch.testing.assert_close(model(ids).logits, out_one, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".one." in n for n in trainable)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)
    delete_adapter(model, "one")
    torch.testing.assert_close(model(ids).logits, out_two, atol=0, rtol=0)
    assert not any("one" in n for n, _ in model.named_parameters())
    merged = merged_state_dict(model)
    plain = unload(model, merge=True)
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(ids).logits, out_two, atol=1e-5, rtol=0)
    for key, tensor in plain.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, atol=1e-6, rtol=0)


def test_all_linear_excludes_head_and_fp16_base_keeps_fp32_adapters():
    model = tiny_model("llama", dtype=torch.float16)
    attach(model, LoraConfig(target_modules="all-linear"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.lm_head, nn.Linear)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    before = model.model.layers[0].mlp.up_proj.base_layer.weight.detach().clone()
    _randomize(model, scale=0.01)
    merge_adapter(model)
    unmerge_adapter(model)
    after = model.model.layers[0].mlp.up_proj.base_layer.weight
    assert after.dtype == torch.float16
    torch.testing.assert_close(after, before, atol=2e-3, rtol=0)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_with_modules_to_save(merge):
    ids = random_ids(2, 6)
    base = tiny_model("llama")(ids).logits
    model = tiny_model("llama")
    attach(model, LoraConfig(init_lora_weights=False, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.copies["default"].weight.mul_(2.0)
    adapted = model(ids).logits
    plain = unload(model, merge=merge)
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in tiny_model("llama").named_modules()]
    torch.testing.assert_close(plain(ids).logits, adapted if merge else base, atol=1e-5, rtol=0)
