"""Medusa heads and speculative decoding through the engine: lossless greedy for any heads, oracle and
always-wrong drafters, KV compaction, heads' init and files."""


import pytest
import torch
from tiny import VOCAB, ragged_prompts, tiny_model

from flashtune.decoding import Engine, MedusaHeads
from flashtune.decoding import MedusaConfig
from flashtune.decoding.tree import MC_SIM_7B_63, chain_paths, tree_buffers
from flashtune.errors import ConfigError, FlashtuneError


pytestmark = pytest.mark.usefixtures("one_thread")




def _random_heads(engine, num_heads=4, seed=0, std=0.5):
    torch.manual_seed(seed)
    heads = MedusaHeads.for_model(engine.model.lm_head.weight, num_heads=num_heads)
    for h in heads.heads:
        for blk in h.blocks:
            torch.nn.init.normal_(blk.linear.weight, std=std)
    return heads


class ScriptDrafter:
    """A stateful chain drafter that reads a known continuation: `shift=0` gives the oracle (every draft
    right), `shift=1` proposes token+1 (every draft wrong). Exercises the eager drafter path (like MTP)."""

    stateless = False

    def __init__(self, continuations, depth, shift):
        self.cont, self.shift = continuations, shift
        self.tree = tree_buffers(chain_paths(depth))
        self.depth = depth

    def start(self, engine, hidden, tokens, lengths, root):
        self.count = torch.ones(hidden.shape[0], dtype=torch.long)  # the prefill emitted one token

    def propose(self, hidden, root):
        rows = []
        for b in range(root.shape[0]):
            c = int(self.count[b])
            fut = (self.cont[b] + [0] * (self.depth + 1))[c: c + self.depth]
            rows.append([int(root[b])] + [(t + self.shift) % VOCAB for t in fut])
        return torch.tensor(rows), None

    def accept(self, hidden, tree_tokens, acc, path):
        self.count += acc.accepted + 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_medusa_greedy_equals_plain_greedy_with_random_heads(arch):
    model = tiny_model(arch)
    engine = Engine(model, max_batch_size=3, max_seq_len=160)
    prompts = ragged_prompts()
    plain = engine.generate(prompts, max_new_tokens=30, stop_tokens=[]).tokens
    heads = _random_heads(engine)
    spec = engine.generate(prompts, max_new_tokens=30, stop_tokens=[], speculative=heads)
    assert spec.tokens == plain
    small = _random_heads(engine, num_heads=2, seed=1)
    small.set_tree([[0], [1], [2], [0, 0], [2, 1]])
    assert engine.generate(prompts, max_new_tokens=30, stop_tokens=[], speculative=small).tokens == plain


def test_fresh_heads_equal_the_lm_head_and_blocks_are_distinct():
    engine = Engine(tiny_model("llama"), max_batch_size=1, max_seq_len=32)
    heads = MedusaHeads.for_model(engine.model.lm_head.weight, num_heads=3, num_layers=2)
    h = torch.randn(5, 32)
    out = heads(h)  # [5, 3, V]
    for k in range(3):
        torch.testing.assert_close(out[:, k], engine.model.lm_head(h), atol=0, rtol=0)
    n_params = sum(p.numel() for p in heads.parameters())
    assert n_params == 3 * (2 * (32 * 32 + 32) + 32 * VOCAB)  # no shared blocks
    ptrs = {blk.linear.weight.data_ptr() for hd in heads.heads for blk in hd.blocks}
    assert len(ptrs) == 6


def test_oracle_drafter_gives_depth_plus_one_tokens_per_step_and_wrong_gives_one():
    model = tiny_model("llama")
    engine = Engine(model, max_batch_size=3, max_seq_len=160)
    prompts = ragged_prompts()
    plain = engine.generate(prompts, max_new_tokens=33, stop_tokens=[]).tokens
    oracle = engine.generate(prompts, max_new_tokens=33, stop_tokens=[],
                             speculative=ScriptDrafter(plain, 3, shift=0))
    assert oracle.tokens == plain
    assert oracle.accepted_per_step == 4.0 and oracle.steps == 8  # 1 + 8 steps * 4 tokens = 33
    wrong = engine.generate(prompts, max_new_tokens=33, stop_tokens=[],
                            speculative=ScriptDrafter(plain, 3, shift=1))
    assert wrong.tokens == plain and wrong.accepted_per_step == 1.0


def test_compacted_cache_equals_a_fresh_prefill():
    model = tiny_model("llama")
    engine = Engine(model, max_batch_size=3, max_seq_len=160)
    prompts = ragged_prompts()
    plain = engine.generate(prompts, max_new_tokens=25, stop_tokens=[]).tokens
    oracle = ScriptDrafter(plain, 3, shift=0)
    engine.generate(prompts, max_new_tokens=25, stop_tokens=[], speculative=_random_heads(engine))
    k_spec, v_spec = engine.cache.k.clone(), engine.cache.v.clone()
    fresh = Engine(model, max_batch_size=3, max_seq_len=160)
    fresh.prefill([p + t[:-1] for p, t in zip(prompts, plain)])
    for b, (p, t) in enumerate(zip(prompts, plain)):
        n = len(p) + len(t) - 1  # every emitted token but the last is committed to the cache
        torch.testing.assert_close(k_spec[:, b, :, :n], fresh.cache.k[:, b, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_spec[:, b, :, :n], fresh.cache.v[:, b, :, :n], atol=1e-5, rtol=1e-5)
    assert oracle.depth == 3


def test_speculative_sampling_runs_seeded_and_typical_differs():
    model = tiny_model("llama")
    engine = Engine(model, max_batch_size=3, max_seq_len=160)
    prompts = ragged_prompts()
    heads = _random_heads(engine, std=0.0)  # fresh heads: head k proposes the LM head's top-k
    a = engine.generate(prompts, max_new_tokens=20, temperature=0.8, seed=3, stop_tokens=[], speculative=heads)
    b = engine.generate(prompts, max_new_tokens=20, temperature=0.8, seed=3, stop_tokens=[], speculative=heads)
    assert a.tokens == b.tokens and all(len(t) == 20 for t in a.tokens)
    t = engine.generate(prompts, max_new_tokens=20, temperature=0.8, seed=3, stop_tokens=[], speculative=heads,
                        acceptance="typical")
    assert all(len(x) == 20 for x in t.tokens)


def test_heads_save_load_and_exports(tmp_path):
    engine = Engine(tiny_model("llama"), max_batch_size=1, max_seq_len=32)
    heads = _random_heads(engine, num_heads=3)
    heads.set_tree([[0], [1], [0, 0], [0, 0, 0]])
    heads.save(tmp_path / "h")
    back = MedusaHeads.load(tmp_path / "h")
    h = torch.randn(4, 32)
    torch.testing.assert_close(back(h), heads(h), atol=0, rtol=0)
    assert back.tree.paths == heads.tree.paths
    with pytest.raises(FlashtuneError, match="train-heads"):
        MedusaHeads.load(tmp_path / "nothing")
    with pytest.raises(ConfigError):
        MedusaConfig(32, VOCAB, num_heads=0)
    with pytest.raises(ConfigError):
        heads.set_tree([[0, 0, 0, 0]] + [[0], [0, 0], [0, 0, 0]])


def test_63_path_tree_with_batch():
    model = tiny_model("qwen2")
    engine = Engine(model, max_batch_size=3, max_seq_len=200)
    prompts = ragged_prompts()
    plain = engine.generate(prompts, max_new_tokens=20, stop_tokens=[]).tokens
    heads = _random_heads(engine, num_heads=4, seed=5)
    heads.set_tree(MC_SIM_7B_63)
    assert heads.tree.num_nodes == 64
    assert engine.generate(prompts, max_new_tokens=20, stop_tokens=[], speculative=heads).tokens == plain


def test_drafting_logits_with_concatenated_blocks_equal_the_heads_forward():
    """propose's one-matmul form of the K ResBlocks gives the same logits as running each head."""
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(hidden_size=16, vocab_size=VOCAB, num_heads=3, topk=4))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    hidden = torch.randn(5, 16)
    torch.testing.assert_close(heads._draft_logits(hidden), heads(hidden), atol=1e-5, rtol=1e-5)
