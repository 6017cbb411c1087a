"""EAGLE-3 drafting (flashtune/decoding/drafters/eagle): lossless greedy and sampling against independent
oracles (plain greedy decoding; the exact two-token distribution of the target in float64), and the drafter's
proposals against the training-time forward (model.Eagle3Draft.unrolled) on the same tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare

from flashtune.decoding import Engine
from flashtune.decoding.drafters.eagle import Eagle3Draft, Eagle3Drafter
from flashtune.recipes.eagle import Eagle3TrainConfig, fit_draft, heldout_accuracy, new_draft
from flashtune.recipes.eagle import measure_acceptance, ttt_loss, batch_of
from flashtune.errors import ConfigError
from tiny import VOCAB, ragged_prompts, random_ids, record_proposals, tiny_model

LAYERS = 4


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def engine(target):
    return Engine(target, max_batch_size=8, max_seq_len=128)


@pytest.fixture(scope="module")
def records(engine):
    """The target's own greedy continuations of 48 random prompts (self-distilled training data)."""
    prompts = [random_ids(1, 6, seed=s)[0].tolist() for s in range(48)]
    out = []
    for s in range(0, 48, 8):
        gen = engine.generate(prompts[s: s + 8], max_new_tokens=20, stop_tokens=[])
        out += [{"prompt_ids": p, "answer_ids": a} for p, a in zip(prompts[s: s + 8], gen.tokens)]
    return out


@pytest.fixture(scope="module")
def trained(target, records):
    """(draft before training, draft after 60 training-time-test steps, held-out records)."""
    cfg = Eagle3TrainConfig(draft_vocab_size=64, ttt_steps=3, steps=60, batch_size=8, lr=5e-3, warmup=5)
    draft = new_draft(target, records[:40], cfg)
    before = copy.deepcopy(draft)
    before.bind(target)
    fit_draft(target, draft, records[:40], cfg)
    return before, draft, records[40:]


def random_draft(target, seed=0):
    return Eagle3Draft.build(target, range(0, VOCAB, 2), seed=seed)  # every other token in the draft vocabulary


DRAFTERS = [dict(depth=4), dict(depth=4, topk=4, nodes=20), dict(depth=1, topk=4)]


@pytest.mark.parametrize("kw", DRAFTERS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_greedy_identical_random_draft(target, engine, kw):
    prompts = ragged_prompts()
    ref = engine.generate(prompts, max_new_tokens=16, stop_tokens=[])
    drafter = Eagle3Drafter(random_draft(target), **kw)
    out = engine.generate(prompts, max_new_tokens=16, stop_tokens=[], speculative=drafter)
    assert out.tokens == ref.tokens


@pytest.mark.parametrize("kw", [dict(depth=5), dict(depth=4, topk=4, nodes=24)], ids=["chain", "tree"])
def test_greedy_identical_trained_draft_and_faster(target, engine, trained, kw):
    before, draft, held = trained
    prompts = [r["prompt_ids"] for r in held]
    ref = engine.generate(prompts, max_new_tokens=20, stop_tokens=[])
    out = engine.generate(prompts, max_new_tokens=20, stop_tokens=[], speculative=Eagle3Drafter(draft, **kw))
    assert out.tokens == ref.tokens
    untrained = engine.generate(prompts, max_new_tokens=20, stop_tokens=[], speculative=Eagle3Drafter(before, **kw))
    assert out.accepted_per_step > untrained.accepted_per_step + 0.2


def test_training_drives_accuracy_up_and_loss_down(target, trained):
    before, draft, held = trained
    acc0, acc1 = heldout_accuracy(target, before, held, 3), heldout_accuracy(target, draft, held, 3)
    assert all(b > a + 0.1 for a, b in zip(acc0, acc1)), (acc0, acc1)
    batch = batch_of(held, torch.device("cpu"))
    with torch.no_grad():
        loss0 = float(ttt_loss(before, target, batch, 3)[0])
        loss1 = float(ttt_loss(draft, target, batch, 3)[0])
    assert loss1 < loss0
    assert measure_acceptance(target, draft, held, 20, stop_tokens=[]) > \
        measure_acceptance(target, before, held, 20, stop_tokens=[]) + 0.2


def _hf_feats(target, draft, seq):
    with torch.no_grad():
        hs = target.model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i] for i in draft.config.aux_layers], dim=-1)


def test_chain_drafts_follow_the_training_forward(target, engine, trained):
    """Every chain proposal equals the argmax of the unrolled training pass over the same tokens (HF's own
    hidden states as features): drafting and the training-time test see the same states."""
    _, draft, held = trained
    drafter = Eagle3Drafter(draft, depth=4)
    seen = record_proposals(drafter, lambda d, tokens: (int(d.L[0]), tokens[0].tolist()))
    prompt = held[0]["prompt_ids"]
    out = engine.generate([prompt], max_new_tokens=20, stop_tokens=[], speculative=drafter)
    seq = prompt + out.tokens[0]
    checked = 0
    for L, tokens in seen:
        if L + 1 > len(seq):
            break
        ids = seq[:L] + tokens[:-1]  # committed tokens, the root at position L, then the drafts fed back
        with torch.no_grad():
            logits = draft.unrolled(_hf_feats(target, draft, ids), torch.tensor([ids]), 4)
        for j in range(4):
            assert int(draft.draft_ids()[logits[j][0, L - 1].argmax()]) == tokens[1 + j], (L, j)
            checked += 1
    assert checked >= 8


def test_tree_children_are_top_k_of_their_parent(target, engine, trained):
    """Depth-1 nodes are the root's top-K draft tokens and every depth-2 node is among the top-K children of
    its parent under the unrolled training pass; the rewritten tree is prefix-closed with consistent depths."""
    _, draft, held = trained
    K = 3
    drafter = Eagle3Drafter(draft, depth=3, topk=K, nodes=9)
    seen = record_proposals(drafter, lambda d, tokens: (int(d.L[0]), tokens[0].tolist(), d.tree.parent.tolist(),
                                                        d.tree.depth.tolist()))
    prompt = held[1]["prompt_ids"]
    out = engine.generate([prompt], max_new_tokens=12, stop_tokens=[], speculative=drafter)
    seq = prompt + out.tokens[0]
    ids_of = draft.draft_ids()
    for L, tokens, parent, depth in seen[:4]:
        assert all(depth[i] == depth[parent[i]] + 1 and parent[i] < i for i in range(1, len(parent)))
        base = seq[:L + 1]
        with torch.no_grad():
            lg = draft.unrolled(_hf_feats(target, draft, base), torch.tensor([base]), 1)[0][0, L - 1]
        top1 = set(ids_of[lg.topk(K).indices].tolist())
        assert {tokens[i] for i in range(1, len(tokens)) if depth[i] == 1} <= top1
        for i in range(1, len(tokens)):
            if depth[i] == 2:
                ids = base + [tokens[parent[i]]]
                with torch.no_grad():
                    lg2 = draft.unrolled(_hf_feats(target, draft, ids), torch.tensor([ids]), 2)[1][0, L - 1]
                assert tokens[i] in set(ids_of[lg2.topk(K).indices].tolist())


def test_fused_layer_drafts_what_the_pytorch_layer_drafts(target, engine, trained):
    """On the Triton backend (the CUDA default; here in Triton's interpreter) the draft layer runs through the
    engine's kernels (eagle/fused.py): attention over live slots, the tree's levels as rows of a slot block.
    For a chain and a tree, its proposals step by step and its pending state equal the PyTorch layer's with a
    dense mask (the reference, `kernels = False`) on the same engine; the output equals plain greedy."""
    _, draft, held = trained
    triton_engine = Engine(target, max_batch_size=1, max_seq_len=40, attention="triton")
    prompts = [held[0]["prompt_ids"]]
    ref = engine.generate(prompts, max_new_tokens=8, stop_tokens=[])
    for kw in (dict(depth=3), dict(depth=3, topk=3, nodes=7)):
        runs = []
        for kernels in (True, False):
            d = Eagle3Drafter(draft, **kw)
            d.kernels = kernels
            seen = record_proposals(d, lambda d, tokens: (tokens.clone(), d.tree.parent.clone()))
            out = triton_engine.generate(prompts, max_new_tokens=8, stop_tokens=[], speculative=d)
            assert out.tokens == ref.tokens, kw
            assert (d.fused is not None) == kernels
            runs.append((seen, d._pending[:1].clone(), out.accepted_per_step))
        (fused, pend_f, tps_f), (plain, pend_p, tps_p) = runs
        assert len(fused) == len(plain) and tps_f == tps_p, kw
        for (tok_f, par_f), (tok_p, par_p) in zip(fused, plain):
            assert torch.equal(tok_f, tok_p) and torch.equal(par_f, par_p), kw
        torch.testing.assert_close(pend_f, pend_p, rtol=1e-4, atol=1e-5)
        assert tps_f > 1.0, kw  # drafts are accepted: the comparison covers catch-up over accepted drafts


def _exact_two_tokens(target, prompt, temperature):
    """p(t1, t2) of the target at `temperature`, in float64 -> [V, V]."""
    m = copy.deepcopy(target).double()
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        ids = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p2 = torch.softmax(m(ids).logits[:, -1] / temperature, -1)
    return p1[:, None] * p2


@pytest.mark.parametrize("kw", [dict(depth=2, temperature=1.0), dict(depth=2, topk=3, nodes=6)],
                         ids=["chain-sampled-drafts", "tree"])
def test_sampling_first_two_tokens_follow_the_target(kw):
    """4000 draws of the first two tokens at temperature 1 pass a chi-square test against the exact joint
    distribution (a sharpened tiny target, so that few cells hold the mass)."""
    target = tiny_model("llama", num_hidden_layers=LAYERS, seed=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
    engine = Engine(target, max_batch_size=16, max_seq_len=32)
    drafter = Eagle3Drafter(random_draft(target, seed=3), **kw)
    prompt = random_ids(1, 5, seed=7)[0].tolist()
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for call in range(250):
        out = engine.generate([prompt] * 16, max_new_tokens=2, temperature=1.0, seed=call, stop_tokens=[],
                              speculative=drafter)
        for t in out.tokens:
            counts[t[0], t[1]] += 1
    p = _exact_two_tokens(target, prompt, 1.0).flatten()
    c = counts.flatten()
    n = c.sum()
    big = p * n >= 5
    obs = torch.cat([c[big], c[~big].sum()[None]])
    exp = torch.cat([p[big], p[~big].sum()[None]]) * n
    assert int(big.sum()) >= 10
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_sampled_drafts_come_from_the_call_generator(target, engine):
    """Same seed, same output; another seed, another output (the drafts draw from the call's generator)."""
    drafter = Eagle3Drafter(random_draft(target), depth=3, temperature=1.0)
    prompts = ragged_prompts()
    a = engine.generate(prompts, max_new_tokens=12, temperature=1.0, seed=5, stop_tokens=[], speculative=drafter)
    b = engine.generate(prompts, max_new_tokens=12, temperature=1.0, seed=5, stop_tokens=[], speculative=drafter)
    c = engine.generate(prompts, max_new_tokens=12, temperature=1.0, seed=6, stop_tokens=[], speculative=drafter)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_bad_settings_raise_one_clear_error(target):
    with pytest.raises(ConfigError, match="topk=1"):
        Eagle3Drafter(random_draft(target), topk=3, temperature=1.0)
    with pytest.raises(ConfigError, match="nodes"):
        Eagle3Drafter(random_draft(target), depth=2, topk=2, nodes=100)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,invariant", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-inv"])
def test_gpu_greedy_identical_with_cuda_graphs(dtype, invariant):
    """On CUDA (Triton backend, whole-step CUDA graphs): chain and dynamic-tree greedy output equals plain greedy,
    in fp32 and in bf16 with the batch-invariant kernels; every step is captured (a capture failure, which
    would fall back to eager kernels with a warning, is an error here)."""
    import warnings

    warnings.simplefilter("error", UserWarning)
    target = tiny_model("llama", num_hidden_layers=LAYERS).to("cuda", dtype)
    engine = Engine(target, max_batch_size=4, max_seq_len=128, invariant=invariant)
    prompts = ragged_prompts()
    ref = engine.generate(prompts, max_new_tokens=40, stop_tokens=[])
    for kw in (dict(depth=4), dict(depth=4, topk=4, nodes=20)):
        drafter = Eagle3Drafter(random_draft(target), **kw)
        for _ in range(2):  # the second call replays the captured graphs
            out = engine.generate(prompts, max_new_tokens=40, stop_tokens=[], speculative=drafter)
            assert out.tokens == ref.tokens, kw
    sampled = engine.generate(prompts, max_new_tokens=20, temperature=1.0, seed=0, stop_tokens=[],
                              speculative=Eagle3Drafter(random_draft(target), depth=3, temperature=1.0))
    assert all(len(t) == 20 for t in sampled.tokens)
    assert engine._graphs.all_captured


def test_engine_hands_over_the_inputs_of_the_aux_layers(target, engine):
    """trunk = layer ids: the engine's prefill features are the concatenated inputs of those layers, as HF's
    own hidden_states give them (hidden_states[i] is layer i's input)."""
    prompt = random_ids(1, 9, seed=4)[0].tolist()
    with torch.inference_mode():
        feats = engine._prefill_prompts([prompt], trunk=(2, 0, 3))[0]
        hs = target.model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
    want = torch.cat([hs[2], hs[0], hs[3]], dim=-1)
    torch.testing.assert_close(feats[:, : len(prompt)], want, rtol=1e-5, atol=1e-5)


class _WarmupGraphs:
    """A CPU stand-in for the engine's CUDA-graph cache that keeps what matters to a stateful drafter: a
    capture first runs the step three times as warm-up (executing it, as `_GraphCache._capture` does on the
    GPU), then records it without running it; every replay runs it once."""

    @staticmethod
    def capture(fn, args):
        static = [a.clone() for a in args]
        for _ in range(3):
            out = fn(*static)

        class Replay:
            def replay(self):
                res = fn(*static)
                if isinstance(res, torch.Tensor):
                    out.copy_(res)
                elif res is not None:
                    for o, r in zip(out, res):
                        o.copy_(r)
        return Replay(), static, out, fn


@pytest.mark.parametrize("make", ["eagle3", "mtp"])
def test_capture_warmup_leaves_a_stateful_drafter_where_it_was(target, make):
    """The first call of a batch size captures the step; the warm-up runs before the capture must not advance
    the drafter (EAGLE-3's or MTP's committed lengths and pending state): its drafts then equal those of an
    engine without graphs, step for step. Without `graph_state` they run four steps ahead of the target."""
    from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules
    from flashtune.decoding.engine import _GraphCache

    def drafter():
        if make == "eagle3":
            return Eagle3Drafter(random_draft(target, seed=3), depth=3)
        torch.manual_seed(3)
        return MTPDrafter(MTPModules.build(target, depth=1), k=2)

    runs = []
    for graphs in (False, True):
        engine = Engine(target, max_batch_size=4, max_seq_len=96)
        if graphs:
            engine._graphs = _GraphCache(True)
            engine._graphs._capture = _WarmupGraphs.capture
        d = drafter()
        proposals = record_proposals(d)
        out = engine.generate(ragged_prompts(), max_new_tokens=12, stop_tokens=[], speculative=d)
        # the replayed steps' drafts (the warm-ups record 3 extra at the start), and where the drafter ended
        runs.append((out.tokens, proposals[-8:], d.L.clone(), d._pending.clone()))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][2], runs[1][2])  # the same committed lengths; the pending state up to rounding
    torch.testing.assert_close(runs[0][3], runs[1][3], rtol=1e-4, atol=1e-5)  # (the graphed prefill is padded)


def test_sampled_steps_are_captured_whole_and_replay_what_eager_draws(target):
    """Sampling steps (plain, EAGLE-3 chain with sampled drafts, EAGLE-3 tree, MTP with sampled drafts,
    Medusa's typical acceptance) run whole in the CUDA-graph cache: their random numbers are read from the
    step noise that the engine refills outside the graph. With the same seed, an engine whose cache captures
    (a CPU stand-in that runs warm-ups, then replays) gives exactly the tokens of one without graphs."""
    from flashtune.decoding import MedusaConfig, MedusaHeads
    from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules
    from flashtune.decoding.engine import _GraphCache

    torch.manual_seed(5)
    mtp = MTPModules.build(target, depth=1)
    medusa = MedusaHeads(MedusaConfig(hidden_size=target.config.hidden_size, vocab_size=VOCAB, num_heads=2, topk=3))
    cases = [(None, "lossless"), (Eagle3Drafter(random_draft(target, seed=4), depth=3, temperature=1.0), "lossless"),
             (Eagle3Drafter(random_draft(target, seed=4), depth=2, topk=3, nodes=5), "lossless"),
             (MTPDrafter(mtp, k=2, temperature=1.0), "lossless"), (medusa, "typical")]
    for drafter, acceptance in cases:
        outs, keys = [], None
        for graphs in (False, True):
            engine = Engine(target, max_batch_size=4, max_seq_len=96)
            if graphs:
                engine._graphs = _GraphCache(True)
                engine._graphs._capture = _WarmupGraphs.capture
            out = engine.generate(ragged_prompts(), max_new_tokens=10, temperature=1.0, top_k=20, seed=11,
                                  stop_tokens=[], speculative=drafter, acceptance=acceptance)
            outs.append(out.tokens)
            keys = list(engine._graphs.graphs)
        name = type(drafter).__name__
        assert outs[0] == outs[1], name
        assert any(k[0] == "step" and "sample" in k or "typical" in k for k in keys), (name, keys)


def test_a_failed_capture_leaves_every_other_step_on_its_graph():
    """One step whose capture fails (a host copy, say) runs eagerly, with a warning naming the line; the
    other keys keep capturing and replaying (before, one failure sent the whole engine eager)."""
    from flashtune.decoding.engine import _GraphCache

    cache = _GraphCache(True)
    state = torch.zeros(1)

    def good(x):
        state.add_(1)
        return x + 1

    def bad(x):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    def capture(fn, args):
        if fn is bad:
            fn(*args)
        return _WarmupGraphs.capture(fn, args)

    cache._capture = capture
    x = torch.ones(2)
    assert torch.equal(cache("good", good, x), x + 1)
    with pytest.warns(UserWarning, match=r"failed at \S+\.py:\d+ .*Cannot copy.*this step runs eagerly"):
        with pytest.raises(RuntimeError):  # run eagerly after the failed capture: the step itself raises
            cache("bad", bad, x)
    assert cache.failed == {"bad"} and cache.enabled and not cache.all_captured
    assert "good" in cache.graphs and torch.equal(cache("good", good, x * 2), x * 2 + 1)
