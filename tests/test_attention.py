"""FlashAttention kernels (through Triton's CPU interpreter) against a float64 reference.

Rule (flash-attention's test): |kernel - ref_fp64| <= 2 * |torch_lowprec - ref_fp64| + eps for outputs, 3x for
gradients, where torch_lowprec is the same math done by plain PyTorch in the kernel's dtype. Outputs are poisoned
with NaN before every run (the kernels' allocator is swapped for a NaN-filled one), so an unwritten element fails.
The reference itself is checked against torch's scaled_dot_product_attention in float64 with explicit masks.
"""

import os

import pytest
import torch

if torch.cuda.is_available():  # the interpreter would be switched on for the kernels of every module in the run
    pytest.skip("Triton-interpreter tests (CPU machines: make test); on a GPU the kernels are checked natively by "
                "make gpu-check (bench/attention.py --check)", allow_module_level=True)

_PREV = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels are decorated as interpreted

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from flashtune.attention import attention_reference, flash_attention  # noqa: E402
from flashtune.attention import ops  # noqa: E402  (imports triton under the interpreter)
from flashtune.errors import ConfigError  # noqa: E402

if _PREV is None:  # only this module's tests run the interpreter; other modules see the plain CPU path
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV


@pytest.fixture(autouse=True)
def interpreter_and_poison(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device,
                                                                               dtype=dtype))


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _cu(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


def run_case(*, b=1, lq=113, lk=None, hq=4, hk=2, d=64, dtype=torch.bfloat16, causal=False, tree=None,
             varlen=None, prefix=0, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = lk or lq

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype)

    kw = dict(causal=causal)
    if varlen:
        cu_q, cu_k = _cu(varlen[0]), _cu(varlen[1])
        q, k, v = rnd(int(cu_q[-1]), hq, d), rnd(int(cu_k[-1]), hk, d), rnd(int(cu_k[-1]), hk, d)
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        nseq = len(varlen[0])
    else:
        q, k, v = rnd(b, lq, hq, d), rnd(b, lk, hk, d), rnd(b, lk, hk, d)
        nseq = b
    if prefix:
        kw.update(prefix_k=rnd(nseq, prefix, hk, d), prefix_v=rnd(nseq, prefix, hk, d))
    if tree is not None:
        kw.update(tree_mask=tree)
    leaves = [q, k, v] + ([kw["prefix_k"], kw["prefix_v"]] if prefix else [])
    for t in leaves:
        t.requires_grad_(grad)
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    dkw = {**kw}
    if prefix:
        dkw.update(prefix_k=kw["prefix_k"].double(), prefix_v=kw["prefix_v"].double())
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **dkw)
    low = attention_reference(q, k, v, compute_dtype=dtype, **kw)
    eps = 1e-6 if dtype == torch.float32 else 1e-4
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    assert _err(out, ref) <= 2 * _err(low, ref) + eps, (_err(out, ref), _err(low, ref))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _err(lse[finite], ref_lse[finite]) <= 1e-4 * (1 + ref_lse[finite].abs().max().item())
    if grad:
        do = torch.randn(out.shape, generator=g).to(dtype)
        got = torch.autograd.grad(out, leaves, do)
        want = torch.autograd.grad(ref, leaves, do.double())
        base = torch.autograd.grad(low, leaves, do)
        for name, a, r, lo in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want, base):
            assert torch.isfinite(a).all(), name
            assert _err(a, r) <= 3 * _err(lo, r) + eps, (name, _err(a, r), _err(lo, r))
    return out, lse


def _tree(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(n, n, generator=g) < 0.3).tril()
    return t | torch.eye(n, dtype=torch.bool)


CASES = {
    "dense gqa hd64": dict(lq=113, d=64),
    "causal mqa hd80 kv-offset fp16": dict(lq=37, lk=203, hq=4, hk=1, d=80, causal=True, dtype=torch.float16),
    "causal hd128": dict(lq=67, d=128, hq=2, hk=2, causal=True),
    "varlen causal gqa": dict(varlen=([113, 1, 40], [113, 1, 40]), causal=True),
    "varlen kv-offset": dict(varlen=([5, 17], [60, 17]), causal=True, hq=2, hk=1),
    "prefix causal": dict(lq=45, prefix=9, causal=True, b=2),
    "prefix varlen": dict(varlen=([23, 30], [23, 30]), prefix=5, causal=True, hq=2, hk=1),
    "tree after keys gqa": dict(lq=16, lk=66, tree=_tree(16)),
    "tree + causal hd80": dict(lq=24, lk=51, d=80, tree=_tree(24, 1), causal=True, hq=2, hk=2),
    "fp32 hd32 causal": dict(lq=50, d=32, causal=True, dtype=torch.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    run_case(**CASES[name])


@pytest.mark.parametrize("name", ["varlen causal gqa", "tree + causal hd80"])
def test_single_pass_backward_with_atomic_dq(name, monkeypatch):
    """The dK/dV kernel also producing dQ through float32 atomics (the GPU's choice for some head dims)."""
    monkeypatch.setitem(ops._OVERRIDE, "atomic_dq", (True,))
    run_case(**CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("case", [dict(lq=203, d=128, causal=True, hq=8, hk=2), dict(lq=203, lk=113, d=64),
                                  dict(varlen=([203, 113, 7], [203, 150, 7]), causal=True, d=128)])
def test_kernel_matches_reference_larger(case):
    run_case(**case)


def test_empty_rows_when_queries_outnumber_keys():
    """Causal with Lq > Lk: the first Lq - Lk queries see nothing -> zeros and lse = -inf (kernel and reference)."""
    out, lse = run_case(lq=40, lk=25, causal=True, hq=2, hk=2, grad=True)
    assert torch.equal(out[:, :15], torch.zeros_like(out[:, :15]))
    assert torch.isinf(lse[:, :, :15]).all() and torch.isfinite(lse[:, :, 15:]).all()


def test_split_kv_matches_single_pass():
    """The decoding path (keys split over programs, partial results merged by log-sum-exp)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, h, 64, generator=g).to(torch.bfloat16) for n, h in ((3, 4), (150, 2), (150, 2)))
    o1, l1 = ops.fwd_launch(q, k, v, None, None, None, 0.125, True, 0, 3, 150, num_splits=1)
    o4, l4 = ops.fwd_launch(q, k, v, None, None, None, 0.125, True, 0, 3, 150, num_splits=4)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True, softmax_scale=0.125,
                                       return_lse=True)
    assert _err(o4, ref) <= 2 * _err(o1, ref) + 1e-2
    assert _err(l4.permute(0, 2, 1), ref_lse) < 1e-4


def test_compile_traces_through_custom_op():
    """register_fake gives shapes without running Triton; fullgraph compile with autograd works."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 9, 4, 64, dtype=torch.bfloat16), torch.empty(2, 11, 2, 64, dtype=torch.bfloat16)
        out, lse = torch.ops.flashtune.attn_fwd(q, k, k, None, None, None, 0.125, True, 0, 9, 11)
        assert out.shape == q.shape and lse.shape == (2, 9, 4) and lse.dtype == torch.float32
    q = torch.randn(1, 20, 2, 32, requires_grad=True)
    k, v = torch.randn(1, 20, 2, 32), torch.randn(1, 20, 2, 32)
    fn = torch.compile(lambda a, b, c: flash_attention(a, b, c, causal=True).sum(), backend="aot_eager",
                       fullgraph=True)
    fn(q, k, v).backward()
    ref = attention_reference(q.detach().double().requires_grad_(), k.double(), v.double(), causal=True)
    assert torch.isfinite(q.grad).all() and q.grad.shape == q.shape
    assert _err(fn(q, k, v), ref.sum()) < 1e-4


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k = torch.randn(1, 7, 2, 16), torch.randn(1, 9, 2, 16)
    monkeypatch.setattr(ops.FlashAttnFunction, "apply", lambda *a: pytest.fail("kernel used without interpreter"))
    assert torch.equal(flash_attention(q, k, k, causal=True), attention_reference(q, k, k, causal=True))


def test_head_dim_over_256_falls_back_to_reference():
    q = torch.randn(1, 5, 1, 300, dtype=torch.bfloat16)
    assert torch.equal(flash_attention(q, q, q), attention_reference(q, q, q))


@pytest.mark.parametrize("bad, match", [
    (lambda q, k: flash_attention(q, k[..., :32], k[..., :32]), "head_dim"),
    (lambda q, k: flash_attention(q, k.repeat(1, 1, 2, 1)[:, :, :3], k.repeat(1, 1, 2, 1)[:, :, :3]), "multiple"),
    (lambda q, k: flash_attention(q[0], k[0], k[0]), "4-D"),
    (lambda q, k: flash_attention(q, k, k, tree_mask=torch.ones(3, 3)), "bool"),
    (lambda q, k: flash_attention(q, k, k, tree_mask=torch.ones(3, 3, dtype=torch.bool)), "shape"),
    (lambda q, k: flash_attention(q, k, k, cu_seqlens_q=torch.tensor([0, 5])), "both"),
    (lambda q, k: flash_attention(q, k, k, prefix_k=k), "prefix_v"),
])
def test_bad_input_is_a_clear_error(bad, match):
    q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 6, 2, 64)
    with pytest.raises(ConfigError, match=match):
        bad(q, k)


# ---- the oracle against an independent one ---------------------------------------------------------------

def _sdpa64(q, k, v, keep):
    """torch SDPA in float64 with an explicit (Lq, Lk) bool mask; layout (L, H, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=keep)
    return o.transpose(0, 1)


def test_reference_matches_sdpa_with_explicit_masks():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, h, 16, generator=g, dtype=torch.float64) for n, h in ((6, 4), (10, 2), (10, 2)))
    i, j = torch.arange(6)[:, None], torch.arange(10)[None, :]
    assert _err(attention_reference(q, k, v, causal=True)[0], _sdpa64(q[0], k[0], v[0], j <= i + 4)) < 1e-12
    tree = _tree(6, 2)
    keep = torch.ones(6, 10, dtype=torch.bool)
    keep[:, 4:] = tree
    assert _err(attention_reference(q, k, v, tree_mask=tree)[0], _sdpa64(q[0], k[0], v[0], keep)) < 1e-12
    pk, pv = torch.randn(1, 3, 2, 16, generator=g, dtype=torch.float64), torch.randn(1, 3, 2, 16, generator=g,
                                                                                       dtype=torch.float64)
    kc, vc = torch.cat([pk[0], k[0]]), torch.cat([pv[0], v[0]])
    keep = torch.arange(13)[None, :] <= i + 7
    got = attention_reference(q, k, v, causal=True, prefix_k=pk, prefix_v=pv)[0]
    assert _err(got, _sdpa64(q[0], kc, vc, keep)) < 1e-12
    cu = _cu([4, 6])
    qv, kv_ = torch.randn(10, 4, 16, generator=g, dtype=torch.float64), torch.randn(10, 2, 16, generator=g,
                                                                                     dtype=torch.float64)
    out = attention_reference(qv, kv_, kv_, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    tri = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
    assert _err(out[:4], _sdpa64(qv[:4], kv_[:4], kv_[:4], tri(4))) < 1e-12
    assert _err(out[4:], _sdpa64(qv[4:], kv_[4:], kv_[4:], tri(6))) < 1e-12
    assert math.isclose(attention_reference(q, k, v, softmax_scale=0.3, return_lse=True)[1][0, 0, 0].item(),
                        torch.logsumexp(0.3 * (q[0, 0, 0] * k[0, :, 0]).sum(-1), 0).item(), rel_tol=1e-12)
