"""The fused RMSNorm and SwiGLU kernels (flashtune/training/fused_ops.py) against float64 references, through
Triton's CPU interpreter (conftest sets TRITON_INTERPRET without CUDA), and wired into a tiny Llama.

Rule: |kernel - ref_fp64| <= 2 * |eager_lowprec - ref_fp64| + eps, where eager_lowprec is Hugging Face's own
module (or plain PyTorch) in the kernel's dtype."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from flashtune.training.fused_ops import fuse_norm_mlp, rms_norm, silu_mul, unfuse_norm_mlp

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _rms_ref(x, w, eps):
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (2, 7, 72)), (torch.float16, (5, 64)),
                                         (torch.float32, (3, 4, 40))])
def test_rms_norm_matches_float64_and_hf(dtype, shape):
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = (3 * torch.randn(*shape, generator=g)).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    dy = torch.randn(*shape, generator=g).to(dtype).to(DEV)
    eps = 1e-6

    def run(fn, x, w):
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
        y = fn(x, w)
        y.backward(dy.to(y.dtype))
        return y, x.grad, w.grad

    hf = LlamaRMSNorm(d, eps=eps).to(DEV, dtype)

    def eager(x, w):
        hf.weight = torch.nn.Parameter(w)
        y = hf(x)
        return y

    y, gx, gw = run(lambda x, w: rms_norm(x, w, eps), x, w)
    ye, gxe, _ = run(eager, x, w)
    gwe = hf.weight.grad
    yr, gxr, gwr = run(lambda x, w: _rms_ref(x, w, eps), x.double(), w.double())
    assert y.dtype == ye.dtype and gx.dtype == x.dtype and gw.dtype == w.dtype
    assert _err(y, yr) <= 2 * _err(ye, yr) + 1e-6
    if dtype != torch.float32:                      # the module's roundings: equal but for rare last-bit ties
        assert (y != ye).float().mean().item() < 0.01
    assert _err(gx, gxr) <= 2 * _err(gxe, gxr) + 1e-6
    assert _err(gw, gwr) <= 2 * _err(gwe, gwr) + 1e-5 * d


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_matches_float64(dtype):
    g = torch.Generator().manual_seed(1)
    shape = (3, 5, 1500)                            # two blocks of 1024 with a ragged tail
    a, b, dy = (4 * torch.randn(*shape, generator=g)).to(dtype), torch.randn(*shape, generator=g).to(dtype), \
        torch.randn(*shape, generator=g).to(dtype)
    a, b, dy = a.to(DEV), b.to(DEV), dy.to(DEV)

    def run(fn, a, b):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        y = fn(a, b)
        y.backward(dy.to(y.dtype))
        return y, a.grad, b.grad

    out = run(silu_mul, a, b)
    eager = run(lambda a, b: F.silu(a) * b, a, b)
    ref = run(lambda a, b: F.silu(a) * b, a.double(), b.double())
    assert out[0].dtype == dtype and out[1].dtype == dtype
    for k, e, r in zip(out, eager, ref):
        assert _err(k, r) <= 2 * _err(e, r) + 1e-6


def _tiny_llama():
    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEV)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fuse_norm_mlp_trains_the_same_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2)).to(DEV)
    loss0, grads0 = _loss_and_grads(model, ids)
    counts = fuse_norm_mlp(model)
    assert counts == {"rms_norm": 5, "swiglu": 2}   # 2 per block + the final norm; one MLP per block
    loss1, grads1 = _loss_and_grads(model, ids)
    assert torch.allclose(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        assert torch.allclose(grads1[n], grads0[n], rtol=1e-4, atol=1e-6), n
    unfuse_norm_mlp(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_without_a_kernel_device_the_modules_run_their_own_forward(monkeypatch):
    if DEV == "cuda":
        pytest.skip("the fallback is for CPU tensors without the interpreter")
    from flashtune.training import fused_ops

    model = _tiny_llama()
    fuse_norm_mlp(model)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    called = []
    monkeypatch.setattr(fused_ops, "_RMSNorm", None)             # any kernel call would fail loudly
    monkeypatch.setattr(fused_ops, "_SwiGLU", None)
    monkeypatch.setattr(fused_ops, "_kernel_ok", lambda *ts: called.append(1) or False)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert called


def test_fit_with_fused_norm_mlp_trains_the_same(tmp_path, monkeypatch):
    """TrainConfig(fused_norm_mlp=True): the fused kernels while training, the modules' own forward after."""
    from flashtune.training import TrainConfig, fit
    from flashtune.training import fused_ops

    ran, ok = [], fused_ops._kernel_ok
    monkeypatch.setattr(fused_ops, "_kernel_ok", lambda *ts: ran.append(1) or ok(*ts))

    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5)).tolist()
    data = [{"input_ids": r, "labels": r} for r in ids]
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = _tiny_llama()
        cfg = TrainConfig(out_dir=str(tmp_path / str(fused)), max_steps=2, batch_size=4, lr=1e-3, log_every=1,
                          fused_norm_mlp=fused, fused_lora=False, save_every=0)
        ran.clear()
        out[fused] = [r["loss"] for r in fit(model, data, cfg, progress=False).history]
        assert bool(ran) == fused  # the kernels ran exactly when asked for
        assert not any("forward" in m.__dict__ for m in model.modules())  # unfused after training
    assert out[True] == pytest.approx(out[False], rel=1e-4)
