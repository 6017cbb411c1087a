"""The EAGLE-3 draft model: one decoder layer that drafts from three of the target's hidden states.

Paper: "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test", Li et al.,
arXiv 2503.01840 (2025).

At target position i the draft reads g_i = [h^low_i; h^mid_i; h^high_i], the inputs of three target layers
(default: layers 2, L//2 and L-3 of an L-layer target, as vLLM and SGLang choose), and the token t_{i+1}:

    x_i   = fc(g_i)                                   [B, T, 3H] -> [B, T, H], no bias
    a_i   = [input_layernorm(Emb(t_{i+1})); hidden_norm(x_i)]               [B, T, 2H]
    y_i   = x_i + o_proj(attn(q/k/v_proj(a_i)))       attention over earlier positions (causal, RoPE at i)
    out_i = y_i + mlp(post_attention_layernorm(y_i))  the layer's output, H wide
    P_i   = softmax(lm_head(norm(out_i)))             over the draft vocabulary, predicts t_{i+2}

For the next draft step the layer's own out_i replaces fc(g_i) (the target's features are unknown there) and
the token is the one just drafted; training feeds those outputs back the same way (recipes/eagle.py: training-time
test). Emb is the target's embedding (bound, not saved). The LM head covers a reduced draft vocabulary (the
most frequent target tokens of the training data); draft token j is target token j + d2t[j], and t2d marks the
target tokens that have a draft id. Tensor names are the ones of the `LlamaForCausalLMEagle3` checkpoints that
vLLM and SGLang load (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`); export.py writes their configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.drafters.base import DraftConfig, check_state, read_heads, write_heads
from flashtune.errors import ConfigError, FlashtuneError, check_range

CONFIG_NAME = "eagle3_config.json"
WEIGHTS_NAME = "eagle3.safetensors"


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The three target layers whose inputs the draft reads: (2, L//2, L-3) as vLLM and SGLang default to
    (clamped into [0, L-1] for the tiny test models)."""
    if num_layers < 1:
        raise ConfigError("the target model has no decoder layers")
    return tuple(min(max(i, 0), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3))


@dataclass
class Eagle3Config(DraftConfig):
    """The draft layer's shape (the target's attention/MLP sizes) and the target it reads.

    aux_layers: ids of the three target layers whose *inputs* are concatenated (vLLM's
    `eagle_aux_hidden_state_layer_ids` convention; SGLang counts them one lower, see export.py)."""

    METHOD = "eagle3"  # the serving-layout registry's name for it (drafters/export.py)

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layers: list[int] = field(default_factory=list)
    num_target_layers: int = 0
    model_type: str = "llama"
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "draft_vocab_size"):
            check_range(name, getattr(self, name), 1, integer=True)
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"draft_vocab_size={self.draft_vocab_size} exceeds the target's vocab_size="
                              f"{self.vocab_size}; lower it")
        self.aux_layers = [int(i) for i in self.aux_layers]
        if len(self.aux_layers) != 3:
            raise ConfigError(f"aux_layers={self.aux_layers} must name 3 target layers (low, middle, high)")
        if self.num_target_layers and not all(0 <= i < self.num_target_layers for i in self.aux_layers):
            raise ConfigError(f"aux_layers={self.aux_layers} must lie in [0, {self.num_target_layers - 1}]")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def for_target(cls, model, draft_vocab_size: int, aux_layers=None) -> "Eagle3Config":
        """The config of a draft for the Hugging Face causal LM `model` (Llama family)."""
        c = model.config
        if c.model_type not in ("llama", "mistral", "qwen2"):
            raise FlashtuneError(f"EAGLE-3 drafts here are built for Llama-family targets; model_type="
                                 f"{c.model_type!r} is not supported (use llama, mistral or qwen2)")
        heads = c.num_attention_heads
        n = c.num_hidden_layers
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        return cls(c.hidden_size, c.intermediate_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, c.rms_norm_eps, c.vocab_size,
                   min(draft_vocab_size, c.vocab_size),
                   list(aux_layers) if aux_layers is not None else list(default_aux_layers(n)), n, c.model_type,
                   c.hidden_act, float(theta), c.max_position_embeddings)


class RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics (transformers' LlamaRMSNorm arithmetic)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x, cos, sin):
    """RoPE on x [B, h, q, D] with cos/sin [B, 1, q, D] (rotate_half convention of transformers' Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """q/k/v read the 2H-wide [embedding; hidden] input; o_proj writes H (EAGLE-3's midlayer attention)."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, a, cos, sin):
        """a [B, q, 2H] -> q [B, Hq, q, D], k and v [B, Hkv, q, D], q and k rotated."""
        c = self.c
        bsz, t, _ = a.shape
        q = self.q_proj(a).view(bsz, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(a).view(bsz, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(bsz, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """EAGLE-3's decoder layer: Llama's, with a second input norm (`hidden_norm`) and a 2H-wide attention input."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def project(self, emb, x, cos, sin):
        """emb, x [B, q, H] -> (q, k, v) of the attention (see Attention.qkv)."""
        a = torch.cat([self.input_layernorm(emb), self.hidden_norm(x)], dim=-1)  # [B, q, 2H]
        return self.self_attn.qkv(a, cos, sin)

    def finish(self, x, attn):
        """x [B, q, H] the residual, attn [B, Hq, q, D] the attention output -> the layer's output [B, q, H]."""
        bsz, _, t, _ = attn.shape
        y = x + self.self_attn.o_proj(attn.transpose(1, 2).reshape(bsz, t, -1))
        return y + self.mlp(self.post_attention_layernorm(y))


class Eagle3Draft(nn.Module):
    """fc + midlayer + norm + lm_head (+ d2t / t2d), bound to a target's embedding and rotary frequencies.

    Build with `Eagle3Draft.build(model, draft_ids)` (draft_ids: the target ids of the draft vocabulary), load
    with `Eagle3Draft.load(dir, model)`."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(3 * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.rope_scaling = 1.0

    @classmethod
    def build(cls, model, draft_ids, aux_layers=None, seed: int | None = None) -> "Eagle3Draft":
        """A new draft for `model` whose draft vocabulary is the target ids `draft_ids` (any order, no repeats)."""
        ids = torch.as_tensor(list(draft_ids), dtype=torch.long)
        config = Eagle3Config.for_target(model, len(ids), aux_layers)
        if seed is not None:
            torch.manual_seed(seed)
        draft = cls(config)
        draft.set_vocab(ids)
        p = next(model.parameters())
        draft.to(p.device)
        draft.bind(model)
        return draft

    def set_vocab(self, draft_ids: torch.Tensor) -> None:
        """d2t and t2d from the draft vocabulary's target ids (sorted ascending, as the served layouts expect)."""
        ids = torch.sort(torch.as_tensor(draft_ids, dtype=torch.long).cpu()).values
        c = self.config
        if ids.numel() != c.draft_vocab_size or len(torch.unique(ids)) != ids.numel():
            raise FlashtuneError(f"the draft vocabulary needs {c.draft_vocab_size} distinct target ids")
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise FlashtuneError(f"draft vocabulary ids must lie in [0, {c.vocab_size - 1}]")
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_ids(self) -> torch.Tensor:
        """The target id of every draft token, long [Vd]."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def bind(self, model) -> None:
        """Share the target's embedding and rotary frequencies (never copied, never saved)."""
        c, mc = self.config, model.config
        want = {"hidden_size": mc.hidden_size, "vocab_size": mc.vocab_size,
                "num_target_layers": mc.num_hidden_layers}
        for key, value in want.items():
            if getattr(c, key) not in (0, value):
                raise FlashtuneError(f"the EAGLE-3 draft was built for {key}={getattr(c, key)} but the target has "
                                     f"{value}; load it with the target it was trained on")
        self.__dict__["_target"] = model
        rot = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rot is not None:
            self.inv_freq = rot.inv_freq.detach().float().to(self.inv_freq.device).clone()
            self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))

    @property
    def target(self):
        return self.__dict__["_target"]

    def embed(self, tokens):
        return self.target.get_input_embeddings()(tokens)

    def rope(self, positions, dtype):
        """positions long [B, q] -> (cos, sin) [B, 1, q, D]."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [B, q, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return ((emb.cos() * self.rope_scaling).to(dtype)[:, None], (emb.sin() * self.rope_scaling).to(dtype)[:, None])

    def logits(self, out):
        """The layer's output [..., H] -> draft-vocabulary logits [..., Vd]."""
        return self.lm_head(self.norm(out))

    # ---- training: the whole sequence, K unrolled steps (training-time test) ------------------------------
    def unrolled(self, feats, input_ids, steps: int, attention_mask=None):
        """Teacher-forced training pass with the training-time test.

        feats [B, T, 3H] (the target's concatenated aux states), input_ids [B, T]. Step 0 at anchor i reads
        (fc(g_i), t_{i+1}) at position i; step j >= 1 reads (its own step j-1 output at i, t_{i+j+1}) at
        position i + j. A step-j query at anchor i attends to the step-0 keys of anchors <= i (the committed
        context of drafting) and to the step-1..j keys of anchor i itself (its own earlier drafts): the
        visibility a node at depth j + 1 of a draft tree has. Returns `steps` logits [B, T, Vd]; step j's at
        anchor i predict t_{i+j+2}.
        """
        bsz, t, _ = feats.shape
        c = self.config
        dtype = self.fc.weight.dtype
        layer = self.midlayer
        pos = torch.arange(t, device=feats.device)[None].expand(bsz, t)
        valid = torch.ones(bsz, t, dtype=torch.bool, device=feats.device) if attention_mask is None else \
            attention_mask.bool()
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=feats.device))[None] & valid[:, None, :]
        causal = causal | torch.eye(t, dtype=torch.bool, device=feats.device)[None]  # no empty rows
        scale = 1.0 / math.sqrt(c.head_dim)
        group = c.num_attention_heads // c.num_key_value_heads
        x = self.fc(feats.to(dtype))
        k0 = v0 = None
        diag_k, diag_v = [], []
        outs = []
        for j in range(steps):
            ahead = F.pad(input_ids[:, j + 1:], (0, j + 1), value=0)  # t_{i+j+1} at anchor i
            cos, sin = self.rope(pos + j, dtype)
            q, k, v = layer.project(self.embed(ahead).to(dtype), x, cos, sin)  # [B, h, T, D]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            if j == 0:
                k0, v0 = k, v
            else:
                diag_k.append(k)
                diag_v.append(v)
            s0 = torch.matmul(q, k0.transpose(-1, -2)).float() * scale  # [B, h, T, T]
            s0 = s0.masked_fill(~causal[:, None], float("-inf"))
            sd = [(q * kk).sum(-1, keepdim=True).float() * scale for kk in diag_k]  # each [B, h, T, 1]
            p = torch.softmax(torch.cat([s0] + sd, dim=-1), dim=-1).to(dtype)
            attn = torch.matmul(p[..., :t], v0)
            for s, vv in enumerate(diag_v):
                attn = attn + p[..., t + s: t + s + 1] * vv
            x = layer.finish(x, attn)
            outs.append(self.logits(x))
        return outs

    # ---- files -------------------------------------------------------------------------------------------
    def served_state_dict(self) -> dict[str, torch.Tensor]:
        """fc / midlayer.* / norm / lm_head / d2t / t2d, the tensor names of LlamaForCausalLMEagle3."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save(self, directory) -> Path:
        return write_heads(directory, self.served_state_dict(), self.config, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def load(cls, directory, model) -> "Eagle3Draft":
        config, tensors = read_heads(directory, Eagle3Config, "EAGLE-3 draft", CONFIG_NAME, WEIGHTS_NAME, model)
        return cls.from_tensors(config, tensors, model, Path(directory) / WEIGHTS_NAME)

    @classmethod
    def from_tensors(cls, config: Eagle3Config, tensors: dict, model, source="EAGLE-3 weights") -> "Eagle3Draft":
        """The draft from its tensors (bound to `model`). A target embedding (`embed_tokens.weight`, which some
        trainers save beside the draft) is ignored: the draft shares the target's. Otherwise the names and shapes
        must be exactly the draft's (`check_state`: one line naming what is missing or foreign)."""
        draft = cls(config)
        own = draft.state_dict()
        check_state(draft, {k: v for k, v in tensors.items() if k != "embed_tokens.weight"}, source)
        draft.load_state_dict({k: tensors[k] for k in own})
        p = next(model.parameters())
        draft.to(device=p.device)
        draft.bind(model)
        return draft.eval()
