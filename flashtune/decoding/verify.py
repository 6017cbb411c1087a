"""Acceptance rules for speculative decoding: pure, batched functions with no model inside.

Papers: Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (arXiv 2211.17192);
Chen et al., "Accelerating LLM Decoding with Speculative Sampling" (arXiv 2302.01318); Cai et al., "Medusa"
(arXiv 2401.10774) for tree verification and typical acceptance.

Tree rules take the target's output at every tree node and the tree's tokens, and return an `Acceptance`:

    tree_tokens  long [B, N]        node tokens; node 0 is the root (already chosen, emitted this step)
    logits / p   [B, N, V]          the target's logits (greedy, typical) or processed probabilities
                                    (`sampling.probs`) at each node: the distribution of the node's child
    tree         TreeBuffers        retrieve [n_leaves, D+1] + valid_len [n_leaves] (tree.py)

    Acceptance.best      long [B]   chosen retrieve row (leaf path)
    Acceptance.accepted  long [B]   a = draft tokens accepted after the root (0..D)
    Acceptance.node      long [B]   the last accepted node, retrieve[best, a]
    Acceptance.next      long [B]   the next root: argmax/sample of p at `node` (the correction or bonus token)

The emitted tokens of the step are tree_tokens[retrieve[best, :a+1]] (a + 1 tokens); `next` is carried to the
next step as its root. `emitted_tokens` gathers them into [B, D+1].

Lossless rules (output distributed exactly as plain decoding): `greedy_tree` (token-identical to argmax
decoding), `sample_tree` (one draw y ~ p per node, shared by every path through it; descend while y is a
child), `chain_speculative` (draft distribution q; accept with min(1, p/q), resample from norm(max(0, p-q))).
`typical_tree` is lossy: it accepts any token with p > min(eps, delta*exp(-H)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtune.decoding.tree import TreeBuffers


@dataclass
class Acceptance:
    best: torch.Tensor
    accepted: torch.Tensor
    node: torch.Tensor
    next: torch.Tensor


def _paths(tree_tokens: torch.Tensor, tree: TreeBuffers):
    """cart [B, n_leaves, D+1] tokens along each leaf path, and valid [n_leaves, D] for the D child slots."""
    cart = tree_tokens[:, tree.retrieve]  # [B, n_leaves, D+1]
    steps = torch.arange(1, tree.retrieve.shape[1], device=tree_tokens.device)
    valid = steps[None, :] < tree.valid_len[:, None]  # [n_leaves, D]: child slot t+1 is a real node
    return cart, valid


def _leading_true(match: torch.Tensor) -> torch.Tensor:
    """bool [..., D] -> long [...]: how many leading entries are True (the index of the first False, or D).
    One elementwise kernel and one reduction, where cumprod would be a scan."""
    d = match.shape[-1]
    if d == 0:
        return match.new_zeros(match.shape[:-1], dtype=torch.long)
    return torch.where(match, d, torch.arange(d, device=match.device)).amin(-1)


def _choose(match: torch.Tensor, tree: TreeBuffers, score: torch.Tensor | None = None):
    """match bool [B, n_leaves, D] -> (best, accepted, node). Longest accepted prefix; first row on ties
    (or the largest `score` [B, n_leaves] among the longest)."""
    acc = _leading_true(match)  # [B, n_leaves]
    if score is None:
        best = torch.argmax(acc, dim=-1)
    else:
        top = acc.max(dim=-1, keepdim=True).values
        best = torch.argmax(torch.where(acc == top, score, torch.full_like(score, float("-inf"))), dim=-1)
    accepted = acc.gather(1, best[:, None])[:, 0]
    node = tree.retrieve[best, accepted]
    return best, accepted, node


def _at(values: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """values [B, N, ...] -> values[b, node[b]]."""
    return values[torch.arange(values.shape[0], device=values.device), node]


def greedy_tree(logits: torch.Tensor, tree_tokens: torch.Tensor, tree: TreeBuffers) -> Acceptance:
    """Accept a child while it equals the argmax of its parent's logits. Lossless for greedy decoding."""
    pred = torch.argmax(logits, dim=-1)  # [B, N]
    return greedy_tree_from_pred(pred, tree_tokens, tree)


def greedy_tree_from_pred(pred: torch.Tensor, tree_tokens: torch.Tensor, tree: TreeBuffers) -> Acceptance:
    """`greedy_tree` given the argmax token of every node, pred [B, N]."""
    cart, valid = _paths(tree_tokens, tree)
    pred_path = pred[:, tree.retrieve]  # [B, n_leaves, D+1]
    match = (cart[:, :, 1:] == pred_path[:, :, :-1]) & valid
    best, accepted, node = _choose(match, tree)
    return Acceptance(best, accepted, node, _at(pred, node))


def _draw(p: torch.Tensor, generator, noise) -> torch.Tensor:
    """One draw from every row of p [..., V] -> long [...]: from the step's noise (sampling.StepNoise) when
    given, else torch.multinomial with `generator`."""
    if noise is not None:
        return noise.categorical(p)
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).view(p.shape[:-1])


def sample_tree(p: torch.Tensor, tree_tokens: torch.Tensor, tree: TreeBuffers,
                generator: torch.Generator | None = None, draws: torch.Tensor | None = None,
                noise=None) -> Acceptance:
    """Lossless tree sampling ("sample and descend"): draw y ~ p at every node (one draw per node, shared by
    all paths through it); from the root, move to the child whose token is y; stop where no child matches
    and emit that node's y as the next root (at a leaf, y is the bonus token). Every emitted token is a
    direct draw from the target distribution. `draws` [B, N] may be given instead of drawing (for tests);
    `noise` (sampling.StepNoise) supplies the randomness instead of `generator` (the engine's CUDA-graph path)."""
    if draws is None:
        draws = _draw(p, generator, noise)
    cart, valid = _paths(tree_tokens, tree)
    y_path = draws[:, tree.retrieve]  # [B, n_leaves, D+1]
    match = (cart[:, :, 1:] == y_path[:, :, :-1]) & valid
    best, accepted, node = _choose(match, tree)
    return Acceptance(best, accepted, node, _at(draws, node))


def typical_tree(logits: torch.Tensor, tree_tokens: torch.Tensor, tree: TreeBuffers, temperature: float,
                 epsilon: float = 0.09, delta: float = 0.3,
                 generator: torch.Generator | None = None, noise=None) -> Acceptance:
    """Medusa's typical acceptance (LOSSY): with p = softmax(logits / T) and H its entropy, a child x is
    accepted iff p(x) > min(epsilon, delta * exp(-H)). Among the longest accepted paths the one with the
    largest sum of log p wins. The next root is drawn from p at the last accepted node."""
    p = torch.softmax(logits.float() / temperature, dim=-1)  # [B, N, V]
    entropy = -(p * torch.log(p + 1e-5)).sum(-1)  # [B, N]
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    cart, valid = _paths(tree_tokens, tree)
    parents = tree.retrieve[:, :-1]  # [n_leaves, D]
    b = torch.arange(p.shape[0], device=p.device)[:, None, None]
    p_child = p[b, parents[None], cart[:, :, 1:]]  # [B, n_leaves, D]: p of each child under its parent
    match = (p_child > threshold[:, parents]) & valid
    logp = torch.log(p_child.clamp_min(1e-30)) * torch.cumprod(match.to(p.dtype), dim=-1)
    best, accepted, node = _choose(match, tree, score=logp.sum(-1))
    return Acceptance(best, accepted, node, _draw(_at(p, node), generator, noise))


def emitted_tokens(tree_tokens: torch.Tensor, tree: TreeBuffers, acc: Acceptance) -> torch.Tensor:
    """The tokens of the chosen path [B, D+1]; entries after acc.accepted are padding (repeat the leaf)."""
    return tree_tokens.gather(1, tree.retrieve[acc.best])


def chain_speculative(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      uniforms: torch.Tensor | None = None, noise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over a chain of k drafted tokens (Leviathan et al. Algorithm 1, batched).

    p      [B, k+1, V]  target probabilities: p[:, j] is the distribution of draft j (p[:, k]: the bonus)
    draft  long [B, k]  drafted tokens
    q      [B, k, V]    the distribution each draft was drawn from; None = one-hot drafts (argmax drafters):
                        accept with probability p(d), and the residual is p with d removed.
    Returns (accepted [B] in 0..k, next [B]): the first `accepted` drafts are kept, then `next` is emitted,
    drawn from norm(max(0, p_a - q_a)) after a rejection, or from p_k when all k were accepted.
    """
    bsz, k = draft.shape
    p = p.float()
    p_draft = p[:, :k].gather(-1, draft[..., None])[..., 0]  # [B, k]
    if q is None:
        ratio = p_draft
    else:
        q = q.float()
        q_draft = q.gather(-1, draft[..., None])[..., 0]
        ratio = p_draft / q_draft.clamp_min(1e-30)
    if uniforms is None:
        uniforms = noise.uniform(bsz, k) if noise is not None else torch.rand(bsz, k, generator=generator,
                                                                            device=p.device)
    ok = uniforms < ratio.clamp(max=1.0)  # strict <: a token with p = 0 is never accepted
    accepted = torch.cumprod(ok.to(torch.int64), dim=-1).sum(-1)  # [B]
    if q is None:
        q_full = torch.zeros_like(p[:, :k]).scatter_(-1, draft[..., None], 1.0)
    else:
        q_full = q
    residual = torch.cat([(p[:, :k] - q_full).clamp_min(0.0), p[:, k:]], dim=1)  # [B, k+1, V]
    res = residual[torch.arange(bsz, device=p.device), accepted]  # [B, V]
    mass = res.sum(-1, keepdim=True)
    # p == q exactly leaves no residual mass, but then a rejection had probability 0; fall back to p.
    res = torch.where(mass > 0, res / mass.clamp_min(1e-30), p[torch.arange(bsz, device=p.device), accepted])
    return accepted, _draw(res, generator, noise)


def chain_greedy(logits: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy chain verification: logits [B, k+1, V], draft [B, k] -> (accepted [B], next [B]). `greedy_tree`
    for a chain in five kernels: no paths to gather, and the accepted nodes are already the first a + 1."""
    pred = torch.argmax(logits, dim=-1)  # [B, k+1]
    accepted = _leading_true(pred[:, :-1] == draft)
    return accepted, pred.gather(1, accepted[:, None])[:, 0]
