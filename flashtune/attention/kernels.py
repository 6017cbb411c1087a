"""Triton FlashAttention kernels: forward (with optional split-KV for decoding) and backward.

FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning (Dao, arXiv:2307.08691), on
FlashAttention (Dao et al., arXiv:2205.14135); split-KV decoding after Flash-Decoding (Dao et al., 2023).

Layout. Every tensor is addressed through (batch, token, head) strides, so (B, L, H, D) tensors and their
transposed views go in without copies; packed variable-length batches use ``cu_seqlens`` instead of the batch
stride. One program owns one KV head and a block of BLOCK_M *packed rows*: row m is query position m // GROUP of
query head kv_head * GROUP + m % GROUP. Grouped-query heads thus share every K/V tile they read, and the key/value
gradients of a KV head sum over its query heads inside one program, with no atomics.

Masking (see reference.py for the plain definition): causal is bottom-right aligned (query i of lq sees key
j <= i + lk - lq), keys j < PREFIX are visible to every query, and the optional tree mask (lq, lq) covers the last
lq keys. Each key loop is split in two: the blocks every row of the program sees whole (no mask arithmetic), then
the blocks that need the mask. Scores are kept in base 2 (scale * log2(e) folded in) so exp2 does the softmax.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _visible(qpos, kpos, row_ok, lq, lk, PREFIX, TREE_base, stride_tq,
             CAUSAL: tl.constexpr, HAS_TREE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which (query position, key position) pairs attend."""
    ok = (kpos[None, :] < lk) & row_ok[:, None]
    pre = kpos[None, :] < PREFIX
    if CAUSAL:
        ok = ok & ((kpos[None, :] <= qpos[:, None] + (lk - lq)) | pre)
    if HAS_TREE:
        tj = kpos - (lk - lq)  # column inside the tree block
        in_blk = (tj[None, :] >= 0) & ok
        t = tl.load(TREE_base + qpos[:, None] * stride_tq + tj[None, :], mask=in_blk, other=1)
        ok = ok & ((t != 0) | pre)
    return ok


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K_base, V_base, start_n, offs_n, offs_d, stride_kt, stride_vt,
               qk_scale, qpos, row_ok, lq, lk, PREFIX, TREE_base, stride_tq,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_TREE: tl.constexpr, PREC: tl.constexpr):
    kpos = start_n + offs_n
    if MASKED:
        kv_mask = (kpos[:, None] < lk) & (offs_d[None, :] < HEAD_DIM)
    else:
        kv_mask = offs_d[None, :] < HEAD_DIM
    k = tl.load(K_base + kpos[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_base + kpos[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
    if MASKED:
        ok = _visible(qpos, kpos, row_ok, lq, lk, PREFIX, TREE_base, stride_tq, CAUSAL, HAS_TREE)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _row_setup(pid_m, pid_bh, CU_Q, CU_K, seqlen_q, seqlen_k, num_heads_kv,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    b = pid_bh // num_heads_kv
    hk = pid_bh % num_heads_kv
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        lq = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        lk = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        lq = seqlen_q
        lk = seqlen_k
    return b, hk, q_start, k_start, lq, lk


_NO_SPEC = ["seqlen_q", "seqlen_k", "PREFIX", "num_m_blocks", "split_len"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(Q, K, V, O, LSE, TREE, CU_Q, CU_K, qk_scale,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_os, stride_ob, stride_ot, stride_oh,
                stride_ls, stride_lb, stride_lt, stride_tb, stride_tq,
                seqlen_q, seqlen_k, PREFIX, num_heads_kv, num_m_blocks, split_len,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_TREE: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m  # longest rows first: better tail balance
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b, hk, q_start, k_start, lq, lk = _row_setup(pid_m, pid_bh, CU_Q, CU_K, seqlen_q, seqlen_k, num_heads_kv,
                                                 GROUP, BLOCK_M, VARLEN)
    rows = lq * GROUP
    if pid_m * BLOCK_M >= rows:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qpos = offs_m // GROUP
    hq = hk * GROUP + offs_m % GROUP
    row_ok = offs_m < rows
    Q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qt
    K_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    TREE_base = TREE + b.to(tl.int64) * stride_tb
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q_base + qpos[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :], mask=q_mask,
                other=0.0)

    # Key range of this program, and the part of it that needs no mask.
    q_lo = (pid_m * BLOCK_M) // GROUP
    q_hi = tl.minimum(((pid_m + 1) * BLOCK_M - 1) // GROUP, lq - 1)
    pre = tl.minimum(PREFIX, lk)
    if CAUSAL:
        hi = tl.maximum(tl.minimum(q_hi + (lk - lq) + 1, lk), pre)
        full = tl.maximum(tl.minimum(tl.maximum(q_lo + (lk - lq) + 1, 0), lk), pre)
    else:
        hi = lk
        full = lk
    if HAS_TREE:
        full = tl.minimum(full, tl.maximum(lk - lq, pre))
    full = (full // BLOCK_N) * BLOCK_N
    lo_s = split * split_len
    hi_s = lo_s + split_len

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo_s, tl.minimum(full, hi_s), BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_base, V_base, start_n, offs_n, offs_d, stride_kt,
                                   stride_vt, qk_scale, qpos, row_ok, lq, lk, PREFIX, TREE_base, stride_tq,
                                   HEAD_DIM, BLOCK_D, False, CAUSAL, HAS_TREE, PREC)
    for start_n in range(tl.maximum(full, lo_s), tl.minimum(hi, hi_s), BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_base, V_base, start_n, offs_n, offs_d, stride_kt,
                                   stride_vt, qk_scale, qpos, row_ok, lq, lk, PREFIX, TREE_base, stride_tq,
                                   HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_TREE, PREC)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    O_base = O + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_ot
    tl.store(O_base + qpos[:, None] * stride_ot + hq[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_mask)
    L_base = LSE + split.to(tl.int64) * stride_ls + b.to(tl.int64) * stride_lb + q_start.to(tl.int64) * stride_lt
    tl.store(L_base + qpos * stride_lt + hq, lse, mask=row_ok)


@triton.jit(do_not_specialize=_NO_SPEC[:3])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, TREE, CU_Q, CU_K, qk_scale, sm_scale,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                     stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lt, stride_tb, stride_tq,
                     seqlen_q, seqlen_k, PREFIX, num_heads_kv,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_TREE: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr):
    """dK, dV of one key block (all query heads of its group summed in); with ATOMIC_DQ also this block's share
    of dQ, added into a float32 buffer with relaxed atomics (FlashAttention-2's single-pass backward), which
    saves the dQ kernel's recomputation of QK^T and dO V^T."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hk, q_start, k_start, lq, lk = _row_setup(pid_n, pid_bh, CU_Q, CU_K, seqlen_q, seqlen_k, num_heads_kv,
                                                 GROUP, BLOCK_M, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= lk:
        return
    rows = lq * GROUP
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < lk) & (offs_d[None, :] < HEAD_DIM)
    K_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    k = tl.load(K_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    Q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qt
    DO_base = DO + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dot
    L_off = b.to(tl.int64) * stride_lb + q_start.to(tl.int64) * stride_lt
    TREE_base = TREE + b.to(tl.int64) * stride_tb
    DQ_base = DQ + b.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqt

    # Rows (packed) that can see this key block, and from which row on they see all of it.
    m_lo = start_n * 0
    m_mid = start_n * 0
    if CAUSAL:
        if start_n >= PREFIX:
            m_lo = tl.maximum(start_n - (lk - lq), 0) * GROUP
            m_lo = (m_lo // BLOCK_M) * BLOCK_M
        m_mid = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - (lk - lq), 0) * GROUP, rows)
    if HAS_TREE:
        if start_n + BLOCK_N > lk - lq:
            m_mid = rows
    m_mid = m_lo + tl.cdiv(tl.maximum(m_mid - m_lo, 0), BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(m_lo, rows, BLOCK_M):
        offs_m = start_m + offs_mb
        qpos = offs_m // GROUP
        hq = hk * GROUP + offs_m % GROUP
        row_ok = offs_m < rows
        r_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q_base + qpos[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :], mask=r_mask,
                    other=0.0)
        do = tl.load(DO_base + qpos[:, None] * stride_dot + hq[:, None] * stride_doh + offs_d[None, :],
                     mask=r_mask, other=0.0)
        lse = tl.load(LSE + L_off + qpos * stride_lt + hq, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + L_off + qpos * stride_lt + hq, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse[None, :])
        if start_m < m_mid:
            ok = _visible(qpos, offs_n, row_ok, lq, lk, PREFIX, TREE_base, stride_tq, CAUSAL, HAS_TREE)
            pT = tl.where(tl.trans(ok), pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * sm_scale  # (BLOCK_M, BLOCK_D)
            tl.atomic_add(DQ_base + qpos[:, None] * stride_dqt + hq[:, None] * stride_dqh + offs_d[None, :], dq,
                          mask=r_mask, sem="relaxed")
    dk = dk * sm_scale
    DK_base = DK + b.to(tl.int64) * stride_dkb + k_start.to(tl.int64) * stride_dkt + hk * stride_dkh
    DV_base = DV + b.to(tl.int64) * stride_dvb + k_start.to(tl.int64) * stride_dvt + hk * stride_dvh
    tl.store(DK_base + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=_NO_SPEC[:4])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, TREE, CU_Q, CU_K, qk_scale, sm_scale,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lt, stride_tb, stride_tq,
                   seqlen_q, seqlen_k, PREFIX, num_heads_kv, num_m_blocks,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_TREE: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    pid_bh = tl.program_id(1)
    b, hk, q_start, k_start, lq, lk = _row_setup(pid_m, pid_bh, CU_Q, CU_K, seqlen_q, seqlen_k, num_heads_kv,
                                                 GROUP, BLOCK_M, VARLEN)
    rows = lq * GROUP
    if pid_m * BLOCK_M >= rows:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qpos = offs_m // GROUP
    hq = hk * GROUP + offs_m % GROUP
    row_ok = offs_m < rows
    r_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    Q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qt
    DO_base = DO + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dot
    K_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    L_off = b.to(tl.int64) * stride_lb + q_start.to(tl.int64) * stride_lt
    TREE_base = TREE + b.to(tl.int64) * stride_tb
    q = tl.load(Q_base + qpos[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :], mask=r_mask,
                other=0.0)
    do = tl.load(DO_base + qpos[:, None] * stride_dot + hq[:, None] * stride_doh + offs_d[None, :], mask=r_mask,
                 other=0.0)
    lse = tl.load(LSE + L_off + qpos * stride_lt + hq, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + L_off + qpos * stride_lt + hq, mask=row_ok, other=0.0)

    q_lo = (pid_m * BLOCK_M) // GROUP
    q_hi = tl.minimum(((pid_m + 1) * BLOCK_M - 1) // GROUP, lq - 1)
    pre = tl.minimum(PREFIX, lk)
    if CAUSAL:
        hi = tl.maximum(tl.minimum(q_hi + (lk - lq) + 1, lk), pre)
        full = tl.maximum(tl.minimum(tl.maximum(q_lo + (lk - lq) + 1, 0), lk), pre)
    else:
        hi = lk
        full = lk
    if HAS_TREE:
        full = tl.minimum(full, tl.maximum(lk - lq, pre))
    full = (full // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        kpos = start_n + offs_n
        kv_mask = (kpos[:, None] < lk) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K_base + kpos[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_base + kpos[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if start_n >= full:
            ok = _visible(qpos, kpos, row_ok, lq, lk, PREFIX, TREE_base, stride_tq, CAUSAL, HAS_TREE)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * sm_scale
    DQ_base = DQ + b.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqt
    tl.store(DQ_base + qpos[:, None] * stride_dqt + hq[:, None] * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=r_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, n_rows, seqlen, num_heads, stride_ob, stride_ot, stride_oh,
                      stride_dob, stride_dot, stride_doh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d] over flattened (batch, token, head) rows, in float32."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    b = (r // (seqlen * num_heads)).to(tl.int64)
    t = ((r // num_heads) % seqlen).to(tl.int64)
    h = r % num_heads
    m = (r < n_rows)[:, None] & (d[None, :] < HEAD_DIM)
    o = tl.load(O + (b * stride_ob + t * stride_ot + h * stride_oh)[:, None] + d[None, :], mask=m, other=0.0)
    do = tl.load(DO + (b * stride_dob + t * stride_dot + h * stride_doh)[:, None] + d[None, :], mask=m, other=0.0)
    tl.store(DELTA + r, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=r < n_rows)


@triton.jit
def _split_combine_kernel(OP, LP, O, LSE, n_rows, splits, stride_os, stride_ls,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge split-KV partials: OP (S, rows, D) float32 normalized per split, LP (S, rows) their log-sum-exps."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LP + s * stride_ls + row, mask=s < splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)
    tot = tl.sum(w, 0)
    o = tl.load(OP + s[:, None].to(tl.int64) * stride_os + row * HEAD_DIM + d[None, :],
                mask=(s[:, None] < splits) & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot == 0.0, 1.0, tot)
    tl.store(O + row * HEAD_DIM + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(LSE + row, tl.where(tot == 0.0, float("-inf"), m_use + tl.log(tl.where(tot == 0.0, 1.0, tot))))
