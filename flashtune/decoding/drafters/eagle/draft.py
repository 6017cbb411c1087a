"""Drafting with an EAGLE-3 draft: a chain, or EAGLE-2's dynamic tree, verified by the engine's lossless rules.

Papers: EAGLE-3, Li et al., arXiv 2503.01840 (the draft model); EAGLE-2, Li et al., arXiv 2406.16858 (the
dynamic draft tree: expand the most confident nodes, then keep the nodes of highest path confidence).

The engine hands the drafter the concatenated inputs of the target's three aux layers (`trunk` = their ids,
see engine.py), at the prompt's positions (`start`) and at every verified tree node (`accept`). The draft layer
keeps its own static KV cache, slot = position: slots [first, L) always hold the committed context computed
from the target's own features, exactly as training's step 0 saw it. After a verification the accepted path
(positions L .. L + a) is fed through the layer ("catch-up") with the target's features at those nodes; its
output at the last one (whose token is the new root) gives the next step's first draft (`_pending`).

Chain (`topk=1`): `depth` drafts, each step feeding the layer its own previous output and the token it drafted
(argmax, or drawn from softmax(logits / temperature) with the call's step noise, handed to speculative
sampling as q).

Dynamic tree (`topk=K > 1`), EAGLE-2: level 1 holds the root's top-K children; at each further level the K
frontier nodes run through the layer together (tree attention: context + own ancestors) and each proposes its
top-K children, scored by the path's confidence (product of draft probabilities); the K best of those K*K
become the next frontier. After `depth` levels the `nodes` candidates of highest confidence form the tree
(prefix-closed: a child is never more confident than its parent; ties keep the parent first). The tree's shape
is rewritten in place in the engine's `TreeBuffers` every step (fixed sizes: `nodes` + 1 nodes, one retrieve
row per node), so verification and its CUDA graph stay static. Within a batch all rows share one shape (chosen
by the mean confidence over the rows; at batch 1 this is exactly EAGLE-2), each row with its own tokens.

No host synchronisation on CUDA: a step (propose, verify, accept), greedy or sampling, is captured whole in
the engine's CUDA graph (`stateless` = graph-safe, as for the MTP drafter). On the engine's Triton backend
(the CUDA default) the layer runs through fused.FusedLayer (the engine's kernels, attention over the live
slots only); elsewhere, or with `kernels = False`, through the PyTorch layer with a dense mask over the
static cache.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from flashtune.decoding.drafters.base import CatchUpState
from flashtune.decoding.drafters.eagle.model import Eagle3Draft
from flashtune.decoding.tree import TreeBuffers, chain_paths, tree_buffers
from flashtune.errors import ConfigError, check_range


def tree_structure(parent: torch.Tensor, depth: torch.Tensor, max_depth: int):
    """parent long [N] (root: itself), depth long [N] -> (ancestors [N, D+1] root first, right-padded with the
    node; mask bool [N, N]: node i sees node j iff j is i or an ancestor)."""
    n = parent.shape[0]
    up = [torch.arange(n, device=parent.device)]
    for _ in range(max_depth):
        up.append(parent[up[-1]])
    chain = torch.stack(up, dim=1)  # [N, D+1]: chain[i, s] = the ancestor s levels above i
    k = torch.arange(max_depth + 1, device=parent.device)[None]
    anc = chain.gather(1, (depth[:, None] - k).clamp(min=0))
    anc = torch.where(k <= depth[:, None], anc, chain[:, :1])
    mask = torch.zeros(n, n, dtype=torch.bool, device=parent.device).scatter_(1, anc, True)
    return anc, mask


class Eagle3Drafter(CatchUpState):
    """The engine's drafter for an `Eagle3Draft`.

    depth: draft levels per step (chain length). topk: 1 drafts a chain; K > 1 drafts EAGLE-2's dynamic tree
    with `nodes` draft tokens (default min(8 * depth, K + (depth - 1) * K^2)). temperature (chain only): None
    drafts argmax tokens; a number samples them from softmax(logits / temperature).
    """

    kernels = True  # False: the PyTorch layer even on the Triton backend (the reference the fused path matches)

    def __init__(self, draft: Eagle3Draft, depth: int = 5, topk: int = 1, nodes: int | None = None,
                 temperature: float | None = None):
        check_range("depth", depth, 1, 32, integer=True)
        check_range("topk", topk, 1, 64, integer=True)
        self.draft, self.depth, self.topk, self.temperature = draft, depth, topk, temperature
        self.trunk = tuple(draft.config.aux_layers)
        if temperature is not None:
            check_range("temperature", temperature, 0.0, low_open=True)
            if topk > 1:
                raise ConfigError("sampled drafts (temperature) need topk=1 (a chain); trees use top-k candidates")
        if topk == 1:
            self.nodes = depth
            self.tree = tree_buffers(chain_paths(depth))
        else:
            most = topk + (depth - 1) * topk * topk
            self.nodes = min(8 * depth, most) if nodes is None else nodes
            check_range("nodes", self.nodes, 1, most, integer=True)
            self.tree = self._initial_tree()
        self._engine = None
        self.first = 0

    # ---- the dynamic tree's buffers ----------------------------------------------------------------------
    def _initial_tree(self) -> TreeBuffers:
        """TreeBuffers of the fixed sizes (nodes + 1 nodes, depth D, one retrieve row per node); its shape is
        rewritten every step. Starts as a chain of length D, the other nodes children of the root."""
        n, d = self.nodes + 1, self.depth
        parent = torch.tensor([0] + [i if 1 <= i < d else 0 for i in range(n - 1)])
        depth = torch.zeros(n, dtype=torch.long)
        for i in range(1, n):
            depth[i] = depth[parent[i]] + 1
        anc, mask = tree_structure(parent, depth, d)
        paths = [(0,) * int(depth[i]) + (i,) for i in range(1, n)]  # placeholders: only their count is read
        return TreeBuffers(paths, self.topk, mask, depth, torch.zeros(n, dtype=torch.long), anc.clone(),
                           depth + 1, parent, anc)

    def _set_tree(self, parent, depth) -> None:
        """Rewrite the engine's tree buffers in place (same sizes) for parent / depth long [N]."""
        anc, mask = tree_structure(parent, depth, self.depth)
        t = self.tree
        t.mask.copy_(mask)
        t.depth.copy_(depth)
        t.parent.copy_(parent)
        t.ancestors.copy_(anc)
        t.retrieve.copy_(anc)
        t.valid_len.copy_(depth + 1)

    # ---- setup -------------------------------------------------------------------------------------------
    def _setup(self, engine) -> None:
        dev, dt = engine.device, engine.dtype
        target = self.draft.__dict__.pop("_target")  # bound, not owned: never copied with the draft
        try:
            self.layer = copy.deepcopy(self.draft).to(device=dev, dtype=dt).eval()
        finally:
            self.draft.__dict__["_target"] = target
        self.layer.__dict__["_target"] = target
        self.layer.inv_freq = self.draft.inv_freq.float().to(dev)
        self.draft_to_target = self.layer.draft_ids()  # long [Vd]
        c = self.draft.config
        self.extra = self.depth * self.topk + self.depth + 2  # draft-node slots past L
        self.slots = engine.max_seq_len + self.extra
        self.fused = None
        if self.kernels and engine.model.backend == "triton":
            from flashtune.decoding.drafters.eagle.fused import FusedLayer

            self.fused = FusedLayer(self.layer, engine, self.slots)
        bmax = engine.max_batch_size
        self.k = torch.zeros(bmax, c.num_key_value_heads, self.slots, c.head_dim, dtype=dt, device=dev)
        self.v = torch.zeros_like(self.k)
        self.L = torch.zeros(bmax, dtype=torch.long, device=dev)  # = the engine's committed lengths
        self._pending = torch.zeros(bmax, c.hidden_size, dtype=dt, device=dev)
        self._tc = self._tree_constants(dev) if self.topk > 1 else None
        self._engine = engine
        self.graph_version = getattr(self, "graph_version", 0) + 1  # graphs of older buffers are stale

    def _tree_constants(self, dev) -> dict:
        """The tensors every tree proposal uses that depend only on the drafter's shape (made once, not as
        fill kernels in every step)."""
        K, D = self.topk, self.depth
        ar = torch.arange(K, device=dev)
        return {"ar": ar, "no_parent": torch.full((K,), -1, dtype=torch.long, device=dev),
                "own": [(level - 1) * K + ar for level in range(1, D)],  # draft slots - L of level's frontier
                "anc": torch.zeros(K, max((D - 1) * K, 1), dtype=torch.bool, device=dev),
                "true": torch.ones((), dtype=torch.bool, device=dev),  # (a Python True is a host copy in capture)
                "levels": torch.cat([torch.ones(K, dtype=torch.long, device=dev)] + [
                    torch.full((K * K,), lv + 1, dtype=torch.long, device=dev) for lv in range(1, D)]),
                "node_ids": torch.arange(1, self.nodes + 1, device=dev),
                "zero": torch.zeros(1, dtype=torch.long, device=dev)}

    def _span(self, bsz: int) -> int:
        """Cache slots the attention reads: all of them on CUDA (static shapes), the live ones on the CPU."""
        if self.k.device.type == "cuda":
            return self.slots
        return min(self.slots, int(self.L[:bsz].max()) + self.extra + self.depth + 1)

    def _run(self, x, tokens, positions, slots, mask):
        """The layer on x [B, q, H] (fc output or its own earlier output) and tokens [B, q] (target ids) at
        positions / cache slots [B, q], with visibility mask bool [B, q, S]; writes K/V -> output [B, q, H]."""
        m = self.layer
        bsz = x.shape[0]
        emb = self._engine.model.embed(tokens)
        cos, sin = m.rope(positions, x.dtype)
        q, k, v = m.midlayer.project(emb, x, cos, sin)  # [B, h, q, D]
        rows = torch.arange(bsz, device=x.device)[:, None]
        self.k[:bsz].transpose(1, 2)[rows, slots] = k.transpose(1, 2)  # [B, q, Hkv, D] at their slots
        self.v[:bsz].transpose(1, 2)[rows, slots] = v.transpose(1, 2)
        s = mask.shape[-1]
        attn = F.scaled_dot_product_attention(q, self.k[:bsz, :, :s], self.v[:bsz, :, :s], attn_mask=mask[:, None],
                                              enable_gqa=q.shape[1] != k.shape[1])
        return m.midlayer.finish(x, attn)

    def _causal_run(self, x, tokens, slots):
        """`_run` at consecutive slots [B, q] per row (position = slot), each seeing the committed slots from
        `first` up to its own."""
        if self.fused is not None:
            return self.fused.run(x, tokens, slots, slots, self.k, self.v, slots[:, 0], self.first)
        keys = torch.arange(self._span(slots.shape[0]), device=slots.device)
        mask = (keys[None, None] >= self.first) & (keys[None, None] <= slots[..., None])  # [B, q, S]
        return self._run(x, tokens, slots, slots, mask)

    def _logits(self, out):
        return self.fused.logits(out) if self.fused is not None else self.layer.logits(out)

    def _catch_up(self, feats, stream, slots):
        """Target features [B, q, 3H] and next tokens [B, q] at consecutive slots [B, q] -> outputs [B, q, H]."""
        return self._causal_run(self.layer.fc(feats.to(self._engine.dtype)), stream, slots)

    # ---- the engine's drafter interface ------------------------------------------------------------------
    def start(self, engine, feats, tokens, lengths, root) -> None:
        """After the prefill: the prompt's positions (g_i, t_{i+1}) go through the layer; the last one reads the
        root, so its output is the first step's first draft state."""
        if self._engine is not engine:
            self._setup(engine)
        bsz, t = tokens.shape
        if bsz > self.L.shape[0]:
            raise ConfigError(f"batch of {bsz} exceeds the engine's max_batch_size={self.L.shape[0]}")
        self.first = engine.cache.prefix_len
        self.noise = engine.noise  # None when greedy: drafts are then argmax tokens
        self.L[:bsz].copy_(lengths + self.first)
        stream = torch.cat([tokens[:, 1:], tokens.new_zeros(bsz, 1)], dim=1)  # t_{i+1} at i
        stream.scatter_(1, (lengths - 1)[:, None], root[:, None])
        slots = self.first + torch.arange(t, device=tokens.device)[None].expand(bsz, t)
        out = self._catch_up(feats, stream, slots)
        self._pending[:bsz].copy_(out[torch.arange(bsz, device=tokens.device), lengths - 1])

    def propose(self, feats_last, root):
        if self.topk == 1:
            return self._propose_chain(root)
        return self._propose_tree(root)

    def _propose_chain(self, root):
        """-> (tree tokens [B, 1 + depth], q [B, depth, V] when sampling, else None)."""
        bsz = root.shape[0]
        L = self.L[:bsz]
        out = self._pending[:bsz, None]  # [B, 1, H]: the state that predicts the first draft
        nodes, qs = [root[:, None]], []
        for j in range(self.depth):
            if j:
                slot = (L + j - 1)[:, None]  # draft j+1 sits at position L - 1 + j; earlier drafts at L .. L + j - 2
                out = self._causal_run(out, tok[:, None], slot)
            logits = self._logits(out[:, 0]).float()  # [B, Vd]
            if self.temperature is None or self.noise is None:
                tok = self.draft_to_target[torch.argmax(logits, dim=-1)]
            else:
                qd = torch.softmax(logits / self.temperature, dim=-1)
                pick = self.noise.categorical(qd)
                tok = self.draft_to_target[pick]
                q = torch.zeros(bsz, self._engine.model.args.vocab_size, device=qd.device)
                qs.append(q.index_copy_(1, self.draft_to_target, qd))  # the draft distribution over target ids
            nodes.append(tok[:, None])
        return torch.cat(nodes, dim=1), (torch.stack(qs, dim=1) if qs else None)

    def _propose_tree(self, root):
        """EAGLE-2's expansion and reranking -> (tree tokens [B, 1 + nodes], None); rewrites self.tree."""
        bsz = root.shape[0]
        K, D = self.topk, self.depth
        dev = root.device
        L = self.L[:bsz]
        if self.fused is None:  # the dense masks' pieces
            keys = torch.arange(self._span(bsz), device=dev)
            context = (keys[None] >= self.first) & (keys[None] < L[:, None])  # [B, S]
        lp = torch.log_softmax(self._logits(self._pending[:bsz]).float(), dim=-1)  # [B, Vd]
        score, tok = torch.topk(lp, K, dim=-1)  # [B, K]: level 1 = the root's children
        tc = self._tc
        cand_tok, cand_score = [tok], [score]
        cand_parent = [tc["no_parent"]]  # candidate index of the parent
        fr_idx = tc["ar"]  # the frontier's candidate indices
        fr_out = self._pending[:bsz, None].expand(bsz, K, -1)  # [B, K, H]: the state each frontier node read
        fr_tok, fr_score = tok, score
        n_draft = (D - 1) * K  # draft slots L + level * K + f for the frontier of level + 1
        anc = tc["anc"].clone()  # [K, n_draft]: frontier -> visible draft slots (a new tensor at every level)
        offset = K  # candidates so far
        for level in range(1, D):
            own = tc["own"][level - 1]
            anc[tc["ar"], own] = tc["true"]
            slots = L[:, None] + own[None]  # [B, K]
            positions = (L - 1 + level)[:, None].expand(bsz, K)
            if self.fused is not None:  # the draft slots so far as a block of level * K rows from L
                width = level * K
                block = torch.zeros(width, width, dtype=torch.uint8, device=dev)
                block[own] = anc[:, :width].to(torch.uint8)
                out = self.fused.run(fr_out, self.draft_to_target[fr_tok], positions, slots, self.k, self.v, L,
                                     self.first, tree=block, rows=own)  # [B, K, H]
            else:
                rel = keys[None] - L[:, None]  # [B, S]
                in_draft = (rel >= 0) & (rel < n_draft)
                mask = context[:, None] | (in_draft[:, None] & anc[:, rel.clamp(0, n_draft - 1)].permute(1, 0, 2))
                out = self._run(fr_out, self.draft_to_target[fr_tok], positions, slots, mask)  # [B, K, H]
            lp = torch.log_softmax(self._logits(out).float(), dim=-1)  # [B, K, Vd]
            s, t = torch.topk(lp, K, dim=-1)  # [B, K, K]
            child_score = (fr_score[..., None] + s).reshape(bsz, K * K)
            cand_tok.append(t.reshape(bsz, K * K))
            cand_score.append(child_score)
            cand_parent.append(fr_idx.repeat_interleave(K))
            value = child_score.exp().mean(0)  # [K*K]: mean confidence over the batch's rows
            pick = torch.topk(value, K).indices  # the next frontier
            fr_parent = pick // K
            fr_idx = offset + pick
            offset += K * K
            fr_out = out[:, fr_parent]
            fr_tok = t.reshape(bsz, K * K)[:, pick]
            fr_score = child_score[:, pick]
            anc = anc[fr_parent]
        scores = torch.cat(cand_score, dim=1)  # [B, C]
        tokens = torch.cat(cand_tok, dim=1)
        parents = torch.cat(cand_parent)
        levels = tc["levels"]
        order = torch.sort(scores.exp().mean(0), descending=True, stable=True).indices  # ties: parent first
        chosen = torch.sort(order[: self.nodes]).values  # [n]: level-major, so parents precede children
        node_of = torch.zeros(scores.shape[1] + 1, dtype=torch.long, device=dev)  # candidate + 1 -> node (root 0)
        node_of[chosen + 1] = tc["node_ids"]
        parent = torch.cat([tc["zero"], node_of[parents[chosen] + 1]])
        depth = torch.cat([tc["zero"], levels[chosen]])
        self._set_tree(parent, depth)
        drafted = self.draft_to_target[tokens[:, chosen]]  # [B, n]
        return torch.cat([root[:, None], drafted], dim=1), None

    def accept(self, feats, tree_tokens, acc, path) -> None:
        """Catch the layer up on the accepted path (positions L .. L + a) with the target's features there; keep
        its output at L + a (its token is the new root) for the next proposal; advance L."""
        bsz, d1 = path.shape
        L = self.L[:bsz]
        path_tokens = tree_tokens.gather(1, path)  # [B, D+1]: root, then the path's drafts
        stream = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)  # the token after each node
        stream.scatter_(1, acc.accepted[:, None], acc.next[:, None])  # valid up to `accepted`
        g = feats.gather(1, path[..., None].expand(-1, -1, feats.shape[-1]))  # [B, D+1, 3H]
        slots = L[:, None] + torch.arange(d1, device=path.device)[None]
        out = self._catch_up(g, stream, slots)
        self._pending[:bsz].copy_(out[torch.arange(bsz, device=path.device), acc.accepted])
        # finished rows keep stepping: clamped so every slot they touch stays inside the cache
        L.copy_((L + acc.accepted + 1).clamp(max=self._engine.max_seq_len - self.depth - 1))
