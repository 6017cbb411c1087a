"""Medusa heads: extra decoding heads on the backbone's last hidden state that propose the tokens after next.

Paper: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
(arXiv 2401.10774). Head k (1-based) reads h_t (after the final norm, what lm_head reads) and predicts token
t+k+1:  head_k(h) = W_k · ResBlock_n(...ResBlock_1(h)),  ResBlock(x) = x + SiLU(A x + b).
A and b start at zero and W_k as a copy of lm_head, so a new head equals the LM head exactly; every block is
its own module (no `[ResBlock] * n` weight sharing).

`MedusaHeads` is also a drafter for `Engine` (stateless): from the hidden state that produced the root token
it takes each head's top-k and fills the candidate tree. Files: `save(dir)` / `MedusaHeads.load(dir)`
(medusa_heads.safetensors + medusa_config.json); serving layouts in drafters/export.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.drafters.base import (DraftConfig, check_engine, check_state, read_heads, trunk,
                                              write_heads)
from flashtune.decoding.tree import default_tree, tree_buffers
from flashtune.errors import ConfigError, check_range

CONFIG_NAME = "medusa_config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"


@dataclass
class MedusaConfig(DraftConfig):
    METHOD = "medusa"

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    topk: int = 10
    tree: list = field(default_factory=list)  # index paths; empty = mc_sim_7b_63 cut to num_heads
    base_model: str = ""

    def __post_init__(self):
        check_range("hidden_size", self.hidden_size, 1, integer=True)
        check_range("vocab_size", self.vocab_size, 1, integer=True)
        check_range("num_heads", self.num_heads, 1, 16, integer=True)
        check_range("num_layers", self.num_layers, 0, 8, integer=True)
        check_range("topk", self.topk, 1, integer=True)
        if not isinstance(self.tree, list) or not all(isinstance(p, list) for p in self.tree):
            raise ConfigError("tree must be a list of index paths like [[0], [0, 0], [1]]")
        for p in self.tree:
            if len(p) > self.num_heads:
                raise ConfigError(f"tree path {p} is deeper than num_heads={self.num_heads}; shorten it")


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)  # upstream leaves the bias at PyTorch's default; zero it too

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, dim: int, vocab: int, num_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(dim) for _ in range(num_layers))  # distinct blocks
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, h):
        for blk in self.blocks:
            h = blk(h)
        return self.out(h)


class MedusaHeads(nn.Module):
    """K Medusa heads. forward(hidden [..., d]) -> logits [..., K, V]."""

    stateless = True

    def __init__(self, config: MedusaConfig):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(MedusaHead(config.hidden_size, config.vocab_size, config.num_layers)
                                   for _ in range(config.num_heads))
        self.set_tree(config.tree or None)

    @classmethod
    def for_model(cls, lm_head_weight: torch.Tensor, num_heads: int = 4, num_layers: int = 1, **kw) -> "MedusaHeads":
        """New heads for a model whose LM head weight is [V, d]; each output layer starts as its copy."""
        vocab, dim = lm_head_weight.shape
        heads = cls(MedusaConfig(dim, vocab, num_heads, num_layers, **kw))
        with torch.no_grad():
            for h in heads.heads:
                h.out.weight.copy_(lm_head_weight.detach().float())
        return heads.to(lm_head_weight.device)

    def set_tree(self, paths=None) -> None:
        """Use the given index paths (None: the default tree cut to this many heads and topk)."""
        if paths:
            self.tree = tree_buffers(paths, topk=self.config.topk)
            if self.tree.max_depth > self.config.num_heads:
                raise ConfigError(f"the tree is {self.tree.max_depth} deep but there are only "
                                  f"{self.config.num_heads} heads")
            self.config.tree = [list(p) for p in self.tree.paths]
        else:
            self.tree = default_tree(self.config.num_heads, self.config.topk)
            self.config.tree = []
        dev = next(self.parameters()).device if len(list(self.parameters())) else "cpu"
        self.tree = self.tree.to(dev)

    def forward(self, hidden):
        return torch.stack([h(hidden) for h in self.heads], dim=-2)

    # ------------------------------------------------------------ drafter protocol (drafters/base.py)
    def start(self, engine, hidden, tokens, lengths, root) -> None:
        check_engine(self.config.to_dict(), engine, "these Medusa heads")

    def propose(self, hidden, root):
        """hidden [B, d], root [B] -> tree tokens [B, N]: node tokens from [root, head-1 top-k, ...]."""
        logits = self._draft_logits(hidden.to(self.heads[0].out.weight.dtype))  # [B, K, V]
        top = torch.topk(logits, self.tree.topk, dim=-1).indices  # [B, K, topk]
        flat = torch.cat([root[:, None], top.flatten(1)], dim=1)  # [B, 1 + K*topk]
        return flat[:, self.tree.tree_indices], None

    def _draft_logits(self, hidden):
        """`forward` for drafting: with one ResBlock per head, the K blocks run as one [d -> K*d] matmul (weights
        concatenated on every call, so they are never stale), then each head's output layer."""
        if self.config.num_layers != 1:
            return self(hidden)
        lin = [h.blocks[0].linear for h in self.heads]
        bsz, d = hidden.shape
        y = F.linear(hidden, torch.cat([m.weight for m in lin]), torch.cat([m.bias for m in lin]))  # [B, K*d]
        x = hidden[:, None] + F.silu(y.view(bsz, len(lin), d))  # [B, K, d]
        return torch.stack([h.out(x[:, i]) for i, h in enumerate(self.heads)], dim=1)

    def accept(self, hidden, tree_tokens, acc, path) -> None:
        pass

    # ------------------------------------------------------------ training (drafters/base.py: HeadsLoss)
    def features(self, model, input_ids, attention_mask=None):
        """The base's final hidden states [B, T, d] (after the final norm: what lm_head and the heads read)."""
        hidden = trunk(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, hidden

    def offsets(self, feats, input_ids, attention_mask=None):
        return [feats] * len(self.heads)  # every head reads the same state

    def offset_logits(self, m: int, x):
        return self.heads[m](x.to(self.heads[m].out.weight.dtype))

    # ------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """Write medusa_heads.safetensors + medusa_config.json atomically into `directory`."""
        return write_heads(directory, self.state_dict(), self.config, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def load(cls, directory, device=None, dtype=None, model=None) -> "MedusaHeads":
        """Heads saved by `save`; with `model`, checked to fit it (hidden size, vocabulary)."""
        cfg, state = read_heads(directory, MedusaConfig, "Medusa heads", CONFIG_NAME, WEIGHTS_NAME, model)
        heads = cls(cfg)
        check_state(heads, state, Path(directory) / WEIGHTS_NAME)
        heads.load_state_dict(state)
        heads = heads.to(device=device, dtype=dtype)
        heads.set_tree(cfg.tree or None)
        return heads.eval()
