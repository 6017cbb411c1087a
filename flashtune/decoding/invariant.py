"""Batch-invariant kernels for the decoding engine's `invariant` mode: every row's arithmetic independent of the
other rows, so that a speculative tree pass gives each node bit for bit the logits of a one-token step.

Paper / idea: He et al., "Defeating Nondeterminism in LLM Inference", Thinking Machines Lab (2025): make each
reduction's order a function of the problem's shape, never of the batch. Here:

  linear_fixed    a GEMM whose tiling and K order depend only on the weight's shape, never on the row count
                  (cuBLAS picks other kernels, split-K included, for 1 and for 31 rows)
  slot_attention_logical  attention that walks each token's keys in position order: committed slots, then its
                  ancestors, gathered through the tree's ancestor table (tree.TreeBuffers.ancestors), in key
                  blocks aligned the same way a one-token step's are (the tree kernel of kernels.py sums a
                  node's keys in slot order, with its siblings masked in between)

Both run natively on CUDA and in Triton's CPU interpreter (the tests); bench/profile_decode.py --invariant and
--gemm measure them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import flashtune.attention.ops  # noqa: F401 - applies the CPU-interpreter fixes the tests rely on
from flashtune.decoding.kernels import LOG2E, online_softmax_step


def _gemm_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for a [N, K] weight: a function of the shape only (the
    invariance). The tile sweep of `bench/profile_decode.py --gemm` on the H200 (bench/results/
    profile_gemm-h200.json, bench/NOTES.md "Fourth look") picks these: narrow 16-column tiles with long K steps
    while the matrix gives few tiles, wider tiles as N grows. Within 1.4% of the sweep's best on all ten
    decode matrices of SmolLM2 and the 1.1B shape; as fast as the earlier (32 or 64) x 64 rule on the LM heads
    and 1.3-2.6x faster on the rest."""
    if n <= 2560:  # <= 160 tiles of 16 columns
        return 16, 256, 2, 3
    if n <= 16384:
        return 32, 128, 4, 4
    return (64, 64, 4, 3) if k < 1024 else (64, 128, 2, 3)


@triton.jit(do_not_specialize=["M"])
def _linear_fixed_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # one program owns an output tile and walks K in order: no split-K
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_fixed(x, weight, bias=None, block_n: int | None = None, block_k: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None):
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], fp32 accumulation, each row's result independent
    of how many rows there are (fixed 16-row tiles, no split-K). The tile options must depend on the weight's
    shape only (None: the rule of `_gemm_config`); they exist for bench/profile_decode.py --gemm."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    rule = _gemm_config(n, k)
    block_n, block_k = block_n or rule[0], block_k or rule[1]
    num_warps, num_stages = num_warps or rule[2], num_stages or rule[3]
    _linear_fixed_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, 16))](
        x2, w, bias if bias is not None else w, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)
    return y.view(*x.shape[:-1], n)


@triton.jit(do_not_specialize=["T", "LO"])
def _slot_attn_logical_kernel(Q, K, V, O, START, ANC, DEPTH, qk_scale, LO, T, G, NKV, stride_anc,
                              stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                              stride_vb, stride_vh, stride_vs, stride_ob, stride_ot, stride_oh,
                              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    node = tl.program_id(0)  # one token per program: its G query heads are the rows
    pid_bh = tl.program_id(1)
    b = pid_bh // NKV
    kvh = pid_bh % NKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G
    head = kvh * G + rows
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * stride_qb + node * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    start = tl.load(START + b)
    hi = start + tl.load(DEPTH + node) + 1  # positions [LO, hi): committed ones, then the ancestors, then itself
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for lo in range(LO, hi, BLOCK_N):
        pos = lo + tl.arange(0, BLOCK_N)
        live = pos < hi
        rel = pos - start  # >= 0: the ancestor at depth rel, whose K/V sit at slot start + its node index
        anc = tl.load(ANC + node * stride_anc + rel, mask=live & (rel >= 0), other=0)
        slot = tl.where(rel >= 0, start + anc, pos)
        kmask = live[:, None] & dmask[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(row_ok[:, None] & live[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * stride_ob + node * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])


def slot_attention_logical(q, k_cache, v_cache, start, ancestors, depth, lo: int = 0, scale: float = 1.0):
    """`slot_attention` for tree (or single-token) passes in position order, batch-invariant.

    q [B, T, Hq, D]; k_cache/v_cache [B', Hkv, S, D]; start long [B] (row b's committed slots are [lo, start_b),
    its new tokens sit at start_b + node); ancestors long [T, Dmax+1] and depth long [T] (tree.TreeBuffers):
    token i sees positions lo .. start_b + depth_i, position start_b + k being its depth-k ancestor's slot.
    The blocks of keys are aligned at `lo` whatever T is, so a node gets bit for bit what a one-token step at
    its position gets from the same keys. Returns [B, T, Hq, D]."""
    bsz, t, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    out = torch.empty(bsz, t, hq, d, dtype=q.dtype, device=q.device)
    anc = ancestors.contiguous()
    _slot_attn_logical_kernel[(t, bsz * hkv)](
        q, k_cache, v_cache, out, start.contiguous(), anc, depth.contiguous(), scale * LOG2E, lo, t, g, hkv,
        anc.stride(0), q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        out.stride(2), D=d, BLOCK_M=max(16, triton.next_power_of_2(g)), BLOCK_N=64,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4)
    return out
