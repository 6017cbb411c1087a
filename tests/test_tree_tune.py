"""Choosing the Medusa tree by expected tokens per measured second (flashtune/decoding/tree_tune.py)."""

import torch

from flashtune.decoding import Engine, MedusaHeads
from flashtune.decoding.tree import build_tree
from flashtune.decoding.tree_tune import tune_tree
from tiny import tiny_model

ACC = [[0.8, 0.1, 0.05], [0.6, 0.1, 0.05], [0.4, 0.1, 0.05]]  # [heads, topk]


def _heads(model):
    return MedusaHeads.for_model(model.lm_head.weight, num_heads=3, topk=3)


def test_free_nodes_choose_the_largest_tree_and_linear_cost_chooses_plain():
    model = tiny_model("llama")
    heads = _heads(model)
    free = tune_tree(heads, None, ACC, sizes=(3, 7, 15), measure=lambda d: 1.0)
    assert free["nodes"] == 15 and heads.tree.num_nodes == 16
    assert sorted(heads.tree.paths) == sorted(tuple(p) for p in build_tree(ACC, 15, topk=3))
    # a step costing its node count: no tree's expected length (< nodes + 1) pays for it
    linear = tune_tree(heads, None, ACC, sizes=(3, 7), measure=lambda d: 1.0 if d is None else d.tree.num_nodes)
    assert linear["nodes"] == 0 and [r["nodes"] for r in linear["rows"]] == [0, 3, 7]
    # a fixed cost with a small per-node part: a middle size wins
    mid = tune_tree(heads, None, ACC, sizes=(1, 3, 15),
                    measure=lambda d: 1.0 if d is None else 1.0 + 0.12 * d.tree.num_nodes)
    best = max(mid["rows"], key=lambda r: r["tokens_per_s"])
    assert mid["nodes"] == best["nodes"] == 3


def test_tune_tree_times_the_real_engine():
    model = tiny_model("llama")
    heads = _heads(model)
    engine = Engine(model, max_batch_size=1, max_seq_len=96)
    report = tune_tree(heads, engine, ACC, sizes=(1, 3))
    assert [r["nodes"] for r in report["rows"]] == [0, 1, 3]
    assert all(r["step_s"] > 0 for r in report["rows"])
    assert report["nodes"] in (0, 1, 3)
    if report["nodes"]:
        assert heads.tree.num_nodes == report["nodes"] + 1
    prompt = torch.randint(3, 100, (1, 8)).tolist()
    plain = engine.generate(prompt, max_new_tokens=6, stop_tokens=[]).tokens
    assert engine.generate(prompt, max_new_tokens=6, stop_tokens=[], speculative=heads).tokens == plain
