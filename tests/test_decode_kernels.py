"""The engine's fused Triton kernels (flashtune/decoding/kernels.py) against plain PyTorch, in float64 where
it matters. On a machine without CUDA they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET); on a
GPU they run natively (`python3 -m pytest tests/test_decode_kernels.py` there)."""

import pytest
import torch

from flashtune.decoding.kernels import add_rms_norm, rope_cache, silu_mul, slot_attention
from flashtune.decoding.model import SlotMask, attend

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _on(*ts):
    return [t.to(DEV) if t is not None else None for t in ts]


def _tree_mask(t, gen):
    """A random tree over t nodes in topological order: node i's parent is some j < i."""
    parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]
    mask = torch.eye(t, dtype=torch.bool)
    for i in range(1, t):
        mask[i] = mask[parent[i]]
        mask[i, i] = True
    return mask


@pytest.mark.parametrize("bsz,t,hq,hkv,d,tree,lo", [
    (2, 1, 4, 2, 8, False, 0),     # a plain decoding step, GQA
    (3, 5, 6, 2, 16, True, 0),     # a tree step, ragged rows
    (2, 20, 4, 1, 32, True, 3),    # a tree over two query blocks, slots before `lo` hidden (a skipped prefix)
    (2, 37, 2, 2, 64, False, 0),   # prefill-like: causal over many new tokens, several key blocks
])
def test_slot_attention_matches_a_float64_dense_reference(bsz, t, hq, hkv, d, tree, lo):
    gen = torch.Generator().manual_seed(bsz * 100 + t)
    seq = 160
    q = torch.randn(bsz, t, hq, d, generator=gen)
    kc = torch.randn(bsz + 1, hkv, seq, d, generator=gen)  # a cache with more rows than the batch
    vc = torch.randn(bsz + 1, hkv, seq, d, generator=gen)
    start = torch.randint(lo + 1, seq - t, (bsz,), generator=gen)
    mask = SlotMask(start, _tree_mask(t, gen) if tree else None, lo)
    out = slot_attention(*_on(q, kc, vc, start, mask.tree), lo, scale=d ** -0.5).cpu()
    dense = mask.dense(t, seq)
    ref = attend(q.double().transpose(1, 2), kc[:bsz].double(), vc[:bsz].double(), dense, d ** -0.5, "sdpa")
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=2e-5, rtol=2e-5)
    # the dense form: row b sees exactly slots [lo, start_b) plus its own new slot
    assert dense[:, 0].sum(-1).tolist() == (start - lo + 1).tolist()


def test_slot_attention_reads_no_slot_outside_the_mask():
    """Poison every slot the mask hides (NaN): the output must stay finite and unchanged."""
    gen = torch.Generator().manual_seed(7)
    bsz, t, hq, hkv, d, seq = 2, 4, 4, 2, 16, 200
    q = torch.randn(bsz, t, hq, d, generator=gen)
    kc, vc = torch.randn(2, bsz, hkv, seq, d, generator=gen)
    start = torch.tensor([30, 95])
    tree = _tree_mask(t, gen)
    out = slot_attention(*_on(q, kc, vc, start, tree), lo=2)
    hidden = ~SlotMask(start, tree, 2).dense(t, seq).any(1)  # [B, S]: slots no new token sees
    kp, vp = kc.clone(), vc.clone()
    kp.permute(0, 2, 1, 3)[hidden] = float("nan")
    vp.permute(0, 2, 1, 3)[hidden] = float("nan")
    torch.testing.assert_close(slot_attention(*_on(q, kp, vp, start, tree), lo=2), out)


@pytest.mark.parametrize("rope", [True, False])
def test_rope_cache_rotates_and_writes_only_the_given_slots(rope):
    gen = torch.Generator().manual_seed(3)
    bsz, t, nq, nkv, d, seq = 2, 3, 4, 2, 16, 12
    qkv = torch.randn(bsz, t, nq + 2 * nkv, d, generator=gen)
    cos = torch.randn(bsz, t, d, generator=gen) if rope else None
    sin = torch.randn(bsz, t, d, generator=gen) if rope else None
    kc, vc = torch.randn(2, bsz + 1, nkv, seq, d, generator=gen)
    k0, v0 = kc.clone(), vc.clone()
    slots = torch.tensor([[2, 3, 4], [7, 8, 9]])
    kd, vd = _on(kc, vc)
    q = rope_cache(*_on(qkv, cos, sin, slots), kd, vd, nq, nkv).cpu()
    kc, vc = kd.cpu(), vd.cpu()
    qk = qkv[:, :, : nq + nkv]
    if rope:  # the engine's fast rotary: x * cos + roll(x, D/2) * sin (sin carries rotate_half's signs)
        qk = qk * cos[:, :, None] + torch.roll(qk, d // 2, dims=-1) * sin[:, :, None]
    torch.testing.assert_close(q, qk[:, :, :nq])
    for b in range(bsz):
        for i, s in enumerate(slots[b].tolist()):
            torch.testing.assert_close(kc[b, :, s], qk[b, i, nq:])
            torch.testing.assert_close(vc[b, :, s], qkv[b, i, nq + nkv:])
    written = torch.zeros(bsz + 1, seq, dtype=torch.bool)
    for b in range(bsz):
        written[b, slots[b]] = True
    assert torch.equal(kc.permute(0, 2, 1, 3)[~written], k0.permute(0, 2, 1, 3)[~written])
    assert torch.equal(vc.permute(0, 2, 1, 3)[~written], v0.permute(0, 2, 1, 3)[~written])


def test_silu_mul():
    h = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(0))  # two column blocks, a ragged one
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(h.to(DEV)).cpu(), torch.nn.functional.silu(gate) * up)


def test_add_rms_norm():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 300, generator=gen)  # a non-power-of-two width
    w = torch.randn(300, generator=gen)
    s, h = (t.cpu() for t in add_rms_norm(*_on(x, y, w), 1e-5))
    torch.testing.assert_close(s, x + y)
    torch.testing.assert_close(h, torch.nn.functional.rms_norm(x + y, (300,), w, 1e-5))
