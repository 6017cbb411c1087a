"""Parallel heads as the engine's drafter: blockwise parallel decoding (Stern et al., arXiv 1811.03115) with the
heads of Gloeckle et al. (arXiv 2404.19737).

At each step heads 2..n read z at the last committed position t (their own KV caches hold every earlier
position) and propose the chain x_{t+2} .. x_{t+n} after the root x_{t+1}, which the engine verifies in one
pass; the heads then catch up on the accepted positions' z. Greedy output is token-identical to plain greedy
decoding (the engine's lossless rules).
"""

from __future__ import annotations

import torch

from flashtune.decoding.cache import KVCache
from flashtune.decoding.drafters.base import CatchUpState, check_engine, compact_block
from flashtune.decoding.drafters.parallel.heads import ParallelHeads
from flashtune.decoding.model import SlotMask, prepare_mask
from flashtune.decoding.tree import chain_paths, tree_buffers
from flashtune.errors import ConfigError


class ParallelDrafter(CatchUpState):
    """The engine's drafter for `ParallelHeads` (blockwise parallel decoding, Stern et al., arXiv 1811.03115, with
    the heads of Gloeckle et al.): n - 1 chained drafts a step, all from one trunk state.

    The engine hands it z, the input of its last decoder layer (`trunk = True`). The heads run as the engine's
    own compact blocks with one static KV cache (a layer per head, slot = position). After each verification
    they are caught up on the accepted positions' z, and their outputs at the last one are kept (`_pending`)
    for the next proposal: a step costs the heads one pass over the accepted tokens and n - 1 LM-head rows.
    All state lives in preallocated tensors updated in place, so greedy steps are captured whole in the
    engine's CUDA graph (`stateless` = graph-safe, as for the MTP drafter).
    """

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
        self.blocks = [compact_block(h, engine) for h in self.heads.heads]
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
        check_engine(self.heads.config.to_dict(), engine, "these parallel heads")
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
