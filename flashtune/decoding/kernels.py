"""Fused Triton kernels for the decoding engine's CUDA path: fewer, larger launches per layer.

A decoding step at batch 1 is a few hundred launches of tiny kernels, each costing ~2 µs on the GPU even inside
a CUDA graph (bench/profile_decode.py measured 26 kernels per layer, 1.8 ms a step, for a 135M model whose
weights are read in 63 µs). These three kernels replace about 17 of them per layer:

  rope_cache    rotary embedding of q and k, q written out, k and v written into the static cache at their
                slots (RoFormer, Su et al., arXiv 2104.09864), one launch instead of ~8
  slot_attention  attention of T new tokens over each row's cache slots [lo, start_b + T), with the last T
                slots masked causally or by a tree mask (Medusa, arXiv 2401.10774): online softmax in one pass
                (FlashAttention, Dao et al., arXiv 2205.14135); each program reads only its row's live slots,
                never the whole static cache. One launch instead of ~9 (mask bias, copies, two bmm, softmax)
  silu_mul      SwiGLU's silu(gate) * up (Shazeer, arXiv 2002.05202), one launch instead of two
  add_rms_norm  the residual add and the next RMSNorm (Zhang & Sennrich, arXiv 1910.07467) in one launch:
                the model carries each sub-layer's output to the next norm instead of adding it in place
  compact_cache   after a speculative step, the accepted path's K/V moved to consecutive slots in every layer,
                keys and values in one launch instead of four gathers and scatters
  rms_norm_pair   the MTP module's input, [enorm(e); hnorm(h)], in one launch instead of three

The batch-invariant kernels of the engine's `invariant` mode are in invariant.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import flashtune.attention.ops  # noqa: F401 - applies the CPU-interpreter fixes the tests rely on

LOG2E = 1.4426950408889634


@triton.jit
def _rope_cache_kernel(QKV, COS, SIN, SLOTS, QOUT, KC, VC, T, NQ, NKV, HALF,
                       stride_x_tok, stride_x_h, stride_o_tok, stride_o_h, stride_cb, stride_ch, stride_cs,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    tok = tl.program_id(0)  # b * T + t
    h = tl.program_id(1)  # q heads, then k heads, then v heads
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    src = QKV + tok * stride_x_tok + h * stride_x_h
    x = tl.load(src + offs, mask=dmask, other=0.0)
    if ROPE:
        if h < NQ + NKV:  # x * cos + roll(x, D/2) * sin, where sin carries rotate_half's signs
            partner = tl.where(offs < HALF, offs + HALF, offs - HALF)
            xp = tl.load(src + partner, mask=dmask, other=0.0).to(tl.float32)
            c = tl.load(COS + tok * D + offs, mask=dmask, other=0.0).to(tl.float32)
            s = tl.load(SIN + tok * D + offs, mask=dmask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * c + xp * s).to(x.dtype)
    if h < NQ:
        tl.store(QOUT + tok * stride_o_tok + h * stride_o_h + offs, x, mask=dmask)
    else:
        b = tok // T
        slot = tl.load(SLOTS + tok)
        if h < NQ + NKV:
            dst = KC + b * stride_cb + (h - NQ) * stride_ch + slot * stride_cs
        else:
            dst = VC + b * stride_cb + (h - NQ - NKV) * stride_ch + slot * stride_cs
        tl.store(dst + offs, x, mask=dmask)


def rope_cache(qkv, cos, sin, slots, k_cache, v_cache, n_q: int, n_kv: int):
    """qkv [B, T, Hq + 2 Hkv, D] (q, k, v heads), cos/sin [B, T, D] or None (no rotary), slots long [B, T],
    k_cache/v_cache [B_max, Hkv, S, D] (one layer; innermost stride 1). Writes k (rotated) and v at the slots
    and returns q (rotated) as [B, T, Hq, D]."""
    bsz, t, heads, d = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(bsz, t, n_q, d, dtype=qkv.dtype, device=qkv.device)
    rope = cos is not None
    if rope:
        cos, sin = cos.reshape(bsz * t, d).contiguous(), sin.reshape(bsz * t, d).contiguous()
    else:
        cos = sin = qkv  # unused
    slots = slots.reshape(-1).contiguous()
    _rope_cache_kernel[(bsz * t, heads)](
        qkv, cos, sin, slots, q, k_cache, v_cache, t, n_q, n_kv, d // 2,
        qkv.stride(1), qkv.stride(2), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=d, BLOCK_D=triton.next_power_of_2(d), ROPE=rope)
    return q


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key block of the online softmax (FlashAttention): scores s [M, N] (base 2, -inf where unseen), the
    running max m_i and sum l_i [M] -> (p [M, N], alpha [M]: the old accumulator's rescale, new m_i, new l_i).
    Rows that have seen nothing yet keep m = -inf without producing NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _slot_attn_kernel(Q, K, V, O, START, TREE, GAP, STRIDE, qk_scale, LO, T, G, NKV,
                      stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_ob, stride_ot, stride_oh,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_TREE: tl.constexpr, HAS_GAP: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NKV
    kvh = pid_bh % NKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row r: token r // G of query head kvh * G + r % G
    node = rows // G
    head = kvh * G + rows % G
    row_ok = rows < G * T
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * stride_qb + node[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    start = tl.load(START + b)
    if HAS_GAP:
        gap = tl.load(GAP + b)
    last = tl.minimum(T - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // G)  # the block's last token: later slots unseen
    hi = start + last + 1
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for lo in range(LO, hi, BLOCK_N):
        kpos = lo + tl.arange(0, BLOCK_N)
        kmask = (kpos < hi)[:, None] & dmask[None, :]
        k = tl.load(k_base + kpos[:, None] * stride_ks + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        rel = kpos[None, :] - start  # column inside the new tokens' block (< 0: committed slots)
        old = rel < 0
        if HAS_GAP:  # committed slots at or past `gap`: every STRIDE-th one only
            after = kpos[None, :] - gap + 1
            old = old & ((after <= 0) | (after % STRIDE == 0))
        if HAS_TREE:
            in_new = (rel >= 0) & (rel <= node[:, None]) & row_ok[:, None]
            tv = tl.load(TREE + node[:, None] * T + rel, mask=in_new, other=0)
            seen = old | (in_new & (tv != 0))
        elif HAS_GAP:
            seen = old | ((rel >= 0) & (rel <= node[:, None]))
        else:
            seen = rel <= node[:, None]  # causal among the new tokens
        seen = seen & row_ok[:, None] & (kpos[None, :] < hi)
        s = tl.where(seen, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        if HAS_GAP:  # the holes hold stale drafts: never read them (p = 0 there, but 0 * inf is NaN)
            kmask = kmask & (tl.max(seen.to(tl.int32), 0) > 0)[:, None]
        v = tl.load(v_base + kpos[:, None] * stride_vs + offs_d[None, :], mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * stride_ob + node[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])


def slot_attention(q, k_cache, v_cache, start, tree=None, lo: int = 0, scale: float = 1.0,
                   block_m: int | None = None, block_n: int | None = None, num_warps: int = 4, gap=None,
                   stride: int = 1):
    """Attention of new tokens over a static cache, row by row.

    q [B, T, Hq, D] (any strides, innermost 1); k_cache/v_cache [B', Hkv, S, D] with B' >= B; start long [B]:
    the slot of row b's first new token (its committed tokens fill slots [lo, start_b)). Token i of row b sees
    slots [lo, start_b) and, among the new slots start_b + j, those with j <= i (tree None: causal) or
    tree[i, j] (bool [T, T], j <= i). The new tokens' K/V must already be in the cache. Returns [B, T, Hq, D].
    gap long [B] / stride: committed slots in [gap_b, start_b) are seen only when (slot - gap_b + 1) % stride
    == 0 (model.SlotMask). block_m: packed rows (token x group head) per program; block_n: slots per iteration;
    None picks both by size (the rule of the sweep in bench/profile_decode.py --kernels).
    """
    bsz, t, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    out = torch.empty(bsz, t, hq, d, dtype=q.dtype, device=q.device)
    if block_m is None:  # small blocks, many programs, until the grid fills the GPU (bench/NOTES.md, sweep)
        block_m = 16 if bsz * hkv * triton.cdiv(g * t, 16) <= 256 else 64
    if block_n is None:
        block_n = 128 if block_m == 16 and (g * t <= 16 or d >= 128) else 64
    tree_t = tree.to(torch.uint8).contiguous() if tree is not None else start  # unused when None
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(g * t, block_m), bsz * hkv)
    _slot_attn_kernel[grid](
        q, k_cache, v_cache, out, start.contiguous(), tree_t, start if gap is None else gap.contiguous(), stride,
        scale * LOG2E, lo, t, g, hkv,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_TREE=tree is not None,
        HAS_GAP=gap is not None,
        PRECISION=precision, num_warps=num_warps)
    return out


@triton.jit
def _silu_mul_kernel(H, OUT, F, stride_h, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(H + row * stride_h + F + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=ok)


def silu_mul(h):
    """h [N, 2F] = [gate; up] -> silu(gate) * up [N, F]."""
    n, two_f = h.shape
    f = two_f // 2
    if h.stride(-1) != 1:
        h = h.contiguous()
    out = torch.empty(n, f, dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(f))
    _silu_mul_kernel[(n, triton.cdiv(f, block))](h, out, f, h.stride(0), out.stride(0), BLOCK=block)
    return out


@triton.jit
def _add_rms_norm_kernel(X, Y, W, XO, HO, N, eps, stride_x, stride_y, stride_xo, stride_ho, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + y).to(XO.dtype.element_ty)  # the residual stream keeps the model's dtype, as an in-place add would
    tl.store(XO + row * stride_xo + cols, s, mask=ok)
    sf = s.to(tl.float32)
    r = tl.rsqrt(tl.sum(sf * sf, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(HO + row * stride_ho + cols, (sf * r * w).to(HO.dtype.element_ty), mask=ok)


def add_rms_norm(x, y, weight, eps: float):
    """x, y [N, d] -> (x + y, rms_norm(x + y) * weight), both [N, d] in x's dtype."""
    n, d = x.shape
    x, y = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, y))
    xo, ho = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(n,)](x, y, weight, xo, ho, d, eps, x.stride(0), y.stride(0), xo.stride(0),
                               ho.stride(0), BLOCK=triton.next_power_of_2(d))
    return xo, ho


@triton.jit
def _compact_kernel(KC, VC, SRC, DST, M, LH, stride_l, stride_b, stride_h, stride_s,
                    BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    lh = tl.program_id(1)  # layer * H + head
    base = (lh // LH) * stride_l + b * stride_b + (lh % LH) * stride_h
    base = tl.where(tl.program_id(2) == 0, KC + base, VC + base)
    r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (r < M)[:, None] & (offs_d < D)[None, :]
    src = tl.load(SRC + b * M + r, mask=r < M, other=0)
    dst = tl.load(DST + b * M + r, mask=r < M, other=0)
    x = tl.load(base + src[:, None] * stride_s + offs_d[None, :], mask=ok)  # every source read before any write
    tl.store(base + dst[:, None] * stride_s + offs_d[None, :], x, mask=ok)


def compact_cache(k, v, src, dst):
    """k, v [L, B_max, H, S, D] (innermost stride 1): slots src [B, M] moved to dst [B, M] in every layer and
    head of rows 0..B-1. Sources are read before any write, so overlapping src/dst are safe."""
    n_layers, _, heads, _, d = k.shape
    bsz, m = src.shape
    src, dst = src.contiguous(), dst.contiguous()
    _compact_kernel[(bsz, n_layers * heads, 2)](
        k, v, src, dst, m, heads, k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        BLOCK_M=max(2, triton.next_power_of_2(m)), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)))


@triton.jit
def _rms_norm_pair_kernel(E, H, WE, WH, OUT, N, eps_e, eps_h, stride_e, stride_h, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    for part in tl.static_range(2):
        src = E + row * stride_e if part == 0 else H + row * stride_h
        w_ptr = WE if part == 0 else WH
        eps = eps_e if part == 0 else eps_h
        x = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + part * N + cols, (x * r * w).to(OUT.dtype.element_ty), mask=ok)


def rms_norm_pair(e, h, w_e, w_h, eps_e: float, eps_h: float):
    """e, h [N, d] -> [rms_norm(e) * w_e ; rms_norm(h) * w_h] as one [N, 2d] tensor in e's dtype."""
    n, d = e.shape
    e, h = (t if t.stride(-1) == 1 else t.contiguous() for t in (e, h))
    out = torch.empty(n, 2 * d, dtype=e.dtype, device=e.device)
    _rms_norm_pair_kernel[(n,)](e, h, w_e, w_h, out, d, eps_e, eps_h, e.stride(0), h.stride(0), out.stride(0),
                                BLOCK=triton.next_power_of_2(d))
    return out
