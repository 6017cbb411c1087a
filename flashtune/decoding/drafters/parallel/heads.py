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

Drafting: parallel/drafter.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flashtune.decoding.drafters.base import (BaseDims, BoundToBase, DraftConfig, HeadsLoss, WithHeads, base_dims, check_state,
                                              decoder_layers, final_norm, new_block, read_heads,
                                              rotary, run_block, sequence_mask, trunk, write_heads)
from flashtune.errors import FlashtuneError, check_choice, check_range

CONFIG_NAME = "parallel_config.json"
WEIGHTS_NAME = "parallel_heads.safetensors"


@dataclass
class ParallelHeadsConfig(BaseDims, DraftConfig):
    """n_heads: heads in all, head 1 being the base's own last layer (so n_heads - 1 drafts per step).
    init: new heads start as copies of the base's last layer ("last_layer") or at random. The remaining fields
    describe the base model and are filled in by `ParallelHeads.build`."""

    METHOD = "parallel"

    n_heads: int = 4
    init: str = "last_layer"

    def __post_init__(self):
        check_range("n_heads", self.n_heads, 2, 16, integer=True)
        check_choice("init", self.init, ("last_layer", "random"))


class ParallelHeads(BoundToBase, nn.Module):
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
        if len(decoder_layers(model)) < 2:
            raise FlashtuneError("parallel heads need a base model with at least 2 decoder layers")
        super().bind(model)

    def logits(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """Head m+2's output [B, q, d] -> logits [B, q, V] through the shared unembedding (final norm + head)."""
        norm = final_norm(self.base)
        return self.lm_head(norm(out.to(norm.weight.dtype)).to(self.lm_head.weight.dtype))

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """z [B, T, d]: trunk states (input of the base's last layer). Returns n-1 tensors [B, T, d]; entry m at
        position t predicts token t+m+2."""
        B, T, _ = z.shape
        positions, mask = sequence_mask(B, T, attention_mask, z.dtype, z.device)
        rope = rotary(self.base)
        dtype = next(self.heads[0].parameters()).dtype  # the heads may train in fp32 on a bf16 base
        z, mask = z.to(dtype), mask.to(dtype)
        return [run_block(head, z, positions, mask, rope) for head in self.heads]

    # ---- training interface (drafters/base.py: HeadsLoss, offset_accuracy) --------------------------
    def features(self, model, input_ids, attention_mask=None):
        """(the base's final hidden state, z = the input of its last decoder layer), both [B, T, d]."""
        out = trunk(model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[-2]

    def offsets(self, feats, input_ids, attention_mask=None):
        return self(feats, attention_mask)

    def save(self, directory) -> Path:
        return write_heads(directory, self.state_dict(), self.config, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def load(cls, directory, model) -> "ParallelHeads":
        config, state = read_heads(directory, ParallelHeadsConfig, "parallel heads", CONFIG_NAME, WEIGHTS_NAME,
                                   model)
        heads = cls(config, model, fresh=True)
        check_state(heads, state, Path(directory) / WEIGHTS_NAME)
        heads.load_state_dict(state)
        return heads


class WithParallelHeads(WithHeads):
    """The base model plus its parallel heads, for a training loop."""


class ParallelHeadsLoss(HeadsLoss):
    """`loss_fn(wrapper, batch)`: Σ_{i>=2} CE_i, plus CE_1 (the base's own LM loss) when the trunk trains.
    batch as for `MTPLoss`. `last` keeps the parts for logging (head_2, head_3, ...)."""

    key_offset = 2
