"""The MTP modules as a speculative drafter: `Engine.generate(..., speculative=MTPDrafter(modules, k=3))`.

Paper: "DeepSeek-V3 Technical Report", DeepSeek-AI, arXiv 2412.19437, §2.2-2.3 (MTP modules used for
speculative decoding); drafts verified by the engine's lossless rules (Leviathan et al., arXiv 2211.17192).
"""

from __future__ import annotations

import copy

import torch

from flashtune.decoding.cache import KVCache
from flashtune.decoding.drafters.base import CatchUpState, check_engine, compact_block, engine_norm
from flashtune.decoding.drafters.mtp.modules import MTPModules
from flashtune.decoding.model import RMSNorm, SlotMask, prepare_mask
from flashtune.decoding.tree import tree_buffers
from flashtune.errors import ConfigError, check_range


class MTPDrafter(CatchUpState):
    """Drafts k tokens per step with MTP modules (module j mod D at step j, DeepSeek-V3 §2.3 / vLLM), verified
    by the engine in one forward pass with the lossless rules of verify.py.

    k: drafted tokens per step. tree_width: 1 drafts a chain; c > 1 also offers the top-c candidates of every
    step as siblings of the chain's node (a tree verified by the tree rules; the chain continues from the top-1).
    temperature: None drafts argmax tokens (one-hot q); a number samples drafts from softmax(logits / T) and
    hands that q to speculative sampling (chain only). The draws come from the engine's step noise for the
    call (`engine.noise`, drawn from the generator seeded by the call's `seed`), so every call draws fresh draft
    randomness; a greedy call (no noise) drafts argmax tokens, since only matches with the argmax are accepted.

    The modules keep their own static KV cache (the engine's KVCache class, one layer per module, slot =
    position). After each verification the accepted positions are fed through the modules again ("catch-up"),
    so module 1's cache always holds exactly what training computed: (h^0_i, t_{i+1}) for every committed i.
    The catch-up's last accepted position reads the new root, so module 1's output there is the next step's
    first draft: it is kept (`_pending`) and the next `propose` starts from it instead of running module 1
    again (one module pass per step saved).
    Modules 2..D are caught up on the same positions with the tokens then known (exact where t_{i+m} was
    accepted). All state lives in preallocated tensors updated in place, so a step (propose, verify, accept),
    greedy or sampling, is captured whole in the engine's CUDA graph; `stateless` is therefore True.
    """

    def __init__(self, mtp: MTPModules, k: int = 3, tree_width: int = 1, temperature: float | None = None):
        check_range("k", k, 1, 16, integer=True)
        check_range("tree_width", tree_width, 1, 16, integer=True)
        if temperature is not None:
            check_range("temperature", temperature, 0.0, low_open=True)
            if tree_width > 1:
                raise ConfigError("sampled drafts (temperature) need tree_width=1; trees use argmax candidates")
        self.mtp, self.k, self.width, self.temperature = mtp, k, tree_width, temperature
        paths = [[0] * (j - 1) + [i] for j in range(1, k + 1) for i in range(tree_width)]
        self.tree = tree_buffers(paths, topk=tree_width)  # node 1 + (j-1)*c + i: rank i at depth j
        self._engine = None
        self._noise = None  # the current call's step noise (set by `start`; None when greedy)
        self.trace: list | None = None  # set to [] to record each step's first-draft q/logits and acceptance

    # ---- setup ---------------------------------------------------------------------------------------
    def _setup(self, engine) -> None:
        """Device copies of the modules as engine blocks, and the static cache and counters."""
        dev, dt = engine.device, engine.dtype
        layers = self.mtp.layers
        self.blocks = [compact_block(layer.block, engine) for layer in layers]
        self.enorm = [engine_norm(layer.enorm, engine) for layer in layers]
        self.hnorm = [engine_norm(layer.hnorm, engine) for layer in layers]
        self.eh_proj = [copy.deepcopy(layer.eh_proj).to(dev, dt).eval() for layer in layers]
        self.head_norm = [engine_norm(layer.shared_head.norm, engine) for layer in layers]
        a = engine.model.args
        self.slots = engine.max_seq_len + 2 * (self.k + 2)
        self.cache = KVCache(len(layers), engine.max_batch_size, a.n_kv_heads, self.slots, a.head_dim, dt, dev)
        self.L = torch.zeros(engine.max_batch_size, dtype=torch.long, device=dev)  # = the engine's lengths
        self.first = 0  # slots [0, first) hold a prefix-tuning prefix in the engine; the modules skip them
        # module 1's output at trunk position L - 1 with token t_L (the root): the next first draft's state
        self._pending = torch.zeros(engine.max_batch_size, a.dim, dtype=dt, device=dev)
        self._engine = engine
        self.graph_version = getattr(self, "graph_version", 0) + 1  # graphs of older buffers are stale

    # ---- one pass of all modules over some positions -------------------------------------------------
    def _module(self, m: int, h, tokens, slots, mask):
        """Module m on h [B, q, d] and next tokens [B, q] at cache slots [B, q] -> output [B, q, d]."""
        model = self._engine.model
        e = model.embed(tokens)
        en, hn = self.enorm[m], self.hnorm[m]
        if model.backend == "triton" and isinstance(en, RMSNorm) and isinstance(hn, RMSNorm):
            from flashtune.decoding.kernels import rms_norm_pair

            d = e.shape[-1]
            cat = rms_norm_pair(e.reshape(-1, d), h.reshape(-1, d), en.weight, hn.weight, en.eps, hn.eps)
            cat = cat.view(*e.shape[:-1], 2 * d)
        else:
            cat = torch.cat([en(e), hn(h)], dim=-1)
        x = self.eh_proj[m](cat)  # [B, q, 2d] -> [B, q, d]
        rope = model.rope(slots, x.dtype)
        a = model.args
        mask = prepare_mask(mask, model.backend, slots.shape[1], self.slots, a.n_kv_heads,
                            a.n_heads // a.n_kv_heads, x.dtype)
        return self.blocks[m](x, rope, self.cache, m, slots, mask, model.backend, model.fast)

    def _recycle(self, m: int, out, normed=None):
        """The state module m + 1 reads: module m's output, or its head-normed form (`normed` when the caller
        already has it)."""
        if self.mtp.config.recycle != "post_norm":
            return out
        return self.head_norm[m](out) if normed is None else normed

    def _causal(self, slots):
        """Slots [B, q] (consecutive per row) see the keys from `first` up to their own slot."""
        return SlotMask(slots[:, 0], None, self.first)

    def _catch_up(self, h0, stream, slots):
        """Write every module's K/V at slots [B, q]; module m reads tokens stream[:, m : m + q]. Returns
        module 1's output [B, q, d]."""
        q = slots.shape[1]
        mask = self._causal(slots)
        h, first = h0, None
        for m in range(len(self.blocks)):
            out = self._module(m, h, stream[:, m:m + q], slots, mask)
            first = out if first is None else first
            h = self._recycle(m, out)
        return first

    # ---- the engine's drafter interface (engine.py) --------------------------------------------------
    def start(self, engine, hidden, tokens, lengths, root) -> None:
        """After the prefill: the prompt's positions, (h^0_i, t_{i+1}), go through the modules; at the last
        one t_{i+1} is the root, so module 1's output there is the first step's first draft."""
        check_engine(self.mtp.config.to_dict(), engine, "these MTP modules")
        if self._engine is not engine:
            self._setup(engine)
        self._noise = engine.noise
        bsz, t = tokens.shape
        self.first = engine.cache.prefix_len
        if bsz > self.L.shape[0]:
            raise ConfigError(f"batch of {bsz} exceeds the engine's max_batch_size={self.L.shape[0]}")
        engine.graphed(("mtp-start", id(self), self.graph_version, bsz, t, self.first), self._start, hidden,
                       tokens, lengths, root)

    def _start(self, hidden, tokens, lengths, root):
        bsz, t = tokens.shape
        self.L[:bsz].copy_(lengths + self.first)
        depth = len(self.blocks)
        stream = torch.cat([tokens[:, 1:], tokens.new_zeros(bsz, depth)], dim=1)  # t_{i+1} at i (pad after)
        stream.scatter_(1, (lengths - 1)[:, None], root[:, None])
        slots = self.first + torch.arange(t, device=tokens.device)[None].expand(bsz, t)
        out = self._catch_up(hidden.to(self._engine.dtype), stream, slots)
        ar = torch.arange(bsz, device=tokens.device)
        self._pending[:bsz].copy_(out[ar, lengths - 1])

    def propose(self, hidden, root):
        """hidden [B, d] (the target's state at slot L-1), root [B] (the token at slot L) -> (tree tokens
        [B, 1 + k*c], q [B, k, V] or None)."""
        bsz = root.shape[0]
        depth = len(self.blocks)
        n = self.L[:bsz] - 1  # [B]: the trunk position whose state we hold
        h, tok = hidden.to(self._engine.dtype)[:, None], root
        nodes, qs = [root[:, None]], []
        for j in range(self.k):
            m = j % depth
            slot = (n + j - m)[:, None]  # [B, 1]: module m of cycle j // D sits at trunk position n + j - m
            if j == 0:  # module 1 at position n with the root: computed by the last catch-up (or start)
                out = self._pending[:bsz, None]
            elif depth == 1 or j < depth:  # first cycle (slot = n): the committed slots and its own
                out = self._module(m, h, tok[:, None], slot, self._causal(slot))
            else:  # committed slots [first, n], plus this module's drafts of this step, D slots apart (n + D, ...)
                mask = SlotMask(slot[:, 0], None, self.first, gap=n + 1, stride=depth)
                out = self._module(m, h, tok[:, None], slot, mask)
            normed = self.head_norm[m](out)
            logits = self._engine.model.lm_head(normed)[:, 0]  # [B, V]
            if self.temperature is not None and self._noise is not None:
                q = torch.softmax(logits.float() / self.temperature, dim=-1)
                tok = self._noise.categorical(q)
                qs.append(q)
                nodes.append(tok[:, None])
                if self.trace is not None and j == 0:
                    self.trace.append({"q": q.clone(), "draft": tok.clone()})
            else:
                # [B, c]; argmax for a chain (one reduction instead of a radix top-k's five kernels)
                top = torch.argmax(logits, -1, keepdim=True) if self.width == 1 else torch.topk(
                    logits, self.width, dim=-1).indices
                tok = top[:, 0]
                nodes.append(top)
                if self.trace is not None and j == 0:
                    self.trace.append({"logits": logits.float().clone()})
            h = self._recycle(m, out, normed)
        return torch.cat(nodes, dim=1), (torch.stack(qs, dim=1) if qs else None)

    def accept(self, hidden, tree_tokens, acc, path) -> None:
        """After verification: catch the modules up on slots L..L+a (the accepted positions) and advance L."""
        bsz, d1 = path.shape
        L = self.L[:bsz]
        if self.trace is not None:
            self.trace[-1]["accepted"] = acc.accepted.clone()
        path_tokens = tree_tokens.gather(1, path)  # [B, D+1]: root, then the path's drafts
        stream = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)  # the token after each node
        stream.scatter_(1, acc.accepted[:, None], acc.next[:, None])  # ... valid up to `accepted`
        stream = torch.cat([stream, stream.new_zeros(bsz, len(self.blocks))], dim=1)
        h = hidden.gather(1, path[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, D+1, d]
        slots = L[:, None] + torch.arange(d1, device=path.device)[None]
        out = self._catch_up(h.to(self._engine.dtype), stream, slots)
        self._pending[:bsz].copy_(out[torch.arange(bsz, device=path.device), acc.accepted])
        # Rows the engine has finished stop growing there; here they keep stepping, so they are clamped to keep
        # every slot they touch (up to L + k) below the engine's max_seq_len (its rope table's size). An active
        # row never reaches the clamp: the engine stops it once L + k + 1 > max_seq_len.
        L.copy_((L + acc.accepted + 1).clamp(max=self._engine.max_seq_len - self.k - 1))
