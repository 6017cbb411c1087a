"""Parallel multi-token heads on a shared trunk, used as self-speculative drafts.

Paper: Gloeckle et al., "Better & Faster Large Language Models via Multi-token Prediction", arXiv 2404.19737.

The trunk is the base model without its last decoder layer; it produces z_t (the input of the last layer).
Head i (i = 1..n) is one decoder layer on z, and all heads share the unembedding f_u (the base's final norm and
lm_head): P(x_{t+i} | x_{<=t}) = softmax(f_u(f_{h_i}(z_t))). Head 1 *is* the base's own last layer, so the
base model stays exactly the next-token model; heads 2..n are new layers of the base's own class (copies of
its last layer at init) that predict t+i. Unlike DeepSeek's MTP modules, a head never sees the tokens between
t and t+i, so all drafts of a step come from one trunk position (blockwise parallel decoding).

Loss: Σ_i CE_i with equal weights; head 1's term is the main LM loss, included only when the trunk trains.
The paper's memory trick (one head's forward and backward at a time, accumulating ∂L/∂z) is not applied: the
heads here are few and the trunk small; the logits of one head at a time are the peak either way.

Files: `parallel_config.json` + `parallel_heads.safetensors`, tensors `heads.{i-2}.<decoder-layer names>`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.mtp import (IGNORE_INDEX, base_dims, causal_mask, check_base, decoder_layers, final_norm,
                                    new_block, read_heads, rotary, run_block, trunk, write_heads)
from flashtune.errors import ConfigError, FlashtuneError, check_choice, check_range

CONFIG_NAME = "parallel_config.json"
WEIGHTS_NAME = "parallel_heads.safetensors"


@dataclass
class ParallelHeadsConfig:
    """n_heads: heads in all, head 1 being the base's own last layer (so n_heads - 1 drafts per step).
    init: new heads start as copies of the base's last layer ("last_layer") or at random. The remaining fields
    describe the base model and are filled in by `ParallelHeads.build`."""

    n_heads: int = 4
    init: str = "last_layer"
    model_type: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    num_base_layers: int = 0

    def __post_init__(self):
        check_range("n_heads", self.n_heads, 2, 16, integer=True)
        check_choice("init", self.init, ("last_layer", "random"))

    def to_dict(self) -> dict:
        return {"method": "parallel", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ParallelHeadsConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"method"}
        if unknown:
            raise ConfigError(f"unknown parallel-heads config field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


class ParallelHeads(nn.Module):
    """Heads 2..n (head 1 is the base's last layer), bound to the base's final norm, lm_head and rotary."""

    def __init__(self, config: ParallelHeadsConfig, model, fresh: bool = False):
        super().__init__()
        self.config = config
        init = "random" if fresh else config.init  # fresh: for loading (weights replaced anyway)
        self.heads = nn.ModuleList(new_block(model, m, init) for m in range(config.n_heads - 1))
        self.bind(model)

    @classmethod
    def build(cls, model, n_heads: int = 4, **kwargs) -> "ParallelHeads":
        return cls(ParallelHeadsConfig(n_heads=n_heads, **kwargs, **base_dims(model)), model)

    def bind(self, model) -> None:
        check_base(asdict(self.config), model)
        if len(decoder_layers(model)) < 2:
            raise FlashtuneError("parallel heads need a base model with at least 2 decoder layers")
        self.__dict__["_base"] = model

    @property
    def base(self):
        return self.__dict__["_base"]

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def logits(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """Head m+2's output [B, q, d] -> logits [B, q, V] through the shared unembedding (final norm + head)."""
        norm = final_norm(self.base)
        return self.lm_head(norm(out.to(norm.weight.dtype)).to(self.lm_head.weight.dtype))

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """z [B, T, d]: trunk states (input of the base's last layer). Returns n-1 tensors [B, T, d]; entry m at
        position t predicts token t+m+2."""
        B, T, _ = z.shape
        positions = torch.arange(T, device=z.device).expand(B, T)
        valid = attention_mask.bool() if attention_mask is not None else None
        mask = causal_mask(positions, positions, valid, z.dtype)
        mask = mask.masked_fill(torch.eye(T, dtype=torch.bool, device=mask.device), 0.0)
        rope = rotary(self.base)
        dtype = next(self.heads[0].parameters()).dtype  # the heads may train in fp32 on a bf16 base
        z, mask = z.to(dtype), mask.to(dtype)
        return [run_block(head, z, positions, mask, rope) for head in self.heads]

    def head_losses(self, outs: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """CE of head i = m+2 against labels shifted by i (-100 ignored)."""
        losses = []
        T = labels.shape[1]
        for m, out in enumerate(outs):
            shift = m + 2
            if T <= shift:
                raise FlashtuneError(f"sequences of {T} tokens are too short for {self.config.n_heads} heads")
            logits = self.logits(m, out[:, : T - shift]).float()  # [B, T-i, V]
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, shift:].reshape(-1),
                                          ignore_index=IGNORE_INDEX))
        return losses

    def save(self, directory) -> Path:
        return write_heads(directory, self.state_dict(), self.config, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def load(cls, directory, model) -> "ParallelHeads":
        config, state = read_heads(directory, ParallelHeadsConfig, model, "parallel heads", "parallel",
                                   CONFIG_NAME, WEIGHTS_NAME)
        heads = cls(config, model, fresh=True)
        missing = set(heads.state_dict()) - set(state)
        if missing:
            raise FlashtuneError(f"{Path(directory) / WEIGHTS_NAME} misses {sorted(missing)[0]}; the file is "
                                 f"damaged or for another base model")
        heads.load_state_dict(state)
        return heads


class WithParallelHeads(nn.Module):
    """The base model plus its parallel heads, for `flashtune.training.fit`."""

    def __init__(self, model, heads: ParallelHeads):
        super().__init__()
        self.model = model
        self.heads = heads

    def base_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())


class ParallelHeadsLoss:
    """`loss_fn(wrapper, batch)` for `fit`: Σ_{i>=2} CE_i, plus CE_1 (the base's own LM loss) when the trunk
    trains. batch as for `MTPLoss`. `last` keeps the parts for logging."""

    def __init__(self):
        self.last: dict = {}

    def __call__(self, wrapper: WithParallelHeads, batch: dict) -> torch.Tensor:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        joint = wrapper.base_trainable() and wrapper.training
        with torch.set_grad_enabled(joint and torch.is_grad_enabled()):
            out = trunk(wrapper.model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        z = out.hidden_states[-2]  # [B, T, d]: the input of the last decoder layer
        if not joint:
            z = z.detach()
        losses = wrapper.heads.head_losses(wrapper.heads(z, attention_mask), labels)
        loss = torch.stack(losses).sum()
        main = None
        if joint:
            logits = wrapper.model.get_output_embeddings()(out.last_hidden_state[:, :-1]).float()
            main = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            loss = loss + main
        self.last = {"main": None if main is None else float(main.detach()),
                     **{f"head_{m + 2}": float(x.detach()) for m, x in enumerate(losses)}}
        return loss
