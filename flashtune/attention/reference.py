"""Plain-PyTorch attention: the CPU path and the test oracle for the Triton FlashAttention kernels.

FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness (Dao et al., arXiv:2205.14135);
FlashAttention-2 (Dao, arXiv:2307.08691). This file computes the same function the slow, obvious way: the full
score matrix in float32 (float64 when the inputs are float64), one sequence at a time.

Masking conventions (shared with the kernels, see ``mask_for``):
- ``causal``: queries are aligned to the *end* of the keys (bottom-right), so query i of ``lq`` sees keys
  ``j <= i + (lk - lq)``. That is decoding against a cache; with ``lq == lk`` it is the usual triangle.
- ``prefix_len``: the first ``prefix_len`` keys are visible to every query (prefix-tuning).
- ``tree_mask`` (lq, lq) bool: over the last lq x lq block of the keys, ``tree_mask[i, j]`` says whether query i
  sees key ``lk - lq + j``; every key before that block is visible (Medusa / MTP tree verification).
- A query that sees no key gets a zero output and a log-sum-exp of -inf.
"""

from __future__ import annotations

import math

import torch


def mask_for(lq: int, lk: int, *, causal: bool, prefix_len: int = 0, tree_mask: torch.Tensor | None = None,
             device=None) -> torch.Tensor | None:
    """The boolean (lq, lk) visibility mask of one sequence (True = attend), or None when everything is visible."""
    if not causal and tree_mask is None:
        return None
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i + (lk - lq)
    if tree_mask is not None:
        off = lk - lq
        block = torch.ones(lq, lk, dtype=torch.bool, device=device)
        # tree_mask (lq, lq) covers keys [off, lk); keys before it stay visible.
        block[:, max(off, 0):] = tree_mask.to(device=device, dtype=torch.bool)[:, max(-off, 0):]
        keep &= block
    if prefix_len:
        keep |= j < prefix_len
    return keep


def _attend(q, k, v, scale, keep, attn_mask):
    """q (lq, hq, d), k/v (lk, hk, d) -> out (lq, hq, d) in the compute dtype, lse (hq, lq)."""
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)  # (lk, hq, d): query head h reads kv head h // group
        v = v.repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale  # (hq, lq, lk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (hq, lq)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    p = p.masked_fill(torch.isinf(lse)[..., None], 0.0)  # rows that see no key: zero output
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse


def attention_reference(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                        cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                        prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                        tree_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                        return_lse: bool = False, compute_dtype: torch.dtype | None = None):
    """Exact attention with the same arguments and shapes as ``flashtune.attention.flash_attention``.

    q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D); or packed varlen q (Tq, Hq, D), k/v (Tk, Hkv, D) with
    ``cu_seqlens_q``/``cu_seqlens_k`` (S+1,) int. ``prefix_k``/``prefix_v`` (1 or B|S, P, Hkv, D) are put in front
    of every sequence's keys and are visible to all queries. ``tree_mask`` (Lq, Lq) or (B, Lq, Lq) bool.
    ``attn_mask`` (B, 1|Hq, Lq, Lk') bool (True = attend) or additive float, dense layout only, applied on top
    (Lk' counts the prefix). Returns out shaped like q in q's dtype, and with ``return_lse`` the log-sum-exp
    (B, Hq, Lq) or (Hq, Tq) in float32 (float64 for float64 inputs).
    """
    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    varlen = cu_seqlens_q is not None
    if varlen:
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = [(slice(starts_q[s], starts_q[s + 1]), slice(starts_k[s], starts_k[s + 1]))
                  for s in range(len(starts_q) - 1)]
        get = lambda t, sl: t[sl]  # noqa: E731
    else:
        pieces = [(b, b) for b in range(q.shape[0])]
        get = lambda t, b: t[b]  # noqa: E731
    outs, lses = [], []
    for idx, (sq, sk) in enumerate(pieces):
        qs, ks, vs = get(q, sq).to(cdt), get(k, sk).to(cdt), get(v, sk).to(cdt)
        plen = 0
        if prefix_k is not None:
            pb = 0 if prefix_k.shape[0] == 1 else idx
            ks = torch.cat([prefix_k[pb].to(cdt), ks], dim=0)  # (P + lk, hk, d)
            vs = torch.cat([prefix_v[pb].to(cdt), vs], dim=0)
            plen = prefix_k.shape[1]
        tm = None
        if tree_mask is not None:
            tm = tree_mask if tree_mask.dim() == 2 else tree_mask[0 if tree_mask.shape[0] == 1 else idx]
        keep = mask_for(qs.shape[0], ks.shape[0], causal=causal, prefix_len=plen, tree_mask=tm, device=q.device)
        am = None
        if attn_mask is not None:
            am = attn_mask[0 if attn_mask.shape[0] == 1 else idx]  # (1|Hq, Lq, Lk')
        o, lse = _attend(qs, ks, vs, scale, keep, am)
        outs.append(o.to(q.dtype))
        lses.append(lse)
    if varlen:
        out = torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
        lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=cdt)
    else:
        out = torch.stack(outs, dim=0)
        lse = torch.stack(lses, dim=0)
    return (out, lse) if return_lse else out
