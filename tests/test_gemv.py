"""The split-K GEMV (flashtune/decoding/gemv.py) against a float64 matmul, its batch invariance bit for bit, and
its switch in the model's `_linear`. On a machine without CUDA it runs in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET); on a GPU natively (`python3 -m pytest tests/test_gemv.py` there)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding import gemv as gemv_mod
from flashtune.decoding.gemv import GemvConfig, config_for, gemv
from flashtune.decoding.model import _linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 100, 200  # multiples of no block size

CONFIGS = {
    "no split": GemvConfig(block_n=16, block_k=64, split_k=1),
    "split 4, last program sums": GemvConfig(block_n=32, block_k=64, split_k=4),
    "split 8 (empty slices), second kernel sums": GemvConfig(block_n=16, block_k=64, split_k=8, serial=False),
}


def _data(m, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=gen)
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    b = torch.randn(N, generator=gen) if bias else None
    return [t.to(DEV, dtype) if t is not None else None for t in (x, w, b)]


def _reference(x, w, b):
    ref = x.double() @ w.double().t()
    return ref + b.double() if b is not None else ref


def _within_rounding(y, ref) -> bool:
    """y within the rounding of its dtype: one unit in the last place of the exact value in bf16 (the GPU rounds
    to nearest, the interpreter truncates), plus the fp32 accumulation's error."""
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[y.dtype]
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - mant)
    slack = 1e-5 * ref.abs().max()  # fp32 sums of K products of unit size
    return bool(((y.double() - ref).abs() <= (ulp if mant < 23 else 0) + slack).all())


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemv_matches_float64(dtype, m, bias, cfg):
    x, w, b = _data(m, dtype, bias)
    y = gemv(x, w, b, CONFIGS[cfg])
    assert y.shape == (m, N) and y.dtype == dtype
    assert _within_rounding(y, _reference(x, w, b))


def test_the_check_catches_a_reduction_that_drops_a_slice():
    """A sum missing one K slice (what a lost split-K partial gives) fails the tolerance used above."""
    x, w, b = _data(8, torch.bfloat16)
    dropped = gemv(x[:, :150].contiguous(), w[:, :150].contiguous(), b, CONFIGS["no split"])
    assert not _within_rounding(dropped, _reference(x, w, b))
    assert _within_rounding(gemv(x, w, b, CONFIGS["split 4, last program sums"]), _reference(x, w, b))


def test_leading_dims_and_the_default_rule():
    x, w, b = _data(6, torch.float32)
    y = gemv(x.view(2, 3, K), w, b)  # config_for(N, K)
    assert y.shape == (2, 3, N)
    assert _within_rounding(y.view(6, N), _reference(x, w, b))
    assert config_for(N, K) == config_for(N, K) and config_for(2048, 5632).split_k > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", ["split 4, last program sums", "split 8 (empty slices), second kernel sums"])
def test_each_row_is_independent_of_the_row_count_bit_for_bit(dtype, cfg):
    """Row 0 alone (a one-token step), among 5 and among 8 rows, and rows 16-19 of 20 (a second row block)
    against the same rows alone: identical bits."""
    x, w, b = _data(20, dtype, seed=3)
    config = CONFIGS[cfg]
    y20 = gemv(x, w, b, config)
    for m in (1, 5, 8):
        assert torch.equal(gemv(x[:m], w, b, config)[0], y20[0])
    assert torch.equal(gemv(x[:8], w, b, config), y20[:8])
    assert torch.equal(gemv(x[16:20].contiguous(), w, b, config), y20[16:20])
    if dtype == torch.float32:  # the comparison has teeth: another K step (a rule that looked at M) changes bits
        other = GemvConfig(config.block_n, 2 * config.block_k, config.split_k, serial=config.serial)
        assert not torch.equal(gemv(x, w, b, other), y20)


def test_both_reductions_give_the_same_bits_and_the_tickets_are_reset():
    x, w, b = _data(8, torch.bfloat16, seed=4)
    serial = GemvConfig(block_n=16, block_k=64, split_k=4)
    kernel = GemvConfig(block_n=16, block_k=64, split_k=4, serial=False)
    assert torch.equal(gemv(x, w, b, serial), gemv(x, w, b, kernel))
    assert int(gemv_mod._TICKETS[x.device].abs().sum()) == 0  # ready for the next launch
    x2, w2, b2 = _data(3, torch.bfloat16, seed=5)
    assert _within_rounding(gemv(x2, w2, b2, serial), _reference(x2, w2, b2))


def test_the_cpu_outside_the_interpreter_falls_back_to_f_linear(monkeypatch):
    if DEV == "cuda":
        pytest.skip("CUDA tensors always run the kernel")
    monkeypatch.setattr(gemv_mod, "_INTERPRET", False)
    x, w, b = _data(3, torch.float32)
    assert torch.equal(gemv(x, w, b), F.linear(x, w, b))
    assert not gemv_mod.routes(x, invariant=False)


def test_model_linear_routes_only_when_switched_on(monkeypatch):
    layer = nn.Linear(K, N).to(DEV)
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x = torch.randn(2, 4, K, device=DEV)
    with torch.no_grad():
        _linear(layer, x, invariant=False)
        assert calls == []  # off by default
        monkeypatch.setattr(gemv_mod, "ENABLED", True)
        y = _linear(layer, x, invariant=False)
        assert calls == [x.shape] and _within_rounding(y.view(8, N), _reference(x.view(8, K), layer.weight,
                                                                                   layer.bias))
        _linear(layer, torch.randn(17, K, device=DEV), invariant=False)  # more than MAX_ROWS rows: cuBLAS
        assert len(calls) == 1
        monkeypatch.setattr(gemv_mod, "INVARIANT", True)
        _linear(layer, torch.randn(40, K, device=DEV), invariant=True)  # invariant mode: every row count
        assert len(calls) == 2


@pytest.mark.parametrize("invariant", [False, True], ids=["default path", "invariant mode"])
def test_an_engine_on_the_kernel_matches_hf(monkeypatch, invariant):
    """A tiny Llama on the Triton path with every linear on the GEMV (prefill rows included in invariant mode):
    the same prefill logits and greedy tokens as transformers (fp32)."""
    from tiny import ragged_prompts, tiny_model

    from flashtune.decoding import Engine

    monkeypatch.setattr(gemv_mod, "ENABLED", True)
    monkeypatch.setattr(gemv_mod, "INVARIANT", True)
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_model("llama").to(DEV)
    engine = Engine(model, max_batch_size=2, max_seq_len=48, attention="triton", fast=True, invariant=invariant)
    prompts = ragged_prompts()[:2]
    _, logits, _, _ = engine.prefill(prompts)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b], model(torch.tensor([p], device=DEV)).logits[0, -1], atol=1e-5,
                                   rtol=1e-5)
    out = engine.generate(prompts, max_new_tokens=3)
    for p, toks in zip(prompts, out.tokens):
        ref = model.generate(torch.tensor([p], device=DEV), max_new_tokens=3, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(1, len(p), dtype=torch.long, device=DEV))
        assert toks == ref[0, len(p):].tolist()
    assert calls  # the kernel ran
