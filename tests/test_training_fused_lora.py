"""The fused LoRA linear against the tuner's own LoRA layers (fp32, exact up to rounding), against an fp64
model under bf16 autocast (flash-attention's error-ratio rule), its fallbacks, and inside fit()."""

import copy

import pytest
import torch

from flashtune.training import TrainConfig, fit
from flashtune.training.fused_lora import fuse_lora, unfuse_lora
from flashtune.tuners import LoraConfig, attach, disable_adapters
from tiny import random_ids, tiny_model

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(arch, **lora):
    model = tiny_model(arch)
    torch.manual_seed(3)
    kw = dict(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=False)   # B != 0: the branch matters
    attach(model, LoraConfig(**{**kw, **lora}))
    return model


def _loss_and_grads(model, ids, autocast=False):
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: q/k/v carry a bias
def test_fused_equals_reference_layers_fp32(arch):
    ref = _lora_model(arch)
    fused = copy.deepcopy(ref)
    assert fuse_lora(fused) == 14
    ids = random_ids(2, 11, seed=5)
    loss_r, grads_r = _loss_and_grads(ref, ids)
    loss_f, grads_f = _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=1e-6)
    for gf, gr in zip(grads_f, grads_r):
        assert gf.dtype == gr.dtype == torch.float32
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-7)
    unfuse_lora(fused)
    assert not any("forward" in m.__dict__ for m in fused.modules())


def test_fused_bf16_autocast_error_is_within_twice_the_reference_error():
    ref = _lora_model("llama")
    fused = copy.deepcopy(ref)
    fuse_lora(fused)
    exact = copy.deepcopy(ref).double()
    ids = random_ids(2, 16, seed=6)
    loss_x, grads_x = _loss_and_grads(exact, ids)
    loss_r, grads_r = _loss_and_grads(ref, ids, autocast=True)
    loss_f, grads_f = _loss_and_grads(fused, ids, autocast=True)
    assert abs(loss_f.double() - loss_x) <= 2 * abs(loss_r.double() - loss_x) + 1e-4
    for gf, gr, gx in zip(grads_f, grads_r, grads_x):
        assert gf.dtype == torch.float32
        assert (gf.double() - gx).norm() <= 2 * (gr.double() - gx).norm() + 1e-5 * gx.norm()


def test_fused_falls_back_where_it_does_not_apply():
    ids = random_ids(2, 9, seed=7)
    # GPT-2's Conv1D, disabled adapters: the layer's own forward runs.
    for model in (_lora_model("gpt2", target_modules=["c_attn"]),):
        fused = copy.deepcopy(model)
        assert fuse_lora(fused) > 0
        model.train(), fused.train()
        torch.manual_seed(0)
        loss_r, _ = _loss_and_grads(model, ids)
        torch.manual_seed(0)
        loss_f, _ = _loss_and_grads(fused, ids)
        assert torch.equal(loss_f, loss_r)
    base = tiny_model("llama")
    fused = _lora_model("llama")
    fuse_lora(fused)
    with disable_adapters(fused), torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_fit_with_and_without_fused_lora_trains_the_same(tmp_path):
    ids = random_ids(16, 12, seed=8)
    data = [{"input_ids": r, "labels": r} for r in ids]
    out = {}
    for fused in (False, True):
        model = _lora_model("llama")
        cfg = TrainConfig(out_dir=str(tmp_path / str(fused)), max_steps=3, batch_size=4, lr=1e-2, log_every=1,
                          fused_lora=fused)
        res = fit(model, data, cfg, progress=False)
        assert not any("forward" in m.__dict__ for m in model.modules())     # unfused after training
        out[fused] = ([r["loss"] for r in res.history],
                      {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for n, w in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], w, rtol=1e-5, atol=1e-7)


def test_fused_dropout_matches_a_float64_reference_with_the_same_mask(monkeypatch):
    """lora_dropout > 0 in training: output and every gradient (input, A, B) equal a float64 autograd
    computation of x W^T + b + s ((x * keep / (1 - p)) A^T) B^T with the mask the kernel drew."""
    from flashtune.training import fused_lora

    model = _lora_model("qwen2", lora_dropout=0.3)   # q_proj: a bias too
    layer = model.model.layers[0].self_attn.q_proj
    fuse_lora(model)
    model.train()
    masks = []
    draw = fused_lora.keep_mask
    monkeypatch.setattr(fused_lora, "keep_mask", lambda x2, p: masks.append(draw(x2, p)) or masks[-1])
    x = torch.randn(2, 5, layer.base_layer.in_features, requires_grad=True)
    name = layer.live_adapter()
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    y = layer(x)
    gy = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), gy)
    assert len(masks) == 1 and 0 < masks[0].float().mean() < 1
    keep = masks[0].double().view(x.shape)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    w64, bias64 = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y64 = x64 @ w64.t() + bias64 + layer.scaling[name] * ((x64 * keep / 0.7) @ a64.t()) @ b64.t()
    want = torch.autograd.grad(y64, (x64, a64, b64), gy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    for got, ref in zip((gx, ga, gb), want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    model.eval()  # no dropout in eval: exactly the reference layer
    ref = copy.deepcopy(model)
    unfuse_lora(ref)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref.model.layers[0].self_attn.q_proj(x), rtol=1e-6, atol=1e-6)


def test_dropout_mask_keeps_each_element_with_probability_one_minus_p():
    """A binomial test on 400k draws at p = 0.3 and 0.05 (5 standard deviations), and the kept elements'
    scaling leaves the branch input unbiased."""
    from flashtune.training.fused_lora import _dropped, keep_mask

    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    for p in (0.3, 0.05):
        keep = keep_mask(x, p)
        n, kept = keep.numel(), keep.sum().item()
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(kept - n * (1 - p)) < 5 * sd
        assert abs(_dropped(x, keep, p).mean().item() - 1.0) < 5 * sd / n / (1 - p)
