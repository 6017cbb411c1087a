"""Compact decoder-only transformer that loads Hugging Face weights, for the decoding engine.

Covers the Llama family (Llama, Mistral, Qwen2, SmolLM2: RMSNorm, rotary positions, gated SiLU MLP, GQA,
optional q/k/v bias) and GPT-2 (LayerNorm, learned positions, GELU MLP, fused c_attn). Owning the model code
(gpt-fast style) makes the KV cache static and written by index, lets a step take an arbitrary boolean mask
(tree attention) and keeps every step capturable in a CUDA graph; docs/decoding.md gives the measurement
behind that choice. q/k/v and gate/up are fused into one matrix each (fewer launches at batch 1).

Every forward takes explicit slots and a mask, so one function serves prefill, plain decoding and tree
verification:

    tokens    long [B, T]
    positions long [B, T]      rotary / learned position of each token
    slots     long [B, T]      cache slots the tokens' K/V are written to
    mask      SlotMask         which cache slots each token attends to (its own slot included), in the compact
                               form the Triton kernel reads; or a bool [B, T, S] for any other pattern
    returns   hidden [B, T, d] after the final norm (what lm_head reads)

Attention backends: "triton" (CUDA default: kernels.py fuses rotary + cache write and attends over each row's
live slots only), "matmul" (grouped matmuls with an additive bias over the whole static cache) and "sdpa" (the
CPU default, the arithmetic of transformers).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.cache import KVCache
from flashtune.errors import FlashtuneError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
BACKENDS = ("triton", "matmul", "sdpa")


@dataclass
class SlotMask:
    """The visibility of T new tokens written at slots start_b + i (i < T) of row b.

    Token i sees the committed slots [lo, start_b) and the new slots start_b + j with j <= i (tree None:
    causal) or tree[i, j] (bool [T, T], ancestors only, so j <= i). With `gap` [B], the committed slots in
    [gap_b, start_b) are seen only every `stride`-th one, (slot - gap_b + 1) % stride == 0 (an MTP module of
    depth D drafting past its first cycle sees its own earlier drafts, D slots apart, and not the stale slots
    between them). Decoding steps, tree verification, prefill and the MTP modules' passes all have this shape;
    `dense` gives the bool [B, T, S] mask the other backends take.
    """

    start: torch.Tensor  # long [B]
    tree: torch.Tensor | None = None  # bool or uint8 [T, T]
    lo: int = 0
    gap: torch.Tensor | None = None  # long [B]
    stride: int = 1
    # Position-order attention (the Triton path's batch-invariant mode): tree.TreeBuffers.ancestors [T, D+1]
    # and depth [T]; the visibility is the same as `tree`'s, only the order of the sum changes.
    ancestors: torch.Tensor | None = None
    depth: torch.Tensor | None = None

    def dense(self, t: int, seq: int) -> torch.Tensor:
        keys = torch.arange(seq, device=self.start.device)
        rel = keys[None, :] - self.start[:, None]  # [B, S]: slot - start
        node = torch.arange(t, device=self.start.device)
        if self.tree is None:
            new = (rel[:, None, :] >= 0) & (rel[:, None, :] <= node[None, :, None])  # [B, T, S]
        else:
            in_new = (rel >= 0) & (rel < t)
            cols = self.tree.bool()[:, rel.clamp(0, t - 1)].permute(1, 0, 2)  # [B, T, S]
            new = in_new[:, None, :] & cols
        old = (rel < 0) & (keys[None, :] >= self.lo)
        if self.gap is not None:
            after = keys[None, :] - self.gap[:, None] + 1  # [B, S]
            old = old & ((after <= 0) | (after % self.stride == 0))
        old = old[:, None, :]
        return old | new


def prepare_mask(mask, backend: str, t: int, seq: int, n_kv_heads: int, group: int, dtype):
    """A forward's mask in the form `backend` reads, built once and shared by every layer."""
    if isinstance(mask, SlotMask):
        if backend == "triton":
            tree = None if mask.tree is None else mask.tree.to(torch.uint8)
            return dataclasses.replace(mask, tree=tree)
        if mask.start.device.type == "cpu":  # no graph to keep static: attend over the live slots only
            seq = min(seq, int(mask.start.max()) + t)
        mask = mask.dense(t, seq)
    if backend == "matmul":
        return attention_bias(mask, n_kv_heads, group, dtype)
    return mask


@dataclass
class ModelArgs:
    arch: str  # "llama" (the Llama family) or "gpt2"
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    max_positions: int
    act: str = "silu"

    @classmethod
    def from_hf(cls, config) -> "ModelArgs":
        mt = getattr(config, "model_type", None)
        if mt in LLAMA_TYPES:
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls("llama", config.num_hidden_layers, config.hidden_size, heads,
                       getattr(config, "num_key_value_heads", None) or heads, head_dim, config.intermediate_size,
                       config.vocab_size, config.rms_norm_eps,
                       qkv_bias=(mt == "qwen2") or bool(getattr(config, "attention_bias", False)),
                       out_bias=bool(getattr(config, "attention_bias", False)) and mt != "qwen2",
                       mlp_bias=bool(getattr(config, "mlp_bias", False)),
                       max_positions=config.max_position_embeddings, act=config.hidden_act)
        if mt == "gpt2":
            if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
                raise FlashtuneError("GPT-2 attention scaling variants are not supported by the engine; "
                                     "use scale_attn_weights=True and scale_attn_by_inverse_layer_idx=False")
            return cls("gpt2", config.n_layer, config.n_embd, config.n_head, config.n_head,
                       config.n_embd // config.n_head, config.n_inner or 4 * config.n_embd, config.vocab_size,
                       config.layer_norm_epsilon, True, True, True, config.n_positions,
                       act=config.activation_function)
        raise FlashtuneError(f"the decoding engine does not support model_type={mt!r}; "
                             f"supported: {', '.join(LLAMA_TYPES + ('gpt2',))}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # the engine sets it on CUDA: one fused kernel instead of HF's seven

    def forward(self, x):  # same arithmetic as transformers' LlamaRMSNorm (fp32 statistics)
        if self.fused:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _linear(layer: nn.Linear, x, invariant: bool):
    """layer(x), or with `invariant` the batch-invariant GEMM (invariant.linear_fixed) on its weights; either one
    replaced by the split-K GEMV (decoding/gemv.py) where its switches say so (`gemv.ENABLED`: few-row calls
    of the default path; `gemv.INVARIANT`: every call of the invariant mode). Both switches default to off."""
    gemv = sys.modules.get("flashtune.decoding.gemv")  # switched on by importing it and setting a switch
    if gemv is not None and gemv.routes(x, invariant):
        return gemv.gemv(x, layer.weight, layer.bias)
    if not invariant:
        return layer(x)
    from flashtune.decoding.invariant import linear_fixed

    return linear_fixed(x, layer.weight, layer.bias)


def _act(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise FlashtuneError(f"activation {name!r} is not supported by the decoding engine")


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attend(q, k, v, mask, scale: float, backend: str = "sdpa"):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B, T, S] -> [B, Hq, T, D].

    "sdpa": torch SDPA with an explicit mask (the CPU path). "matmul": grouped-query matmuls without
    repeating K/V, the mask given as `attention_bias` (the CUDA path: few kernels, graph-capturable).
    """
    bsz, hq, t, d = q.shape
    hkv = k.shape[1]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                              enable_gqa=hq != hkv)
    # "matmul": mask is the additive bias [B*Hkv, G*T, S] from `attention_bias`; scale is already in q.
    g = hq // hkv
    qg = q.reshape(bsz * hkv, g * t, d)  # query head h uses kv head h // g: [B*Hkv, G*T, D]
    seq = k.shape[2]
    scores = torch.baddbmm(mask, qg, k.reshape(bsz * hkv, seq, d).transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1)  # [B*Hkv, G*T, S]; CUDA accumulates bf16/fp16 rows in fp32
    return torch.bmm(probs, v.reshape(bsz * hkv, seq, d)).view(bsz, hq, t, d)


def attention_bias(mask, n_kv_heads: int, group: int, dtype):
    """bool mask [B, T, S] -> additive bias [B*Hkv, G*T, S] (0 or -inf) for the "matmul" backend."""
    bsz, t, seq = mask.shape
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[:, None, None].expand(bsz, n_kv_heads, group, t, seq).reshape(bsz * n_kv_heads, group * t, seq)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        norm = (lambda: RMSNorm(a.dim, a.norm_eps)) if a.arch == "llama" else (
            lambda: nn.LayerNorm(a.dim, eps=a.norm_eps))
        self.norm1, self.norm2 = norm(), norm()
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.out_bias)
        gated = a.arch == "llama"
        self.w_in = nn.Linear(a.dim, (2 if gated else 1) * a.ffn_dim, bias=a.mlp_bias)  # [gate; up] or c_fc
        self.w_out = nn.Linear(a.ffn_dim, a.dim, bias=a.mlp_bias)
        self.act = _act(a.act)
        self.fusable = a.arch == "llama" and a.act in ("silu", "swish")  # forward_fused applies

    def forward(self, x, rope, cache: KVCache, layer: int, slots, mask, backend, fast: bool = False):
        if backend == "triton" and self.fusable:
            x, delta = self.forward_fused(x, None, rope, cache, layer, slots, mask)
            return x + delta
        a = self.a
        bsz, t, dim = x.shape
        nq, nkv = a.n_heads, a.n_kv_heads
        qkv = self.wqkv(self.norm1(x)).view(bsz, t, nq + 2 * nkv, a.head_dim)  # [B, T, Hq + 2 Hkv, D]
        scale = 1.0 if fast else a.head_dim ** -0.5  # the fast path has the scale folded into W_q
        if backend == "triton":
            y = self._triton_attention(qkv, rope, cache, layer, slots, mask, scale)  # GPT-2: kernels for attention
            return self._mlp(x, y, fast)
        qk = qkv[:, :, : nq + nkv]
        if rope is not None:  # q and k rotated together: [B, T, Hq + Hkv, D]
            cos, sin = rope  # [B, T, 1, D]
            if fast:  # rotate_half(x) = roll(x, D/2) * [-1 .. -1, 1 .. 1]: three kernels instead of five
                qk = torch.addcmul(qk * cos, torch.roll(qk, a.head_dim // 2, dims=-1), sin)
            else:
                qk = qk * cos + _rotate_half(qk) * sin
        q = qk[:, :, :nq].transpose(1, 2)  # [B, Hq, T, D]
        k = qk[:, :, nq:].transpose(1, 2)  # [B, Hkv, T, D]
        v = qkv[:, :, nq + nkv:].transpose(1, 2)
        cache.write(layer, slots, k, v)
        kc, vc = cache.view(layer, bsz, mask.shape[-1])
        y = attend(q, kc, vc, mask, scale, backend)  # [B, Hq, T, D]
        y = y.transpose(1, 2).reshape(bsz * t, nq * a.head_dim)
        return self._mlp(x, y, fast)

    def forward_fused(self, x, delta, rope, cache: KVCache, layer: int, slots, mask, invariant: bool = False):
        """Llama-family block on the Triton path, the residual stream carried as x + delta (delta: the last
        sub-layer's output, not yet added; None at the first block): each add is fused into the norm that
        follows it (kernels.add_rms_norm). Returns (x, delta) for the next block or the final norm. Nine launches
        per layer: add+norm, qkv, rotary+cache, attention, o, add+norm, gate/up, SwiGLU, down. `invariant`: the
        four matmuls through invariant.linear_fixed (each row's result independent of the row count)."""
        from flashtune.decoding.kernels import add_rms_norm, silu_mul

        lin = lambda m, v: _linear(m, v, invariant)  # noqa: E731

        a = self.a
        bsz, t, dim = x.shape
        if delta is None:
            h = self.norm1(x)
        else:
            x, h = add_rms_norm(x.view(bsz * t, dim), delta.view(bsz * t, dim), self.norm1.weight, self.norm1.eps)
        qkv = lin(self.wqkv, h).view(bsz, t, a.n_heads + 2 * a.n_kv_heads, a.head_dim)
        y = self._triton_attention(qkv, rope, cache, layer, slots, mask, 1.0)  # scale folded into W_q
        x, h = add_rms_norm(x.reshape(bsz * t, dim), lin(self.wo, y), self.norm2.weight, self.norm2.eps)
        delta = lin(self.w_out, silu_mul(lin(self.w_in, h)))
        return x.view(bsz, t, dim), delta.view(bsz, t, dim)

    def _triton_attention(self, qkv, rope, cache: KVCache, layer: int, slots, mask, scale):
        """kernels.py: rotary + cache write in one launch, then attention over the live slots -> [B*T, Hq*D]."""
        from flashtune.decoding.invariant import slot_attention_logical
        from flashtune.decoding.kernels import rope_cache, slot_attention

        a = self.a
        bsz, t = qkv.shape[:2]
        cos, sin = rope if rope is not None else (None, None)
        kc, vc = cache.k[layer], cache.v[layer]
        q = rope_cache(qkv, cos, sin, slots, kc, vc, a.n_heads, a.n_kv_heads)  # [B, T, Hq, D]
        if isinstance(mask, SlotMask) and mask.ancestors is not None:
            y = slot_attention_logical(q, kc, vc, mask.start, mask.ancestors, mask.depth, mask.lo, scale)
        elif isinstance(mask, SlotMask):
            y = slot_attention(q, kc, vc, mask.start, mask.tree, mask.lo, scale, gap=mask.gap, stride=mask.stride)
        else:
            raise FlashtuneError("the Triton attention path takes a SlotMask, not a dense mask; use attention='sdpa'")
        return y.reshape(bsz * t, a.n_heads * a.head_dim)

    def _mlp(self, x, y, fast: bool):
        """x [B, T, d] the block's input, y [B*T, Hq*D] the attention output -> the block's output."""
        a = self.a
        bsz, t, dim = x.shape
        if fast and self.wo.bias is None:  # residual add fused into the matmul
            x = torch.addmm(x.reshape(bsz * t, dim), y, self.wo.weight.t()).view(bsz, t, dim)
        else:
            x = x + self.wo(y).view(bsz, t, dim)
        h = self.w_in(self.norm2(x))
        if a.arch == "llama":
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if fast and self.w_out.bias is None:
            return torch.addmm(x.reshape(bsz * t, dim), h.reshape(bsz * t, -1), self.w_out.weight.t()).view(bsz, t, dim)
        return x + self.w_out(h)


def rope_values(positions, inv_freq, scaling: float, dtype, signed: bool):
    """positions [...] -> (cos, sin) [..., D] in `dtype` from fp32 angles, as transformers computes them;
    `signed`: sin carries rotate_half's signs (-sin on the first half), the form the fused kernels read."""
    freqs = positions[..., None].float() * inv_freq.float()  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    if signed:
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos, sin


class DecoderModel(nn.Module):
    """The backbone + LM head. Build with `DecoderModel.from_hf(hf_model_or_config, state_dict)`."""

    def __init__(self, a: ModelArgs, tie: bool):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.wpe = nn.Embedding(a.max_positions, a.dim) if a.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps) if a.arch == "llama" else nn.LayerNorm(a.dim, eps=a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", torch.ones(max(1, a.head_dim // 2)), persistent=False)
        self.rope_scaling = 1.0
        self.backend = "sdpa"
        self.fast = False
        self._rope_table = None

    def enable_fast(self) -> None:
        """CUDA decoding: fold the attention scale into W_q, fused RMSNorm, residual adds fused into addmm.
        (Off on the CPU, where the arithmetic follows transformers' exactly.)"""
        if self.fast:
            return
        a = self.args
        rows = a.n_heads * a.head_dim
        with torch.no_grad():
            for layer in self.layers:
                layer.wqkv.weight[:rows] *= a.head_dim ** -0.5
                if layer.wqkv.bias is not None:
                    layer.wqkv.bias[:rows] *= a.head_dim ** -0.5
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = True
        self.fast = True
        self._rope_table = None  # the fast path's sin carries signs: rebuild with build_rope_table

    def rope(self, positions, dtype):
        """positions [B, T] -> (cos, sin) [B, T, 1, D] in `dtype` (fp32 angles, as transformers computes).
        With a table from `build_rope_table`, two gathers; on the fast path sin carries rotate_half's signs."""
        if self.args.arch != "llama":
            return None
        if self._rope_table is not None and self._rope_table[0].dtype == dtype:
            cos_t, sin_t = self._rope_table
            return cos_t[positions][:, :, None], sin_t[positions][:, :, None]
        return self._rope_values(positions, dtype)

    def _rope_values(self, positions, dtype):
        cos, sin = rope_values(positions, self.inv_freq, self.rope_scaling, dtype, signed=self.fast)
        return cos[:, :, None], sin[:, :, None]

    def build_rope_table(self, max_positions: int, dtype) -> None:
        """Precompute cos/sin for positions [0, max_positions) (same values as computing them per step)."""
        self._rope_table = None
        if self.args.arch != "llama":
            return
        pos = torch.arange(max_positions, device=self.inv_freq.device)[None]
        cos, sin = self._rope_values(pos, dtype)
        self._rope_table = (cos[0, :, 0], sin[0, :, 0])

    def forward(self, tokens, positions, cache: KVCache, slots, mask, invariant: bool = False, trunk=False):
        """Final hidden states [B, T, d] (after the final norm); with `trunk`, also the input of the last layer
        (parallel heads draft from it): (hidden, z); with `trunk` a tuple of layer ids, z is the concatenation
        of the inputs of those layers, [B, T, len(ids) * d] (EAGLE-3 drafts from three). invariant (Triton path, Llama family): batch-invariant
        matmuls (invariant.linear_fixed); pair it with a position-order SlotMask (`ancestors`) for the whole pass
        to be invariant."""
        x = self.embed(tokens)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = self.rope(positions, x.dtype)
        a = self.args
        mask = prepare_mask(mask, self.backend, tokens.shape[1], cache.max_seq, a.n_kv_heads,
                            a.n_heads // a.n_kv_heads, x.dtype)
        # the layers whose inputs z holds: none, the last (trunk=True) or the given ids
        ids = () if not trunk else (a.n_layers - 1,) if trunk is True else tuple(trunk)
        if self.backend == "triton" and self.layers[0].fusable:
            from flashtune.decoding.kernels import add_rms_norm

            delta, taps = None, {}
            for i, layer in enumerate(self.layers):
                if i in ids:
                    taps[i] = x if delta is None else x + delta
                x, delta = layer.forward_fused(x, delta, rope, cache, i, slots, mask, invariant)
            bsz, t, dim = x.shape
            out = add_rms_norm(x.view(bsz * t, dim), delta.view(bsz * t, dim), self.norm.weight,
                               self.norm.eps)[1].view(bsz, t, dim)
            return (out, _taps(taps, ids)) if trunk else out
        taps = {}
        for i, layer in enumerate(self.layers):
            if i in ids:
                taps[i] = x
            x = layer(x, rope, cache, i, slots, mask, self.backend, self.fast)
        return (self.norm(x), _taps(taps, ids)) if trunk else self.norm(x)

    def logits(self, hidden, invariant: bool = False):
        """The LM head; `invariant`: through invariant.linear_fixed (see `forward`)."""
        return _linear(self.lm_head, hidden, invariant)

    @classmethod
    def from_hf(cls, hf_model, state_dict=None, device=None, dtype=None) -> "DecoderModel":
        """Copy a Hugging Face causal LM's weights (or `state_dict`, HF names, e.g. LoRA-merged) into a new model."""
        config = hf_model.config
        a = ModelArgs.from_hf(config)
        sd = dict(hf_model.state_dict() if state_dict is None else state_dict)
        tie = bool(getattr(config, "tie_word_embeddings", a.arch == "gpt2"))
        dtype = dtype or next(hf_model.parameters()).dtype
        with torch.device("meta"):
            m = cls(a, tie)
        new = _convert(a, sd)
        if tie:
            new.pop("lm_head.weight", None)
        missing = set(n for n, _ in m.named_parameters()) - set(new)
        if missing:
            raise FlashtuneError(f"weights missing for the engine's model: {sorted(missing)[:4]}...; "
                                 "is this a base causal LM of a supported type?")
        m.load_state_dict({k: v.to(dtype) for k, v in new.items()}, strict=False, assign=True)
        if tie:
            m.lm_head.weight = m.embed.weight
        if a.arch == "llama":
            rot = hf_model.model.rotary_emb
            m.inv_freq = rot.inv_freq.detach().clone().float()
            m.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        else:
            m.inv_freq = torch.ones(1)
        return m.to(device).eval()


def _convert(a: ModelArgs, sd: dict) -> dict:
    """Hugging Face parameter names -> this module's (q/k/v and gate/up fused, GPT-2 Conv1D transposed)."""
    out = {}
    if a.arch == "llama":
        pre = "model."
        out["embed.weight"] = sd[pre + "embed_tokens.weight"]
        out["norm.weight"] = sd[pre + "norm.weight"]
        if "lm_head.weight" in sd:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(a.n_layers):
            p, q = f"{pre}layers.{i}.", f"layers.{i}."
            at = p + "self_attn."
            out[q + "wqkv.weight"] = torch.cat([sd[at + n + "_proj.weight"] for n in "qkv"], 0)
            if a.qkv_bias:
                out[q + "wqkv.bias"] = torch.cat([sd[at + n + "_proj.bias"] for n in "qkv"], 0)
            out[q + "wo.weight"] = sd[at + "o_proj.weight"]
            if a.out_bias:
                out[q + "wo.bias"] = sd[at + "o_proj.bias"]
            out[q + "w_in.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], 0)
            out[q + "w_out.weight"] = sd[p + "mlp.down_proj.weight"]
            if a.mlp_bias:
                out[q + "w_in.bias"] = torch.cat([sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]], 0)
                out[q + "w_out.bias"] = sd[p + "mlp.down_proj.bias"]
            out[q + "norm1.weight"] = sd[p + "input_layernorm.weight"]
            out[q + "norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        return out
    pre = "transformer."
    out["embed.weight"] = sd[pre + "wte.weight"]
    out["wpe.weight"] = sd[pre + "wpe.weight"]
    out["norm.weight"], out["norm.bias"] = sd[pre + "ln_f.weight"], sd[pre + "ln_f.bias"]
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(a.n_layers):
        p, q = f"{pre}h.{i}.", f"layers.{i}."
        for src, dst in (("attn.c_attn", "wqkv"), ("attn.c_proj", "wo"), ("mlp.c_fc", "w_in"), ("mlp.c_proj", "w_out")):
            out[q + dst + ".weight"] = sd[p + src + ".weight"].t().contiguous()  # Conv1D stores [in, out]
            out[q + dst + ".bias"] = sd[p + src + ".bias"]
        out[q + "norm1.weight"], out[q + "norm1.bias"] = sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]
        out[q + "norm2.weight"], out[q + "norm2.bias"] = sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]
    return out


def _taps(taps: dict, ids: tuple):
    """The inputs of layers `ids` (taps: layer id -> [B, T, d]): one tensor, or their concatenation in the order
    of `ids` -> [B, T, len(ids) * d]."""
    return taps[ids[0]] if len(ids) == 1 else torch.cat([taps[i] for i in ids], dim=-1)


def hf_state_and_prefix(hf_model):
    """(state_dict with HF base names, prefix K/V or None) of a model that may carry flashtune tuners.

    LoRA is merged by `flashtune.tuners.merged_state_dict`; an active prefix adapter's keys/values come from
    `flashtune.tuners.prefix_key_values` (the base weights are then used as they are). A plain model gives its
    own state dict and no prefix. Bottleneck adapters cannot be merged: that raises a FlashtuneError.
    """
    try:
        from flashtune.tuners.base import get_state
    except ImportError:  # tuners not installed: a plain model
        return hf_model.state_dict(), None
    if get_state(hf_model) is None:
        return hf_model.state_dict(), None
    from flashtune import tuners
    from flashtune.tuners.base import hf_path

    prefix = tuners.prefix_key_values(hf_model)
    if prefix is None:
        return tuners.merged_state_dict(hf_model), None
    skip = {"lora_A", "lora_B", "copies", "adapter_down", "adapter_up"}
    state = {hf_path(k): v for k, v in hf_model.state_dict().items()
             if k.split(".")[0] != "flashtune_prefix" and not skip.intersection(k.split("."))}
    return state, prefix
