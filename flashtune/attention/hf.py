"""The "flashtune" attention implementation for Hugging Face transformers (5.x).

FlashAttention-2 (Dao, arXiv:2307.08691) inside HF models: ``register()`` adds the name "flashtune" to
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask builder, which hands us
the 2-D padding mask, or None when nothing is padded). Then::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashtune")
    model.set_attn_implementation("flashtune")

How masks are served:
- no mask: one dense call, causal aligned to the end of the keys (prefill, training, decoding with a cache);
  packed sequences (position_ids restarting at 0, no mask, no cache) become a varlen call;
- a 2-D padding mask: the padded tokens are dropped and the rest packed into one varlen call (queries are the
  last q_len positions of the mask, as in HF's own FlashAttention path); padded query rows get zeros;
- attention dropout while training: torch's SDPA with the equivalent boolean mask;
- anything else (a 4-D custom mask such as a Medusa tree, sliding windows, soft-capping, attention sinks): the
  plain reference with the full mask, which is exact but materializes the scores.
"""

from __future__ import annotations

import torch

from .interface import flash_attention
from .reference import attention_reference

NAME = "flashtune"


# Every layer of one forward pass receives the same position_ids tensor; the analysis below syncs with the
# host, so its answer is kept for that tensor (identity and in-place version) instead of redone per layer.
_PACKED_CACHE: list = [None, -1, None]  # [position_ids, its _version, result]


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens over the flattened (B*L) tokens when position_ids restart at 0 inside a row, else None."""
    cached, version, result = _PACKED_CACHE
    if cached is position_ids and version == position_ids._version:
        return result
    result = _analyse_positions(position_ids)
    _PACKED_CACHE[:] = [position_ids, position_ids._version, result]
    return result


def _analyse_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts_row = starts.view(position_ids.shape)[:, 1:]
    if not bool(starts_row.any()) or not bool((position_ids[:, 0] == 0).all()):
        return None
    idx = torch.nonzero(starts).flatten().to(torch.int32)
    return torch.cat([idx, idx.new_tensor([flat.numel()])])


def _fallback_mask(attention_mask, b, lq, lk, causal, window, device):
    """(B, 1, Lq, Lk) bool for the reference path: padding & causal (end-aligned) & sliding window."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window:
        keep &= i - j < window
    keep = keep[None, None].expand(b, 1, lq, lk)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, -lk:].bool()
    return keep


def flashtune_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, sliding_window: int | None = None,
                                softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """HF attention function. query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) -> ((B, Lq, Hq, D), None)."""
    b, hq, lq, d = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal)
    if key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, D) views
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < k.shape[1]:
        k, v = k[:, :attention_mask.shape[1]], v[:, :attention_mask.shape[1]]  # static cache: unused slots
    lk = k.shape[1]
    if dropout and module.training:
        # attention dropout: torch's SDPA (math or fused) with the equivalent boolean mask
        mask = _fallback_mask(attention_mask, b, lq, lk, causal, sliding_window, q.device)
        if mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        else:  # a padded query row that sees nothing would give NaN: let it see everything (it is ignored)
            mask = mask | ~mask.any(-1, keepdim=True)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, :lk], value[:, :, :lk], attn_mask=mask, dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    unsupported = softcap or kwargs.get("s_aux") is not None or sliding_window
    if unsupported or (attention_mask is not None and attention_mask.dim() != 2):
        mask = _fallback_mask(attention_mask, b, lq, lk, causal, sliding_window, q.device)
        return attention_reference(q, k, v, softmax_scale=scaling, attn_mask=mask), None

    if attention_mask is None:
        pos = kwargs.get("position_ids")
        cu = _packed_cu_seqlens(pos) if pos is not None and lq == lk and pos.shape == (b, lq) else None
        if cu is None:
            return flash_attention(q, k, v, causal=causal, softmax_scale=scaling), None
        # packed sequences: (B*L, H, D) with sequence boundaries where position_ids restart
        out = flash_attention(q.reshape(b * lq, hq, d), k.reshape(b * lk, -1, d), v.reshape(b * lk, -1, d),
                              causal=causal, softmax_scale=scaling, cu_seqlens_q=cu, cu_seqlens_k=cu)
        return out.view(b, lq, hq, d), None

    # 2-D padding mask (B, Lk): drop padded tokens, one varlen call, scatter the rows back.
    keep_k = attention_mask[:, -lk:].bool()
    # queries are the last lq positions (left padding, dynamic cache); a single query is always real (as in
    # HF's FlashAttention path, which also covers static caches whose unused slots sit after it)
    keep_q = keep_k[:, -lq:] if lq > 1 else torch.ones(b, 1, dtype=torch.bool, device=q.device)
    idx_k = torch.nonzero(keep_k.reshape(-1)).flatten()
    idx_q = torch.nonzero(keep_q.reshape(-1)).flatten()
    cu_k = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu_q = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = keep_k.sum(1).cumsum(0)
    cu_q[1:] = keep_q.sum(1).cumsum(0)
    qp = q.reshape(b * lq, hq, d)[idx_q]  # (Tq, Hq, D)
    kp = k.reshape(b * lk, -1, d)[idx_k]  # (Tk, Hkv, D)
    vp = v.reshape(b * lk, -1, d)[idx_k]
    out = flash_attention(qp, kp, vp, causal=causal, softmax_scale=scaling, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    full = out.new_zeros(b * lq, hq, d).index_copy(0, idx_q, out)  # padded query rows stay zero
    return full.view(b, lq, hq, d), None


def _skip_flash_preload() -> None:
    """transformers treats every implementation whose name contains "flash" as a FlashAttention package and
    preloads it from ``flash_attn`` or the kernels hub when a model selects it; "flashtune" has nothing to
    preload, so let that call pass for our name only."""
    from transformers import modeling_utils

    preload = modeling_utils.lazy_import_flash_attention
    if getattr(preload, "_flashtune", False):
        return

    def lazy_import_flash_attention(implementation, *args, **kwargs):
        if implementation is not None and implementation.removeprefix("paged|") == NAME:
            return (None, None, None, None, None), None
        return preload(implementation, *args, **kwargs)

    lazy_import_flash_attention._flashtune = True
    modeling_utils.lazy_import_flash_attention = lazy_import_flash_attention


def register() -> None:
    """Register "flashtune" with transformers' attention and mask interfaces. Safe to call any number of times."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, flashtune_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    _skip_flash_preload()
