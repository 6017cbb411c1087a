"""Candidate trees for tree-verified speculative decoding (Medusa, arXiv 2401.10774, §2.1.2 and §3.3.2).

A tree is a prefix-closed list of index paths. Path (a, b, c) is the depth-3 node whose token is the top-a
candidate of draft position 1, then top-b of position 2, then top-c of position 3. Node 0 (the root) is the
token already chosen from the base model's logits and not yet in the KV cache. Because every draft position's
candidates are read from the same state, a node's token depends only on (depth, last index).

`TreeBuffers` holds what the verifier needs, with explicit valid lengths instead of -1 padding:

    mask         bool [N, N]      node i sees node j (j is i or an ancestor of i)
    depth        long [N]         the node's depth; its position is (committed length) + depth
    tree_indices long [N]         index into the flat candidate vector [root, pos-1 top-k..., pos-2 top-k...]
    retrieve     long [n_leaves, D+1]  node indices from the root to each leaf, right-padded by repeating
                                       the leaf (never read past valid_len)
    valid_len    long [n_leaves]  number of real nodes in each retrieve row (root included)
    parent       long [N]         parent node (the root is its own parent)
    ancestors    long [N, D+1]    ancestors[i, k]: node i's ancestor at depth k (k <= depth[i]; i itself at
                                  its depth; right-padded with i): the node's keys in position order

`mc_sim_7b_63` is the default 63-path tree published with Medusa (64 nodes with the root, 42 leaves, depth 4).
`build_tree(head_accuracy, n_nodes)` builds a tree for *your* model from measured per-head top-k accuracies:
it adds, one at a time, the node with the largest expected acceptance (the product of its path's accuracies).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from flashtune.errors import ConfigError

# The largest tree `build_tree` makes (root excluded). Published trees are far smaller (Medusa's 63 nodes,
# EAGLE-2's ~48-60); each node costs a token of every verification pass, so beyond a few hundred a step is a
# long prefill that no acceptance pays for, and the greedy build itself slows down.
MAX_TREE_NODES = 512

# The default tree of the Medusa reference implementation (medusa_choices.py, "mc_sim_7b_63"), kept as data.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]


@dataclass
class TreeBuffers:
    paths: list[tuple[int, ...]]  # sorted by (length, lexicographic); node i + 1 is paths[i]
    topk: int
    mask: torch.Tensor
    depth: torch.Tensor
    tree_indices: torch.Tensor
    retrieve: torch.Tensor
    valid_len: torch.Tensor
    parent: torch.Tensor
    ancestors: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return self.retrieve.shape[1] - 1

    @property
    def is_chain(self) -> bool:
        """One path: node i + 1 is the child of node i (an MTP chain draft)."""
        return self.num_leaves == 1 and self.num_nodes > 1

    @property
    def num_leaves(self) -> int:
        return self.retrieve.shape[0]

    def to(self, device) -> "TreeBuffers":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return TreeBuffers(**moved)


def tree_buffers(paths, topk: int | None = None) -> TreeBuffers:
    """Build the verification buffers of a prefix-closed list of index paths (see the module docstring).

    topk: candidates kept per draft position (default: 1 + the largest index used, at least 1).
    """
    norm = []
    for p in paths:
        t = tuple(int(i) for i in p)
        if not t or min(t) < 0:
            raise ConfigError(f"tree path {list(p)!r} must be a non-empty list of non-negative indices")
        norm.append(t)
    if len(set(norm)) != len(norm):
        raise ConfigError("tree paths contain duplicates; give each path once")
    known = set(norm)
    for t in norm:
        if len(t) > 1 and t[:-1] not in known:
            raise ConfigError(f"tree is not prefix-closed: {list(t)} needs its parent {list(t[:-1])}; add it")
    norm.sort(key=lambda t: (len(t), t))
    largest = max((i for t in norm for i in t), default=0)
    topk = max(1, largest + 1) if topk is None else topk
    if largest >= topk:
        raise ConfigError(f"tree uses candidate index {largest} but topk={topk}; raise topk above {largest}")
    n = len(norm) + 1
    node_of = {t: i + 1 for i, t in enumerate(norm)}
    node_of[()] = 0
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    tree_indices = torch.zeros(n, dtype=torch.long)
    parent = torch.zeros(n, dtype=torch.long)
    mask[0, 0] = True
    for t, i in node_of.items():
        if i == 0:
            continue
        depth[i] = len(t)
        tree_indices[i] = 1 + topk * (len(t) - 1) + t[-1]
        parent[i] = node_of[t[:-1]]
        for k in range(len(t) + 1):
            mask[i, node_of[t[:k]]] = True
    max_d = max((len(t) for t in norm), default=0)
    ancestors = torch.zeros(n, max_d + 1, dtype=torch.long)
    for t, i in node_of.items():
        ancestors[i] = torch.tensor([node_of[t[:k]] for k in range(len(t) + 1)] + [i] * (max_d - len(t)))
    has_child = {t[:-1] for t in norm}
    leaves = [t for t in [()] + norm if t not in has_child]
    retrieve = torch.zeros(len(leaves), max_d + 1, dtype=torch.long)
    valid_len = torch.zeros(len(leaves), dtype=torch.long)
    for r, t in enumerate(leaves):
        row = [node_of[t[:k]] for k in range(len(t) + 1)]
        row += [row[-1]] * (max_d + 1 - len(row))
        retrieve[r] = torch.tensor(row)
        valid_len[r] = len(t) + 1
    return TreeBuffers(norm, topk, mask, depth, tree_indices, retrieve, valid_len, parent, ancestors)


def chain_paths(length: int) -> list[list[int]]:
    """The chain [[0], [0, 0], ...] of `length` draft tokens (one candidate per position)."""
    return [[0] * k for k in range(1, length + 1)]


def default_tree(num_heads: int = 4, topk: int = 10) -> TreeBuffers:
    """mc_sim_7b_63 cut to the paths that `num_heads` heads and `topk` candidates can fill."""
    paths = [p for p in MC_SIM_7B_63 if len(p) <= num_heads and max(p) < topk]
    return tree_buffers(paths, topk=topk)


def expected_accept_length(paths, head_accuracy) -> float:
    """Expected tokens per step (root included) if head k's rank-j candidate is right with prob acc[k][j]."""
    acc = torch.as_tensor(head_accuracy, dtype=torch.float64)
    total = 1.0
    for p in paths:
        total += float(torch.prod(torch.stack([acc[k, j] for k, j in enumerate(p)])))
    return total


def build_tree(head_accuracy, n_nodes: int, topk: int | None = None) -> list[list[int]]:
    """Greedy expected-acceptance tree of `n_nodes` nodes (root excluded) from per-head top-k accuracies.

    head_accuracy [K, topk]: acc[k][j] = probability that head k+1's rank-j candidate is the right token.
    A path's value is the product of its accuracies (heads treated as independent). Since a child is never
    worth more than its parent, taking nodes in decreasing value keeps the tree prefix-closed.
    """
    acc = torch.as_tensor(head_accuracy, dtype=torch.float64)
    if acc.ndim != 2 or acc.shape[0] < 1:
        raise ConfigError("head_accuracy must be a [num_heads, topk] table of probabilities")
    if topk is not None:
        acc = acc[:, :topk]
    if n_nodes < 1:
        raise ConfigError(f"n_nodes={n_nodes} must be >= 1")
    if n_nodes > MAX_TREE_NODES:
        raise ConfigError(f"n_nodes={n_nodes} is too large; trees have at most {MAX_TREE_NODES} nodes (typical: 15-63)")
    num_heads, k = acc.shape
    heap = [(-float(acc[0, j]), (j,)) for j in range(k)]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < n_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(list(path))
        d = len(path)
        if d < num_heads:
            for j in range(k):
                heapq.heappush(heap, (neg * float(acc[d, j]), path + (j,)))
    return chosen
