"""The EAGLE-3 draft layer on the engine's Triton kernels: what the drafter runs per draft step on CUDA.

Paper: EAGLE-3, Li et al., arXiv 2503.01840 (the layer itself: model.py). The arithmetic is MidLayer's up to
rounding (fp32 norm statistics, the same RoPE angles); what changes is the number of launches. Per pass: the
embedding, both input norms in one kernel (kernels.rms_norm_pair), q/k/v in one matmul, rotary + cache write
(kernels.rope_cache), attention over the row's live slots only (kernels.slot_attention, instead of a dense mask
over the whole static cache), o, residual add + norm (kernels.add_rms_norm), gate/up in one matmul, SwiGLU,
down with the residual add in its addmm: 11 launches, about a fifth of the PyTorch layer's.

Visibility is slot_attention's: the queries' slots are [start, start + T) of each row and they see the committed
slots [lo, start) plus, among the new ones, themselves and earlier ones (causal) or those a tree mask allows. A
tree level's K frontier nodes are not at the start of such a block: they run as rows `rows` of the block of all
draft slots so far (the other rows' queries are zeros and their outputs dropped), with the frontier's ancestor
rows as its tree mask.
"""

from __future__ import annotations

import torch

from flashtune.decoding.drafters.base import engine_norm
from flashtune.decoding.kernels import add_rms_norm, rms_norm_pair, rope_cache, silu_mul, slot_attention
from flashtune.decoding.model import rope_values


class FusedLayer:
    """An engine-side copy of an `Eagle3Draft`'s layer, norm and head (engine device and dtype), with a RoPE
    table for positions [0, slots)."""

    def __init__(self, draft, engine, slots: int):
        m, c = draft.midlayer, draft.config
        dev, dt = engine.device, engine.dtype

        def w(t):
            return t.detach().to(device=dev, dtype=dt).contiguous()

        at = m.self_attn
        self.wqkv = w(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]))  # [(Hq + 2 Hkv) D, 2H]
        self.wo = w(at.o_proj.weight)
        self.w_in = w(torch.cat([m.mlp.gate_proj.weight, m.mlp.up_proj.weight]))  # [gate; up]: [2I, H]
        self.w_down = w(m.mlp.down_proj.weight)
        self.lm_head = w(draft.lm_head.weight)
        self.n_emb, self.n_hid, self.n_post = ((w(n.weight), n.eps) for n in
                                               (m.input_layernorm, m.hidden_norm, m.post_attention_layernorm))
        self.norm = engine_norm(draft.norm, engine)
        self.embed = engine.model.embed
        self.nq, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim ** -0.5
        self.cos, self.sin = rope_values(torch.arange(slots, device=dev), draft.inv_freq.to(dev), draft.rope_scaling,
                                         dt, signed=True)  # [S, D]; rope_cache's signed sin

    def run(self, x, tokens, positions, slots, k_cache, v_cache, start, lo: int, tree=None, rows=None):
        """x [B, q, H] (fc output or the layer's own output), tokens [B, q], positions / slots long [B, q],
        start long [B] (see the module's docstring), tree uint8 [T, T] with rows long [q] (a tree level) or
        None (consecutive causal slots from `start`). Writes K/V at the slots; returns the output [B, q, H]."""
        bsz, q, hid = x.shape
        n = bsz * q
        cat = rms_norm_pair(self.embed(tokens).reshape(n, hid), x.reshape(n, hid), self.n_emb[0], self.n_hid[0],
                            self.n_emb[1], self.n_hid[1])  # [N, 2H]
        qkv = (cat @ self.wqkv.t()).view(bsz, q, self.nq + 2 * self.nkv, self.d)
        qr = rope_cache(qkv, self.cos[positions], self.sin[positions], slots, k_cache, v_cache, self.nq, self.nkv)
        if rows is None:
            attn = slot_attention(qr, k_cache, v_cache, start, None, lo, self.scale)  # [B, q, Hq, D]
        else:  # the frontier as rows of the block of all draft slots so far
            full = qr.new_zeros(bsz, tree.shape[0], self.nq, self.d)
            full[:, rows] = qr
            attn = slot_attention(full, k_cache, v_cache, start, tree, lo, self.scale)[:, rows]
        y, h = add_rms_norm(x.reshape(n, hid), attn.reshape(n, -1) @ self.wo.t(), *self.n_post)
        return torch.addmm(y, silu_mul(h @ self.w_in.t()), self.w_down.t()).view(bsz, q, hid)

    def logits(self, out):
        """The layer's output [..., H] -> draft-vocabulary logits [..., Vd]."""
        return self.norm(out) @ self.lm_head.t()
