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

Drafting (`ParallelDrafter`): at each step heads 2..n read z at the last committed position t (their own KV
caches hold every earlier position) and propose the chain x_{t+2} .. x_{t+n} after the root x_{t+1}, which the
engine verifies in one pass; the heads then catch up on the accepted positions' z. Greedy output is
token-identical to plain greedy decoding (the engine's lossless rules).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.cache import KVCache
from flashtune.decoding.model import SlotMask, prepare_mask
from flashtune.decoding.mtp import (IGNORE_INDEX, _compact_block, base_dims, causal_mask, check_base, decoder_layers,
                                    final_norm, new_block, read_heads, rotary, run_block, trunk, write_heads)
from flashtune.decoding.tree import chain_paths, tree_buffers
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


class ParallelDrafter:
    """The engine's drafter for `ParallelHeads` (blockwise parallel decoding, Stern et al., arXiv 1811.03115, with
    the heads of Gloeckle et al.): n - 1 chained drafts a step, all from one trunk state.

    The engine hands it z, the input of its last decoder layer (`trunk = True`). The heads run as the engine's
    own compact blocks with one static KV cache (a layer per head, slot = position). After each verification
    they are caught up on the accepted positions' z, and their outputs at the last one are kept (`_pending`)
    for the next proposal: a step costs the heads one pass over the accepted tokens and n - 1 LM-head rows.
    All state lives in preallocated tensors updated in place, so greedy steps are captured whole in the
    engine's CUDA graph (`stateless` = graph-safe, as for the MTP drafter).
    """

    stateless = True
    trunk = True

    def __init__(self, heads: ParallelHeads):
        self.heads = heads
        self.k = heads.config.n_heads - 1
        if self.k < 1:
            raise ConfigError("parallel heads with n_heads=1 draft nothing; train n_heads >= 2")
        self.tree = tree_buffers(chain_paths(self.k))
        self._engine = None
        self.first = 0

    def _setup(self, engine) -> None:
        a = engine.model.args
        dev, dt = engine.device, engine.dtype
        self.blocks = [_compact_block(h, engine) for h in self.heads.heads]
        self.cache = KVCache(len(self.blocks), engine.max_batch_size, a.n_kv_heads, engine.max_seq_len, a.head_dim,
                             dt, dev)
        self.L = torch.zeros(engine.max_batch_size, dtype=torch.long, device=dev)  # = the engine's lengths
        self._pending = torch.zeros(engine.max_batch_size, self.k, a.dim, dtype=dt, device=dev)
        self._engine = engine
        self.graph_version = getattr(self, "graph_version", 0) + 1  # graphs of older buffers are stale

    def _run_heads(self, z, slots):
        """Every head on z [B, q, d] at consecutive slots [B, q] (K/V written) -> [B, k, q, d]."""
        model = self._engine.model
        a = model.args
        rope = model.rope(slots, z.dtype)
        mask = prepare_mask(SlotMask(slots[:, 0], None, self.first), model.backend, slots.shape[1],
                            self.cache.max_seq, a.n_kv_heads, a.n_heads // a.n_kv_heads, z.dtype)
        return torch.stack([blk(z, rope, self.cache, m, slots, mask, model.backend, model.fast)
                            for m, blk in enumerate(self.blocks)], dim=1)

    def start(self, engine, z, tokens, lengths, root) -> None:
        if self._engine is not engine:
            self._setup(engine)
        self.first = engine.cache.prefix_len
        bsz, t = tokens.shape
        if bsz > self.L.shape[0]:
            raise ConfigError(f"batch of {bsz} exceeds the engine's max_batch_size={self.L.shape[0]}")
        engine.graphed(("parallel-start", id(self), self.graph_version, bsz, t, self.first), self._start, z,
                       lengths)

    def _start(self, z, lengths):
        bsz, t = z.shape[:2]
        self.L[:bsz].copy_(lengths + self.first)
        slots = self.first + torch.arange(t, device=z.device)[None].expand(bsz, t)
        out = self._run_heads(z.to(self._engine.dtype), slots)  # [B, k, T, d]
        self._pending[:bsz].copy_(out[torch.arange(bsz, device=z.device), :, lengths - 1])

    def propose(self, z_last, root):
        """root [B] -> (tree tokens [B, 1 + k]: the root, then head i's argmax at the last committed position)."""
        bsz = root.shape[0]
        model = self._engine.model
        drafts = torch.argmax(model.lm_head(model.norm(self._pending[:bsz])), dim=-1)  # [B, k]
        return torch.cat([root[:, None], drafts], dim=1), None

    def accept(self, z, tree_tokens, acc, path) -> None:
        """Catch the heads up on positions L .. L + a (the chain's accepted nodes; later slots are rewritten
        before anything reads them) and keep their outputs at L + a."""
        bsz, d1 = path.shape
        L = self.L[:bsz]
        h = z.gather(1, path[..., None].expand(-1, -1, z.shape[-1])).to(self._engine.dtype)  # [B, D+1, d]
        slots = L[:, None] + torch.arange(d1, device=path.device)[None]
        out = self._run_heads(h, slots)  # [B, k, D+1, d]
        self._pending[:bsz].copy_(out[torch.arange(bsz, device=path.device), :, acc.accepted])
        # finished rows keep stepping: clamped so every slot they touch stays below the cache's end
        L.copy_((L + acc.accepted + 1).clamp(max=self._engine.max_seq_len - self.k - 1))
