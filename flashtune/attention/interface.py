"""The public FlashAttention function: checks shapes, then runs the Triton kernels or the reference.

FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning (Dao, arXiv:2307.08691).
"""

from __future__ import annotations

import math
import os

import torch

from ..errors import ConfigError
from .reference import attention_reference

MAX_HEAD_DIM = 256


def _use_kernel(q: torch.Tensor) -> bool:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_mask(tree_mask, lq, lk, batch):
    if tree_mask.dtype != torch.bool:
        raise ConfigError(f"tree_mask must be a bool tensor, got {tree_mask.dtype}; pass mask.bool()")
    if tree_mask.dim() == 2:
        tree_mask = tree_mask.unsqueeze(0)
    if tree_mask.dim() != 3 or tree_mask.shape[1:] != (lq, lq) or tree_mask.shape[0] not in (1, batch):
        raise ConfigError(f"tree_mask must have shape ({lq}, {lq}) or (1|{batch}, {lq}, {lq}) to match q_len={lq}, "
                          f"got {tuple(tree_mask.shape)}")
    if lk < lq:
        raise ConfigError(f"tree_mask needs at least as many keys as queries (k_len={lk} < q_len={lq})")
    return tree_mask


def _with_prefix(k, v, prefix_k, prefix_v, cu_k, n_seqs):
    """Put the prefix keys in front of every sequence's keys; returns k, v, cu_k, prefix length."""
    if prefix_v is None or prefix_k.shape != prefix_v.shape:
        raise ConfigError("prefix_k and prefix_v must both be given with the same shape (1|B, P, Hkv, D)")
    if prefix_k.dim() != 4 or prefix_k.shape[2:] != k.shape[-2:] or prefix_k.shape[0] not in (1, n_seqs):
        raise ConfigError(f"prefix_k must have shape (1|{n_seqs}, P, {k.shape[-2]}, {k.shape[-1]}), "
                          f"got {tuple(prefix_k.shape)}")
    plen = prefix_k.shape[1]
    pk, pv = prefix_k.to(k.dtype), prefix_v.to(v.dtype)
    if cu_k is None:  # dense: (B, P + Lk, Hkv, D)
        b = k.shape[0]
        return (torch.cat([pk.expand(b, -1, -1, -1), k], 1), torch.cat([pv.expand(b, -1, -1, -1), v], 1),
                None, plen)
    # varlen: sequence s becomes [prefix_s ; keys_s]; build it with one gather over [all prefixes ; all keys]
    lens = cu_k[1:] - cu_k[:-1]
    new_cu = torch.zeros_like(cu_k)
    new_cu[1:] = torch.cumsum(lens + plen, 0)
    pool_k = torch.cat([pk.reshape(-1, *k.shape[1:]), k], 0)  # (S'*P + Tk, Hkv, D)
    pool_v = torch.cat([pv.reshape(-1, *v.shape[1:]), v], 0)
    seq = torch.repeat_interleave(torch.arange(n_seqs, device=k.device), (lens + plen).long())
    pos = torch.arange(seq.numel(), device=k.device) - new_cu[:-1].long()[seq]  # position inside the sequence
    pidx = (seq if prefix_k.shape[0] > 1 else torch.zeros_like(seq)) * plen + pos
    kidx = pk.shape[0] * plen + cu_k[:-1].long()[seq] + pos - plen
    idx = torch.where(pos < plen, pidx, kidx)
    return pool_k[idx], pool_v[idx], new_cu.to(torch.int32), plen


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                    max_seqlen_k: int | None = None, prefix_k: torch.Tensor | None = None,
                    prefix_v: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                    return_lse: bool = False):
    """Exact softmax attention, computed tile by tile without materializing the score matrix.

    Shapes (B batch, Lq/Lk query/key lengths, Hq query heads, Hkv key/value heads, D head dim):

    - dense: q (B, Lq, Hq, D), k and v (B, Lk, Hkv, D) -> out (B, Lq, Hq, D), lse (B, Hq, Lq).
    - packed variable length (S sequences): q (Tq, Hq, D), k and v (Tk, Hkv, D), ``cu_seqlens_q`` and
      ``cu_seqlens_k`` (S+1,) int cumulative lengths (sequence s is rows cu[s]:cu[s+1]) -> out (Tq, Hq, D),
      lse (Hq, Tq). ``max_seqlen_q/k`` (ints) save a device sync when given.

    Hq must be a multiple of Hkv (GQA; Hkv = 1 is MQA): query head h reads key/value head h // (Hq // Hkv).
    ``softmax_scale`` defaults to 1/sqrt(D).

    ``causal``: queries are aligned to the *end* of the keys (decoding against a cache), so query i sees key j
    iff j <= i + Lk - Lq. With Lq = Lk, Lq = 3, Lk = 5 respectively (1 = attend)::

        1 0 0        1 1 1 0 0
        1 1 0        1 1 1 1 0
        1 1 1        1 1 1 1 1

    A query row that sees no key (causal with Lq > Lk) gets zeros and lse = -inf.

    ``prefix_k``/``prefix_v`` (1 or B|S, P, Hkv, D): keys/values put in front of every sequence's keys and visible
    to every query (prefix-tuning); they are differentiable.

    ``tree_mask`` (Lq, Lq) or (1|B, Lq, Lq) bool, dense layout only: ``tree_mask[i, j]`` says whether query i sees
    key ``Lk - Lq + j`` (the last Lq keys); all keys before that block are visible (Medusa / MTP tree
    verification). Combined with ``causal`` both masks apply.

    Runs the Triton kernels for float16/bfloat16/float32 CUDA tensors (float32 with exact IEEE products), and
    on CPU tensors when ``TRITON_INTERPRET=1`` is set; otherwise (and for D > 256) the plain PyTorch reference.
    Returns ``out`` or ``(out, lse)`` with ``return_lse`` (lse float32, natural log).
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ConfigError("pass both cu_seqlens_q and cu_seqlens_k for a packed variable-length batch")
    want = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seq, heads, head_dim)"
            raise ConfigError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ConfigError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or (not varlen and q.shape[0] != k.shape[0]):
        raise ConfigError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ConfigError("q, k and v must share one dtype and one device")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hk == 0 or hq % hk:
        raise ConfigError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.device != q.device:
                raise ConfigError(f"{name} must be a 1-D int32 tensor on {q.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ConfigError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
        if tree_mask is not None:
            raise ConfigError("tree_mask needs the dense (batch, seq, heads, head_dim) layout, not cu_seqlens")
        n_seqs = cu_seqlens_q.numel() - 1
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    else:
        n_seqs = q.shape[0]
        cu_q = cu_k = None
    lq = q.shape[0 if varlen else 1]
    if tree_mask is not None:
        lk_total = k.shape[1] + (prefix_k.shape[1] if prefix_k is not None else 0)
        tree_mask = _check_mask(tree_mask, q.shape[1], lk_total, n_seqs)

    if not _use_kernel(q) or d > MAX_HEAD_DIM or q.numel() == 0 or k.numel() == 0 and prefix_k is None:
        tm = None if tree_mask is None else tree_mask
        out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k, prefix_k=prefix_k, prefix_v=prefix_v,
                                       tree_mask=tm, return_lse=True)
        lse = lse.float()
        return (out, lse) if return_lse else out

    plen = 0
    if prefix_k is not None:
        k, v, cu_k, plen = _with_prefix(k, v, prefix_k, prefix_v, cu_k, n_seqs)
    if varlen:
        lens_q, lens_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        max_q = int(max_seqlen_q) if max_seqlen_q is not None else int(lens_q.max().item()) if n_seqs else 0
        max_k = (int(max_seqlen_k) + plen if max_seqlen_k is not None
                 else int(lens_k.max().item()) if n_seqs else 0)
    else:
        max_q, max_k = lq, k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tree = None if tree_mask is None else tree_mask.to(torch.int8).contiguous()
    from . import ops  # imports triton

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        out, lse = ops.FlashAttnFunction.apply(q, k, v, cu_q, cu_k, tree, scale, bool(causal), plen, max_q, max_k)
    else:  # inference: skip the custom-op and autograd dispatch (tens of microseconds a call when decoding)
        out, lse = ops.fwd_launch(q, k, v, cu_q, cu_k, tree, scale, bool(causal), plen, max_q, max_k)
    if not return_lse:
        return out
    return out, (lse.transpose(0, 1) if varlen else lse.permute(0, 2, 1))  # (Hq, Tq) / (B, Hq, Lq)
