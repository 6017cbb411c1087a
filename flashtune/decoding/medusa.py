"""Medusa heads: extra decoding heads on the backbone's last hidden state that propose the tokens after next.

Paper: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
(arXiv 2401.10774). Head k (1-based) reads h_t (after the final norm, what lm_head reads) and predicts token
t+k+1:  head_k(h) = W_k · ResBlock_n(...ResBlock_1(h)),  ResBlock(x) = x + SiLU(A x + b).
A and b start at zero and W_k as a copy of lm_head, so a new head equals the LM head exactly; every block is
its own module (no `[ResBlock] * n` weight sharing).

`MedusaHeads` is also a drafter for `Engine` (stateless): from the hidden state that produced the root token
it takes each head's top-k and fills the candidate tree. Files: `save(dir)` / `MedusaHeads.load(dir)`
(medusa_heads.safetensors + medusa_config.json), and `export(dir, layout)` for the Medusa reference code
(`medusa_lm_head.safetensors` + `config.json`) or vLLM (`model.safetensors` + `config.json`, model_type medusa).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flashtune.decoding.tree import default_tree, tree_buffers
from flashtune.errors import ConfigError, FlashtuneError, check_range
from flashtune.fileio import atomic_write

CONFIG_NAME = "medusa_config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"


@dataclass
class MedusaConfig:
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
        for p in self.tree:
            if len(p) > self.num_heads:
                raise ConfigError(f"tree path {p} is deeper than num_heads={self.num_heads}; shorten it")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedusaConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown Medusa config fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)  # upstream leaves the bias at PyTorch's default; zero it too

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


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

    # ------------------------------------------------------------ drafter interface (see engine.py)
    def start(self, engine, hidden, tokens, lengths, root) -> None:
        pass

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

    # ------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """Write medusa_heads.safetensors + medusa_config.json atomically into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(self.config.to_dict(), indent=2)))
        return d

    @classmethod
    def load(cls, directory, device=None, dtype=None) -> "MedusaHeads":
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise FlashtuneError(f"{d} has no Medusa heads ({CONFIG_NAME} + {WEIGHTS_NAME}); "
                                 "train them with `flashtune train-heads --method medusa`")
        cfg = MedusaConfig.from_dict(json.loads((d / CONFIG_NAME).read_text()))
        heads = cls(cfg)
        state = load_file(str(d / WEIGHTS_NAME))
        missing, unexpected = heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FlashtuneError(f"{d / WEIGHTS_NAME} does not match its config (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); re-export the heads")
        heads = heads.to(device=device, dtype=dtype)
        heads.set_tree(cfg.tree or None)
        return heads.eval()

    def export(self, directory, layout: str = "medusa") -> Path:
        """Write the heads for other engines.

        layout="medusa": FasterDecoding/Medusa's `medusa_lm_head.safetensors` (keys `{head}.{block}.linear.weight`,
        `.bias`, and `{head}.{num_layers}.weight` for the output layer: an nn.Sequential per head) + config.json
        with medusa_num_heads, medusa_num_layers, base_model_name_or_path.
        layout="vllm": vLLM's Medusa draft model: `model.safetensors` with `blocks.{head}.layers.{block}.weight`,
        `.bias` and `lm_heads.{head}.weight`, config.json with model_type "medusa", num_heads, num_hidden_layers,
        hidden_size, vocab_size, truncated_vocab_size and medusa_fc_bias=true (our blocks have a bias).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        c = self.config
        t = {}
        for i, head in enumerate(self.heads):
            for j, blk in enumerate(head.blocks):
                key = f"{i}.{j}.linear" if layout == "medusa" else f"blocks.{i}.layers.{j}"
                t[f"{key}.weight"] = blk.linear.weight
                t[f"{key}.bias"] = blk.linear.bias
            t[f"{i}.{c.num_layers}.weight" if layout == "medusa" else f"lm_heads.{i}.weight"] = head.out.weight
        t = {k: v.detach().contiguous().cpu() for k, v in t.items()}
        if layout == "medusa":
            name = "medusa_lm_head.safetensors"
            cfg = {"medusa_num_heads": c.num_heads, "medusa_num_layers": c.num_layers,
                   "base_model_name_or_path": c.base_model, "hidden_size": c.hidden_size,
                   "vocab_size": c.vocab_size}
        elif layout == "vllm":
            name = "model.safetensors"
            cfg = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": c.hidden_size,
                   "vocab_size": c.vocab_size, "truncated_vocab_size": c.vocab_size, "num_heads": c.num_heads,
                   "num_hidden_layers": c.num_layers, "medusa_fc_bias": True, "max_paths": 64, "topk": c.topk}
        else:
            raise ConfigError(f"layout={layout!r} is not allowed; choose one of 'medusa', 'vllm'")
        atomic_write(d / name, lambda p: save_file(t, p, metadata={"format": "pt"}))
        atomic_write(d / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        return d

