"""Multi-token prediction (MTP) modules in the style of DeepSeek-V3, trained on a base model and used as drafts.

Paper: "DeepSeek-V3 Technical Report", DeepSeek-AI, arXiv 2412.19437, §2.2 (Multi-Token Prediction).

Module k (k = 1..D) at trunk position i reads the previous depth's hidden state h^{k-1}_i (h^0 = the base
model's final hidden state, after its final norm) and the embedding of the token t_{i+k}:

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      2d -> d, no bias
    h^k_i  = block_k(h'^k_{<=i})                                     one causal decoder layer of the base's type
    P^k    = softmax(lm_head(shared_head.norm(h^k_i)))               predicts t_{i+k+1}

The concatenation order [embedding; hidden] is the one of DeepSeek-V3's released weights (its paper writes
the reverse). Emb and lm_head are the base model's own tensors (bound, never copied or saved). The block is
an instance of the base model's own Hugging Face decoder-layer class (LlamaDecoderLayer, Qwen2DecoderLayer,
GPT2Block, ...), so any model family whose layers transformers implements works. RoPE positions are the trunk
indices i.

Files: `mtp_config.json` + `mtp.safetensors`, tensors named as DeepSeek-V3 names its MTP layer,
`model.layers.{N + k - 1}.{enorm,hnorm,eh_proj,shared_head.norm,self_attn...,mlp...}.weight` with N the base
model's number of layers; `load_state_dict_deepseek` reads that layout (the shared `embed_tokens` and
`shared_head.head` tensors, if present, are skipped: the base's are used).

Loss (SPEC §2.2): L^k is the cross-entropy of P^k_i against t_{i+k+1}; L_MTP = (λ/D)·Σ_k L^k, added to the
main LM loss when the trunk is trained too. λ follows a step schedule in training tokens (0.3, then 0.1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.drafters.base import (IGNORE_INDEX, BaseDims, BoundToBase, DraftConfig, HeadsLoss, WithHeads, base_dims,
                                              decoder_layers, final_norm, last_param, new_block,
                                              read_heads, rms_norm, rotary, run_block, sequence_mask,
                                              trunk, write_heads)
from flashtune.errors import FlashtuneError, check_choice, check_range

CONFIG_NAME = "mtp_config.json"
WEIGHTS_NAME = "mtp.safetensors"


@dataclass
class MTPConfig(BaseDims, DraftConfig):
    """MTP modules. depth: D modules in sequence. λ is `lambda_initial` for the first `lambda_switch_tokens`
    training tokens (None: always), then `lambda_final` (DeepSeek-V3: 0.3 for 10T tokens, then 0.1).
    recycle: which output of a module feeds the next one ("pre_norm" as DeepSeek-V3 trains and vLLM drafts,
    "post_norm" as SGLang drafts). init: the block starts as a copy of the base's last layer or at random.
    The remaining fields describe the base model and are filled in by `MTPModules.build`."""

    METHOD = "mtp"

    depth: int = 1
    lambda_initial: float = 0.3
    lambda_final: float = 0.1
    lambda_switch_tokens: int | None = None
    recycle: str = "pre_norm"
    init: str = "last_layer"

    def __post_init__(self):
        check_range("depth", self.depth, 1, 16, integer=True)
        check_range("lambda_initial", self.lambda_initial, 0.0)
        check_range("lambda_final", self.lambda_final, 0.0)
        if self.lambda_switch_tokens is not None:
            check_range("lambda_switch_tokens", self.lambda_switch_tokens, 0, integer=True)
        check_choice("recycle", self.recycle, ("pre_norm", "post_norm"))
        check_choice("init", self.init, ("last_layer", "random"))

    def lam(self, tokens_seen: int) -> float:
        """λ after `tokens_seen` training tokens."""
        if self.lambda_switch_tokens is not None and tokens_seen >= self.lambda_switch_tokens:
            return self.lambda_final
        return self.lambda_initial


class SharedHead(nn.Module):
    """DeepSeek-V3's `shared_head`: its own final norm; the output projection is the base's lm_head."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm


class MTPLayer(nn.Module):
    """One MTP module: enorm, hnorm, eh_proj, a decoder block and shared_head.norm (names as DeepSeek-V3)."""

    def __init__(self, model, index: int, init: str):
        super().__init__()
        d = base_dims(model)["hidden_size"]
        p = last_param(decoder_layers(model)[-1])
        self.enorm = rms_norm(model, d)
        self.hnorm = rms_norm(model, d)
        self.eh_proj = nn.Linear(2 * d, d, bias=False, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            # [embedding half | hidden half]: the hidden half starts as the identity so that a new module
            # begins as "the base's last layer applied again", the embedding half small and random.
            self.eh_proj.weight.normal_(0.0, 0.02)
            self.eh_proj.weight[:, d:].copy_(torch.eye(d, dtype=p.dtype, device=p.device))
        self.block = new_block(model, index, init)
        self.shared_head = SharedHead(copy.deepcopy(final_norm(model)))
        for q in self.shared_head.parameters():
            q.requires_grad_(True)

    def forward(self, h: torch.Tensor, e: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rope,
                cache=None) -> torch.Tensor:
        """h [B, q, d] previous depth's hidden, e [B, q, d] embeddings of the tokens one ahead -> [B, q, d]
        (the block's output, before shared_head.norm)."""
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))  # [B, q, 2d] -> [B, q, d]
        return run_block(self.block, x, positions, mask, rope, cache)


class MTPModules(BoundToBase, nn.Module):
    """D MTP modules bound to a base causal LM (its embedding, lm_head and rotary tables are shared).

    Build new ones with `MTPModules.build(model, depth=...)`, or load with `MTPModules.load(dir, model)`.
    """

    def __init__(self, config: MTPConfig, model, fresh: bool = False):
        super().__init__()
        self.config = config
        # fresh: new layers of the base's class rather than copies (for loading, and for a base whose last
        # layer already carries LoRA wrappers)
        init = "random" if fresh else config.init
        self.layers = nn.ModuleList(MTPLayer(model, m, init) for m in range(config.depth))
        self.bind(model)

    @classmethod
    def build(cls, model, depth: int = 1, **kwargs) -> "MTPModules":
        """New modules for `model` (build them before attaching LoRA to it: the block copies its last layer)."""
        return cls(MTPConfig(depth=depth, **kwargs, **base_dims(model)), model)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def logits(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """Module m's output [B, q, d] -> logits [B, q, V]."""
        normed = self.layers[m].shared_head.norm(out)
        return self.lm_head(normed.to(self.lm_head.weight.dtype))

    def recycled(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """What module m passes on to the next depth."""
        return self.layers[m].shared_head.norm(out) if self.config.recycle == "post_norm" else out

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Teacher-forced pass over whole sequences.

        hidden [B, T, d]: the base's final hidden states; input_ids [B, T]; attention_mask [B, T] (1 = token).
        Returns a list of D tensors [B, T, d]: entry k-1 at position i is module k's output h^k_i, which
        predicts token i+k+1 (positions i > T-k-2 have no target and only see padding ahead).
        """
        B, T = input_ids.shape
        positions, mask = sequence_mask(B, T, attention_mask, hidden.dtype, input_ids.device)
        rope = rotary(self.base)
        dtype = self.layers[0].eh_proj.weight.dtype  # the modules may train in fp32 on a bf16 base
        outs, h = [], hidden.to(dtype)
        mask = mask.to(dtype)
        for m, layer in enumerate(self.layers):
            k = m + 1
            ahead = F.pad(input_ids[:, k:], (0, k), value=0)  # [B, T]: token i+k at position i
            out = layer(h, self.embed_tokens(ahead).to(dtype), positions, mask, rope)
            outs.append(out)
            h = self.recycled(m, out)
        return outs

    # ---- training interface (drafters/base.py: HeadsLoss, offset_accuracy) --------------------------
    def features(self, model, input_ids, attention_mask=None):
        hidden = trunk(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, hidden

    def offsets(self, feats, input_ids, attention_mask=None):
        return self(feats, input_ids, attention_mask)

    # ---- files ---------------------------------------------------------------------------------------
    def deepseek_state_dict(self) -> dict[str, torch.Tensor]:
        """Own tensors under DeepSeek-V3 names: model.layers.{N+m}.<name>, the block's names unprefixed."""
        out = {}
        first = self.config.num_base_layers
        for m, layer in enumerate(self.layers):
            for name, t in layer.state_dict().items():
                name = name[len("block."):] if name.startswith("block.") else name
                out[f"model.layers.{first + m}.{name}"] = t
        return out

    def load_state_dict_deepseek(self, tensors: dict[str, torch.Tensor], first_layer: int | None = None) -> None:
        """Load tensors named as DeepSeek-V3's MTP layers (layer index `first_layer` + m for module m; by
        default the smallest layer index that holds an `eh_proj`). eh_proj's input is [enorm(emb); hnorm(h)]."""
        if first_layer is None:
            found = sorted(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.") and ".eh_proj." in k)
            if not found:
                raise FlashtuneError("no `model.layers.N.eh_proj.weight` tensor found; these are not MTP weights")
            first_layer = found[0]
        for m, layer in enumerate(self.layers):
            prefix = f"model.layers.{first_layer + m}."
            own = layer.state_dict()
            state = {}
            for name in own:
                file_name = prefix + (name[len("block."):] if name.startswith("block.") else name)
                if file_name not in tensors:
                    raise FlashtuneError(f"MTP weights miss {file_name}; the file is for another model or depth")
                if tensors[file_name].shape != own[name].shape:
                    raise FlashtuneError(f"{file_name} has shape {tuple(tensors[file_name].shape)}, expected "
                                         f"{tuple(own[name].shape)}; the weights are for another base model")
                state[name] = tensors[file_name]
            layer.load_state_dict(state)

    def save(self, directory) -> Path:
        """Write mtp_config.json + mtp.safetensors (DeepSeek-V3 tensor names) into `directory`, atomically."""
        return write_heads(directory, self.deepseek_state_dict(), self.config, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def load(cls, directory, model) -> "MTPModules":
        """Modules saved by `save`, bound to `model` (which must be the base they were trained on)."""
        config, tensors = read_heads(directory, MTPConfig, "MTP modules", CONFIG_NAME, WEIGHTS_NAME, model)
        mtp = cls(config, model, fresh=True)
        mtp.load_state_dict_deepseek(tensors, first_layer=config.num_base_layers)
        return mtp


# ----------------------------------------------------------------------------------------------------------
# Training: the base and the modules in one nn.Module (so `fit` finds every trainable parameter), and the loss.

class WithMTP(WithHeads):
    """The base model plus its MTP modules, for a training loop. Trainable parameters: the MTP modules, and
    whatever of the base requires grad (LoRA after `attach`, for joint training)."""

    def __init__(self, model, mtp: MTPModules):
        super().__init__(model, mtp)

    @property
    def mtp(self) -> MTPModules:
        return self.heads


class MTPLoss(HeadsLoss):
    """`loss_fn(wrapper, batch)`: L = [L_main if the base trains] + (λ/D)·Σ_k L^k.

    batch: `input_ids` [B, T], optional `attention_mask` [B, T], optional `labels` [B, T] (-100 = ignored;
    default: input_ids with padding ignored). λ comes from the config's schedule over the tokens this loss
    has seen (`tokens_seen`, counted from non-ignored labels; set it when resuming). `last` keeps the most
    recent parts (main, per-depth, λ) for logging.
    """

    name = "mtp"

    def __init__(self, config: MTPConfig, tokens_seen: int = 0):
        super().__init__()
        self.config = config
        self.tokens_seen = tokens_seen

    def weights(self, n, wrapper, labels):
        lam = self.config.lam(self.tokens_seen)
        if wrapper.training:
            self.tokens_seen += int((labels != IGNORE_INDEX).sum())
        self._lam = lam
        return [lam / self.config.depth] * n

    def __call__(self, wrapper, batch):
        loss = super().__call__(wrapper, batch)
        self.last["lambda"] = self._lam
        return loss
