"""Tree buffers and tree construction (flashtune/decoding/tree.py)."""

import itertools

import pytest
import torch

from flashtune.decoding.tree import (MC_SIM_7B_63, build_tree, chain_paths, default_tree,
                                     expected_accept_length, tree_buffers)
from flashtune.errors import ConfigError


def test_chain_tree_is_triangular():
    t = tree_buffers([[0], [0, 0], [0, 0, 0]])
    assert torch.equal(t.mask, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert t.depth.tolist() == [0, 1, 2, 3]
    assert t.retrieve.tolist() == [[0, 1, 2, 3]]
    assert t.valid_len.tolist() == [4]
    assert t.tree_indices.tolist() == [0, 1, 2, 3]  # topk = 1: [root, pos-1, pos-2, pos-3]
    assert tree_buffers(chain_paths(3)).paths == t.paths


def test_default_63_path_tree():
    t = tree_buffers(MC_SIM_7B_63)
    assert t.num_nodes == 64 and t.num_leaves == 42 and t.max_depth == 4
    assert torch.equal(t.mask.sum(1), t.depth + 1)  # each row sees itself and its ancestors
    # every retrieve row walks parent links from its leaf to the root
    for r in range(t.num_leaves):
        row = t.retrieve[r, : t.valid_len[r]].tolist()
        assert row[0] == 0 and t.depth[row[-1]] == len(row) - 1
        assert all(t.parent[row[i + 1]] == row[i] for i in range(len(row) - 1))
        assert all(x == row[-1] for x in t.retrieve[r, t.valid_len[r]:].tolist())  # padding repeats the leaf
    # a depth-d node with last index j reads 1 + 10 (d - 1) + j of [root, head-1 top-10, head-2 top-10, ...]
    for i, path in enumerate(t.paths):
        assert t.tree_indices[i + 1] == 1 + 10 * (len(path) - 1) + path[-1]
    assert default_tree(4).num_nodes == 64
    assert default_tree(2).max_depth == 2


def test_masks_match_ancestry_from_paths():
    t = tree_buffers(MC_SIM_7B_63)
    for i, pi in enumerate([()] + t.paths):
        for j, pj in enumerate([()] + t.paths):
            assert bool(t.mask[i, j]) == (pi[: len(pj)] == pj)


def test_bad_trees_are_refused():
    with pytest.raises(ConfigError, match="prefix-closed"):
        tree_buffers([[0, 0]])
    with pytest.raises(ConfigError, match="duplicates"):
        tree_buffers([[0], [0]])
    with pytest.raises(ConfigError, match="topk"):
        tree_buffers([[0], [5]], topk=3)


def _brute_force_best(acc, n_nodes):
    heads, k = acc.shape
    nodes = [p for d in range(1, heads + 1) for p in itertools.product(range(k), repeat=d)]
    best = 0.0
    for subset in itertools.combinations(nodes, n_nodes):
        s = set(subset)
        if all(len(p) == 1 or p[:-1] in s for p in subset):
            best = max(best, expected_accept_length(subset, acc))
    return best


@pytest.mark.parametrize("n_nodes", [1, 3, 5])
def test_greedy_construction_is_optimal_on_small_cases(n_nodes):
    acc = torch.tensor([[0.6, 0.2, 0.1], [0.4, 0.3, 0.1]])
    paths = build_tree(acc, n_nodes)
    assert len(paths) == n_nodes
    tree_buffers(paths)  # prefix-closed
    assert expected_accept_length(paths, acc) == pytest.approx(_brute_force_best(acc, n_nodes))


def test_built_tree_prefers_accurate_heads():
    acc = torch.tensor([[0.9, 0.05], [0.8, 0.1], [0.7, 0.1]])
    paths = build_tree(acc, 3)
    assert paths == [[0], [0, 0], [0, 0, 0]]
