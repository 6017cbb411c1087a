"""A preallocated key/value cache written by index (static shapes, so decoding steps can be CUDA-graphed).

Layout: k, v [n_layers, max_batch, n_kv_heads, max_seq, head_dim]. Sequence b's committed tokens live in slots
[0, lengths[b]); slot index = position (a prefix-tuning prefix, when present, fills slots [0, P) and the
prompt starts at position P, as Hugging Face does with `past_key_values`). Slots at or beyond a sequence's
length hold garbage that attention masks never read.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.prefix_len = 0
        self._heads = torch.arange(n_kv_heads, device=device)
        self.fused = False  # the engine sets it on its Triton path: `compact` in one kernel (kernels.py)

    @property
    def max_seq(self) -> int:
        return self.k.shape[3]

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    def seed_prefix(self, prefix) -> None:
        """prefix: per layer (k, v), each [1 or batch, n_kv_heads, P, head_dim]; written to slots [0, P)."""
        for layer, (pk, pv) in enumerate(prefix):
            p = pk.shape[2]
            self.k[layer, :, :, :p] = pk.to(self.k.dtype)
            self.v[layer, :, :, :p] = pv.to(self.v.dtype)
            self.prefix_len = p

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, T, D] written at slots [B, T] of rows 0..B-1."""
        bsz = slots.shape[0]
        b = torch.arange(bsz, device=slots.device)[:, None, None]
        idx = (b, self._heads[None, :, None], slots[:, None, :])  # broadcasts to [B, H, T]
        self.k[layer].index_put_(idx, k)
        self.v[layer].index_put_(idx, v)

    def compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move slots src [B, M] to dst [B, M] in every layer (gathered first, so overlaps are safe)."""
        if self.fused:
            from flashtune.decoding.kernels import compact_cache

            compact_cache(self.k, self.v, src, dst)
            return
        b = torch.arange(src.shape[0], device=src.device)[:, None]
        for t in (self.k, self.v):
            moved = t[:, b, :, src]  # [B, M, n_layers, H, D]
            t[:, b, :, dst] = moved

    def view(self, layer: int, batch: int, seq: int | None = None):
        """(k, v) of rows 0..batch-1 and slots 0..seq-1, each [batch, H, seq, D] (views, no copy)."""
        seq = self.max_seq if seq is None else seq
        return self.k[layer, :batch, :, :seq], self.v[layer, :batch, :, :seq]
