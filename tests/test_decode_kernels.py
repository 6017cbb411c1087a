"""The engine's fused Triton kernels (flashtune/decoding/kernels.py) against plain PyTorch, in float64 where
it matters. On a machine without CUDA they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET); on a
GPU they run natively (`python3 -m pytest tests/test_decode_kernels.py` there)."""

import pytest
import torch

from flashtune.decoding.cache import KVCache
from flashtune.decoding.invariant import linear_fixed, slot_attention_logical
from flashtune.decoding.kernels import add_rms_norm, rms_norm_pair, rope_cache, silu_mul, slot_attention
from flashtune.decoding.model import SlotMask, attend
from flashtune.decoding.tree import tree_buffers

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


@pytest.mark.parametrize("t,tree,stride,block_m,block_n", [
    (1, False, 2, None, 64),  # an MTP module of depth 2 drafting past its first cycle
    (1, False, 3, 16, 32),    # depth 3, smaller key blocks
    (3, True, 2, 32, 64),     # the same hole pattern under a tree of new tokens
])
def test_slot_attention_with_a_gap_sees_every_strideth_slot_only(t, tree, stride, block_m, block_n):
    """SlotMask.gap: the committed slots in [gap, start) are seen every `stride`-th one. Against the float64
    dense reference, and with every hidden slot poisoned (NaN) to prove none is read."""
    gen = torch.Generator().manual_seed(11 + stride)
    bsz, hq, hkv, d, seq = 3, 4, 2, 16, 96
    q = torch.randn(bsz, t, hq, d, generator=gen)
    kc, vc = torch.randn(2, bsz, hkv, seq, d, generator=gen)
    gap = torch.tensor([20, 41, 65])
    start = gap - 1 + torch.tensor([2, 1, 3]) * stride  # n + c * D with n = gap - 1
    mask = SlotMask(start, _tree_mask(t, gen) if tree else None, 1, gap=gap, stride=stride)
    dense = mask.dense(t, seq)
    for b in range(bsz):  # the pattern itself: [1, gap) and gap - 1 + stride * c (c >= 1) before start
        seen = dense[b, 0].nonzero()[:, 0].tolist()
        assert seen == list(range(1, int(gap[b]))) + list(range(int(gap[b]) - 1 + stride, int(start[b]) + 1, stride))
    kw = dict(lo=1, scale=d ** -0.5, block_m=block_m, block_n=block_n, gap=_on(gap)[0], stride=stride)
    out = slot_attention(*_on(q, kc, vc, start, mask.tree), **kw).cpu()
    ref = attend(q.double().transpose(1, 2), kc.double(), vc.double(), dense, d ** -0.5, "sdpa")
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=2e-5, rtol=2e-5)
    hidden = ~dense.any(1)
    kp, vp = kc.clone(), vc.clone()
    kp.permute(0, 2, 1, 3)[hidden] = float("nan")
    vp.permute(0, 2, 1, 3)[hidden] = float("nan")
    torch.testing.assert_close(slot_attention(*_on(q, kp, vp, start, mask.tree), **kw).cpu(), out)


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


def test_compact_cache_kernel_moves_the_accepted_path_like_the_gather_scatter():
    """KVCache.compact through the kernel (fused) against the PyTorch gather-then-scatter, with overlapping
    source and destination slots (path [0, 2, 3]: slot L+2 is both read and written)."""
    gen = torch.Generator().manual_seed(5)
    caches = [KVCache(3, 4, 2, 24, 16, torch.float32, DEV) for _ in range(2)]
    k, v = torch.randn(2, 3, 4, 2, 24, 16, generator=gen)
    for c in caches:
        c.k.copy_(k.to(DEV))
        c.v.copy_(v.to(DEV))
    lengths = torch.tensor([5, 9, 2])  # rows 0..2 of a 4-row cache
    path = torch.tensor([[0, 2, 3], [0, 1, 4], [0, 3, 7]])
    src = (lengths[:, None] + path).to(DEV)
    dst = (lengths[:, None] + torch.arange(3)[None]).to(DEV)
    caches[1].fused = True
    for c in caches:
        c.compact(src, dst)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[1].k[:, 0, :, 6].cpu(), k[:, 0, :, 7])  # slot L+2 -> L+1 in row 0
    assert not torch.equal(caches[0].k.cpu(), k)  # something moved


def test_rms_norm_pair_matches_two_norms_and_a_concatenation():
    gen = torch.Generator().manual_seed(9)
    e, h = torch.randn(2, 5, 48, generator=gen) * 3
    we, wh = torch.randn(2, 48, generator=gen)
    out = rms_norm_pair(*_on(e, h, we, wh), 1e-5, 1e-6).cpu()

    def ref(x, w, eps):
        x = x.double()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    torch.testing.assert_close(out.double(), torch.cat([ref(e, we, 1e-5), ref(h, wh, 1e-6)], -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_linear_fixed_matches_float64_and_each_row_ignores_the_others(dtype):
    """linear_fixed against a float64 matmul, and (on the GPU) row invariance: a row's output is bit for bit
    the same alone (a one-token step) and inside 37 rows (a tree pass), at any place in the batch."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(37, 200, generator=gen)
    w = torch.randn(150, 200, generator=gen) / 14
    bias = torch.randn(150, generator=gen)
    xd, wd, bd = (t.to(DEV, dtype) for t in (x, w, bias))
    out = linear_fixed(xd, wd, bd)
    ref = xd.double() @ wd.double().t() + bd.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    if DEV == "cpu":
        return  # the interpreter's dot products are numpy's, whose rounding may depend on the tile's other rows
    for i in (0, 5, 36):
        assert torch.equal(linear_fixed(xd[i: i + 1], wd, bd)[0], out[i])
    assert torch.equal(linear_fixed(xd[3:11], wd, bd), out[3:11])


def _logical_case(gen, dtype):
    """A 9-node tree after 70 committed slots (row 0) and 41 (row 1): caches, q, and the tree."""
    tree = tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]])
    bsz, hq, hkv, d, seq = 2, 6, 2, 32, 160
    q = torch.randn(bsz, tree.num_nodes, hq, d, generator=gen).to(dtype)
    kc, vc = (torch.randn(2, bsz, hkv, seq, d, generator=gen)).to(dtype)
    start = torch.tensor([70, 41])
    return tree, q, kc, vc, start


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_slot_attention_logical_equals_the_tree_mask_and_a_one_token_step_bit_for_bit(dtype):
    """slot_attention_logical: (1) the tree-mask attention's values (float64 dense reference); (2) each node's
    output bit for bit equal to a one-token step at its position over a cache where its ancestors' K/V sit at
    consecutive slots (what plain decoding would have written)."""
    gen = torch.Generator().manual_seed(4)
    tree, q, kc, vc, start = _logical_case(gen, dtype)
    d = q.shape[-1]
    anc, depth = tree.ancestors, tree.depth
    out = slot_attention_logical(*_on(q, kc, vc, start, anc, depth), lo=1, scale=d ** -0.5).cpu()
    dense = SlotMask(start, tree.mask, 1).dense(tree.num_nodes, kc.shape[2])
    ref = attend(q.double().transpose(1, 2), kc.double(), vc.double(), dense, d ** -0.5, "sdpa").transpose(1, 2)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    root = tree_buffers([])
    for node in range(tree.num_nodes):
        dep = int(tree.depth[node])
        kp, vp = kc.clone(), vc.clone()
        for b in range(2):  # the node's ancestors moved to consecutive slots, as plain decoding writes them
            src = start[b] + anc[node, : dep + 1]
            kp[b, :, start[b]: start[b] + dep + 1] = kc[b, :, src]
            vp[b, :, start[b]: start[b] + dep + 1] = vc[b, :, src]
        one = slot_attention_logical(*_on(q[:, node: node + 1], kp, vp, start + dep, root.ancestors, root.depth),
                                     lo=1, scale=d ** -0.5).cpu()
        assert torch.equal(one[:, 0], out[:, node]), node
