"""Acceptance rules (flashtune/decoding/verify.py) against independent oracles.

Lossless rules must leave the target distribution unchanged: a chi-square test of the emitted tokens
against p (and 2-token joints from a toy Markov "model") must not reject at 0.01, over several seeds. The same
test must reject Medusa's typical acceptance, which shows it has the power to catch a lossy rule.
"""

import pytest
import torch
from scipy.stats import chisquare

from flashtune.decoding import verify
from flashtune.decoding.tree import tree_buffers

V = 8
TRIALS = 200_000


def _dist(seed, v=V, sharp=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * sharp, -1).float()


def _chi2_p(samples, expected_p, v):
    counts = torch.bincount(samples, minlength=v).double()
    keep = expected_p > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was emitted"
    exp = expected_p.double()[keep] / expected_p.double()[keep].sum() * samples.numel()
    return chisquare(counts[keep].numpy(), exp.numpy()).pvalue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chain_speculative_first_token_is_p(seed):
    p0, p1, q0 = _dist(seed), _dist(seed + 10), _dist(seed + 20)
    g = torch.Generator().manual_seed(seed)
    draft = torch.multinomial(q0.expand(TRIALS, V), 1, replacement=True, generator=g)  # [T, 1] drafts ~ q
    p = torch.stack([p0, p1])[None].expand(TRIALS, 2, V)
    q = q0[None, None].expand(TRIALS, 1, V)
    accepted, nxt = verify.chain_speculative(p, draft, q, generator=g)
    first = torch.where(accepted >= 1, draft[:, 0], nxt)
    assert _chi2_p(first, p0, V) > 0.01
    # acceptance rate = sum min(p, q)
    alpha = torch.minimum(p0, q0).sum().item()
    assert abs(accepted.float().mean().item() - alpha) < 4 * (alpha * (1 - alpha) / TRIALS) ** 0.5 + 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_chain_speculative_two_token_joint_markov(seed):
    """Toy Markov target P[x] = p(next | x) and draft Q[x]; drafts d1 ~ Q[x0], d2 ~ Q[d1]."""
    g = torch.Generator().manual_seed(100 + seed)
    P = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    Q = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    x0 = 3
    d1 = torch.multinomial(Q[x0].expand(TRIALS, V), 1, True, generator=g)[:, 0]
    d2 = torch.multinomial(Q[d1], 1, True, generator=g)[:, 0]
    p = torch.stack([P[x0].expand(TRIALS, V), P[d1], P[d2]], 1)  # [T, 3, V]
    q = torch.stack([Q[x0].expand(TRIALS, V), Q[d1]], 1)
    accepted, nxt = verify.chain_speculative(p, torch.stack([d1, d2], 1), q, generator=g)
    t1 = torch.where(accepted >= 1, d1, nxt)
    t2 = torch.where(accepted >= 2, d2, torch.where(accepted == 1, nxt, -1))
    # after a first-token rejection the next step (exact by the first test) draws t2 ~ P[t1]
    missing = t2 < 0
    t2[missing] = torch.multinomial(P[t1[missing]], 1, True, generator=g)[:, 0]
    joint = P[x0][:, None] * P  # [V, V]
    assert _chi2_p(t1 * V + t2, joint.flatten(), V * V) > 0.01


@pytest.mark.parametrize("seed", [3, 4])
def test_one_hot_draft_is_lossless(seed):
    p0, p1 = _dist(seed), _dist(seed + 1)
    draft = torch.full((TRIALS, 1), int(torch.argmax(p0)))  # an argmax drafter: q is one-hot
    g = torch.Generator().manual_seed(seed)
    accepted, nxt = verify.chain_speculative(torch.stack([p0, p1])[None].expand(TRIALS, 2, V), draft, None,
                                             generator=g)
    first = torch.where(accepted >= 1, draft[:, 0], nxt)
    assert _chi2_p(first, p0, V) > 0.01
    assert abs(accepted.float().mean().item() - p0.max().item()) < 0.01


def _toy_tree_run(rule, seed, trials=TRIALS):
    """Tree: root token 0, children = the two likeliest tokens under P[0], and the first child's children =
    the two likeliest under P[child]: candidates as Medusa heads would propose them. Markov target P."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(V, V, generator=g) * 2.0, -1)
    tree = tree_buffers([[0], [1], [0, 0], [0, 1]])  # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1]
    c1, c2 = torch.topk(P[0], 2).indices.tolist()
    g1, g2 = torch.topk(P[c1], 2).indices.tolist()
    node_tok = torch.tensor([0, c1, c2, g1, g2])
    tokens = node_tok[None].expand(trials, 5)
    p = P[node_tok][None].expand(trials, 5, V)
    if rule == "sample":
        acc = verify.sample_tree(p, tokens, tree, generator=g)
    else:
        acc = verify.typical_tree(torch.log(p), tokens, tree, temperature=1.0, epsilon=0.3, delta=0.5,
                                  generator=g)
    emitted = verify.emitted_tokens(tokens, tree, acc)  # root first
    t1 = torch.where(acc.accepted >= 1, emitted[:, 1], acc.next)
    t2 = torch.where(acc.accepted >= 2, emitted[:, 2], torch.where(acc.accepted == 1, acc.next, -1))
    missing = t2 < 0
    t2[missing] = torch.multinomial(P[t1[missing]], 1, True, generator=g)[:, 0]
    return P, t1, t2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_sample_and_descend_is_lossless(seed):
    P, t1, t2 = _toy_tree_run("sample", seed)
    assert _chi2_p(t1, P[0], V) > 0.01
    assert _chi2_p(t1 * V + t2, (P[0][:, None] * P).flatten(), V * V) > 0.01


def test_typical_acceptance_is_rejected_by_the_same_test():
    P, t1, _ = _toy_tree_run("typical", 0)
    assert _chi2_p(t1, P[0], V) < 0.01


def _naive_greedy(pred, tokens, paths):
    """Walk each root-to-leaf path in Python; return (longest accepted count, its first path, next token)."""
    best_len, best_path = -1, None
    for path in paths:
        a = 0
        while a + 1 < len(path) and tokens[path[a + 1]] == pred[path[a]]:
            a += 1
        if a > best_len:
            best_len, best_path = a, path
    return best_len, best_path[best_len], pred[best_path[best_len]]


def test_greedy_tree_matches_a_python_walk():
    from flashtune.decoding.tree import MC_SIM_7B_63

    tree = tree_buffers(MC_SIM_7B_63)
    g = torch.Generator().manual_seed(0)
    bsz, n = 64, tree.num_nodes
    tokens = torch.randint(0, 3, (bsz, n), generator=g)  # small alphabet so matches happen
    pred = torch.randint(0, 3, (bsz, n), generator=g)
    acc = verify.greedy_tree_from_pred(pred, tokens, tree)
    rows = [tree.retrieve[r, : tree.valid_len[r]].tolist() for r in range(tree.num_leaves)]
    for b in range(bsz):
        a, node, nxt = _naive_greedy(pred[b].tolist(), tokens[b].tolist(), rows)
        assert (acc.accepted[b].item(), acc.node[b].item(), acc.next[b].item()) == (a, node, nxt)


def test_chain_greedy():
    logits = torch.randn(4, 4, V)
    pred = logits.argmax(-1)
    draft = pred[:, :3].clone()
    draft[1, 1] = (draft[1, 1] + 1) % V  # row 1 rejects its second draft
    draft[2, 0] = (draft[2, 0] + 1) % V
    accepted, nxt = verify.chain_greedy(logits, draft)
    assert accepted.tolist() == [3, 1, 0, 3]
    assert nxt.tolist() == [pred[0, 3], pred[1, 1], pred[2, 0], pred[3, 3]]


def test_chain_greedy_equals_greedy_tree_on_a_chain_tree():
    """The engine's chain shortcut (is_chain: chain_greedy, no compaction) against the general tree rule."""
    tree = tree_buffers([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]])
    assert tree.is_chain and tree.retrieve.tolist() == [[0, 1, 2, 3, 4]]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3, (200, 5), generator=g)
    logits = torch.randn(200, 5, 3, generator=g)  # 3-token vocabulary: every acceptance length occurs
    acc = verify.greedy_tree(logits, tokens, tree)
    a, nxt = verify.chain_greedy(logits, tokens[:, 1:])
    assert torch.equal(a, acc.accepted) and torch.equal(a, acc.node) and torch.equal(nxt, acc.next)
    assert set(a.tolist()) == {0, 1, 2, 3, 4}
    assert not tree_buffers([[0], [1]]).is_chain
