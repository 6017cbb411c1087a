"""A decoding peer in the style of gpt-fast: a plain PyTorch Llama with a static KV cache whose one-token step
is compiled with `torch.compile(mode="reduce-overhead", fullgraph=True)` (Inductor kernels inside CUDA graphs).

Built from a Hugging Face `LlamaForCausalLM` (its weight tensors are shared, not copied, except q/k/v, which
are concatenated into one projection as gpt-fast does). Greedy only:

    peer = GPTFastLlama.from_hf(model, max_batch=8, max_len=256)
    step = compile_step()                       # or decode_one_token itself: eager
    out = generate(peer, ids, 128, step)        # ids [B, P] -> [B, P + 128]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def _rms(x, weight, eps):
    """Hugging Face's LlamaRMSNorm, rounding included: float32 statistics, weight applied in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x, cos, sin):
    """RoPE in Hugging Face's half-split layout. x [B, H, T, D], cos/sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, layer, n_head, n_kv, head_dim, eps):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.n_head, self.n_kv, self.head_dim, self.eps = n_head, n_kv, head_dim, eps
        self.wqkv = _frozen(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))  # [(H+2K)·D, C]
        self.wo = _frozen(a.o_proj.weight)
        self.w1, self.w3, self.w2 = (_frozen(m.gate_proj.weight), _frozen(m.up_proj.weight),
                                     _frozen(m.down_proj.weight))
        self.attn_norm = _frozen(layer.input_layernorm.weight)
        self.ffn_norm = _frozen(layer.post_attention_layernorm.weight)
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def setup_cache(self, batch, max_len):
        shape = (batch, self.n_kv, max_len, self.head_dim)  # [B, K, L, D]
        kw = dict(dtype=self.wo.dtype, device=self.wo.device)
        self.register_buffer("k_cache", torch.zeros(shape, **kw), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, **kw), persistent=False)

    def forward(self, x, cos, sin, mask, input_pos):
        b, t, _ = x.shape  # [B, T, C]
        d, hq, hk = self.head_dim, self.n_head, self.n_kv
        q, k, v = F.linear(_rms(x, self.attn_norm, self.eps), self.wqkv).split([hq * d, hk * d, hk * d], dim=-1)
        q = _rotate(q.view(b, t, hq, d).transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = _rotate(k.view(b, t, hk, d).transpose(1, 2), cos, sin)  # [B, K, T, D]
        self.k_cache[:, :, input_pos] = k  # static cache: written in place at the step's positions
        self.v_cache[:, :, input_pos] = v.view(b, t, hk, d).transpose(1, 2)
        keys = self.k_cache.repeat_interleave(hq // hk, dim=1)  # [B, H, L, D]: GQA, each KV head repeated
        vals = self.v_cache.repeat_interleave(hq // hk, dim=1)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)  # [B, H, T, D]; mask [1, 1, T, L]
        x = x + F.linear(o.transpose(1, 2).reshape(b, t, hq * d), self.wo)
        h = _rms(x, self.ffn_norm, self.eps)
        return x + F.linear(F.silu(F.linear(h, self.w1)) * F.linear(h, self.w3), self.w2)


class GPTFastLlama(nn.Module):
    @classmethod
    def from_hf(cls, model, max_batch: int, max_len: int) -> "GPTFastLlama":
        return cls(model).setup_caches(max_batch, max_len)

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False) or cfg.hidden_act != "silu":
            raise ValueError("the gpt-fast peer covers bias-free SiLU Llamas only")
        rot = model.model.rotary_emb
        if rot.rope_type not in ("default", "linear", "llama3", "yarn"):  # position-independent inv_freq only
            raise ValueError(f"rope type {rot.rope_type!r} is not covered by the gpt-fast peer")
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed = _frozen(model.model.embed_tokens.weight)
        self.lm_head = _frozen(model.lm_head.weight)  # the same tensor as `embed` when the embeddings are tied
        self.norm = _frozen(model.model.norm.weight)
        self.eps = cfg.rms_norm_eps
        self.layers = nn.ModuleList(Block(layer, cfg.num_attention_heads, cfg.num_key_value_heads, self.head_dim,
                                          cfg.rms_norm_eps) for layer in model.model.layers)
        self.inv_freq, self.rope_scale = rot.inv_freq.float(), rot.attention_scaling

    def setup_caches(self, batch: int, max_len: int) -> "GPTFastLlama":
        dev, dtype = self.embed.device, self.embed.dtype
        for layer in self.layers:
            layer.setup_cache(batch, max_len)
        freqs = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), self.inv_freq.to(dev))
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, D], float32 as in HF, then rounded to the model's dtype
        self.register_buffer("cos", (emb.cos() * self.rope_scale).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * self.rope_scale).to(dtype), persistent=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=dev)),
                             persistent=False)
        self.max_batch, self.max_len = batch, max_len
        return self

    def forward(self, ids, input_pos):
        """ids [B, T] at positions input_pos [T] -> logits [B, T, V]; the caches hold positions < input_pos."""
        mask = self.causal_mask[None, None, input_pos]  # [1, 1, T, L]: slots past the position stay hidden
        cos, sin = self.cos[input_pos], self.sin[input_pos]  # [T, D]
        x = F.embedding(ids, self.embed)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return F.linear(_rms(x, self.norm, self.eps), self.lm_head)


def prefill(model, ids, input_pos):
    """The prompt in one pass. Returns (next tokens [B, 1], last logits [B, V])."""
    logits = model(ids, input_pos)[:, -1]
    return logits.argmax(-1, keepdim=True), logits


def decode_one_token(model, cur, input_pos):
    """One step: cur [B, 1] at input_pos [1]. Returns (next tokens [B, 1], logits [B, V])."""
    logits = model(cur, input_pos)[:, -1]
    return logits.argmax(-1, keepdim=True), logits


def compile_step(backend: str = "inductor"):
    """gpt-fast's recipe: the step compiled whole into CUDA graphs. One static graph per cache shape."""
    mode = "reduce-overhead" if backend == "inductor" else None
    return torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False, backend=backend)


@torch.no_grad()
def generate(model, ids, new_tokens: int, step=decode_one_token, return_logits: bool = False):
    """Greedy: ids [B, P] -> [B, P + new_tokens] (no stop tokens); with return_logits also the new_tokens
    logits [B, V] that chose them."""
    b, p = ids.shape
    if b != model.max_batch or p + new_tokens > model.max_len:
        raise ValueError(f"caches are set up for batch {model.max_batch}, {model.max_len} positions")
    tok, logits = prefill(model, ids, torch.arange(p, device=ids.device))
    out, seen = [tok], [logits]
    input_pos = torch.tensor([p], device=ids.device)
    for _ in range(new_tokens - 1):
        torch.compiler.cudagraph_mark_step_begin()
        with sdpa_kernel(SDPBackend.MATH):  # as gpt-fast: the math form of attention, which Inductor fuses
            tok, logits = step(model, tok, input_pos)
        tok = tok.clone()  # the graph's output buffer is overwritten by the next replay
        out.append(tok)
        if return_logits:
            seen.append(logits.clone())
        input_pos += 1
    tokens = torch.cat([ids, *out], dim=1)
    return (tokens, seen) if return_logits else tokens
