"""EAGLE-3 files and data: the served layouts (vLLM / SGLang) round-trip bit for bit, the aux layer ids are
written per engine, the native save/load round-trips; Magpie's pieces (pre-query template, dropping unfinished
turns, deduplication) and self-distillation run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flashtune.decoding import Engine
from flashtune.decoding.drafters.eagle import Eagle3Draft, Eagle3Drafter
from flashtune.decoding.drafters.eagle import synth
from flashtune.decoding.drafters.eagle.export import export_eagle3, import_eagle3
from flashtune.errors import FlashtuneError
from tiny import VOCAB, ragged_prompts, record_proposals, tiny_model

LAYERS = 6


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def draft(target):
    d = Eagle3Draft.build(target, range(5, VOCAB, 3), seed=1)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.01 * torch.randn_like(p))  # norms away from 1: a round trip that drops one shows
    return d


def test_served_layout_names_shapes_and_aux_ids(draft, tmp_path):
    c = draft.config
    assert c.aux_layers == [2, 3, 3]  # (2, L//2, L-3) for L = 6: the inputs of those layers
    export_eagle3(draft, tmp_path / "vllm", "vllm", dtype="float32")
    export_eagle3(draft, tmp_path / "sglang", "sglang", dtype="float32")
    v = json.loads((tmp_path / "vllm" / "config.json").read_text())
    s = json.loads((tmp_path / "sglang" / "config.json").read_text())
    assert v["architectures"] == ["LlamaForCausalLMEagle3"] and v["draft_vocab_size"] == len(range(5, VOCAB, 3))
    assert v["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]
    assert s["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]  # SGLang adds one when capturing
    t = load_file(str(tmp_path / "vllm" / "model.safetensors"))
    h = c.hidden_size
    assert t["fc.weight"].shape == (h, 3 * h)
    assert t["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * h
    assert t["lm_head.weight"].shape == (c.draft_vocab_size, h)
    assert "midlayer.hidden_norm.weight" in t and "norm.weight" in t and "embed_tokens.weight" not in t
    assert torch.equal(torch.arange(c.draft_vocab_size) + t["d2t"], torch.arange(5, VOCAB, 3))


@pytest.mark.parametrize("engine_name", ["vllm", "sglang", "speculators"])
def test_export_import_round_trip_reproduces_drafts(target, draft, tmp_path, engine_name):
    export_eagle3(draft, tmp_path, engine_name, dtype="float32")
    back = import_eagle3(tmp_path, target)
    assert back.config.aux_layers == draft.config.aux_layers
    for (k, a), (_, b) in zip(sorted(draft.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    engine = Engine(target, max_batch_size=4, max_seq_len=64)
    seen = []
    for d in (draft, back):
        drafter = Eagle3Drafter(d, depth=3, topk=2, nodes=5)
        props = record_proposals(drafter)
        engine.generate(ragged_prompts(), max_new_tokens=6, stop_tokens=[], speculative=drafter)
        seen.append(torch.stack(props))
    assert torch.equal(seen[0], seen[1])


def test_native_save_load_and_wrong_target(target, draft, tmp_path):
    draft.save(tmp_path)
    back = Eagle3Draft.load(tmp_path, target)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), back.state_dict().values()))
    other = tiny_model("llama", num_hidden_layers=LAYERS, hidden_size=48)
    with pytest.raises(FlashtuneError, match="hidden_size"):
        Eagle3Draft.load(tmp_path, other)
    with pytest.raises(FlashtuneError, match="train-heads --method eagle3"):
        Eagle3Draft.load(tmp_path / "missing", target)


def test_dedupe_normalises_and_drops_near_duplicates():
    texts = ["How do I bake bread at home?", "how do I bake bread at home", "  How do I bake BREAD at home!? ",
             "How do I bake bread at home quickly?", "Write a poem about the sea.", ""]
    assert synth.dedupe(texts) == ["How do I bake bread at home?", "Write a poem about the sea."]
    assert synth.dedupe(["a b c d e f", "a b c x y z"]) == ["a b c d e f", "a b c x y z"]


def test_dedupe_index_equals_all_pairs():
    """The prefix-filtered index keeps exactly what comparing every pair keeps (random texts over a small
    vocabulary, many near-duplicates, thresholds around the default)."""
    import random

    def all_pairs(texts, threshold):
        kept, seen, grams = [], set(), []
        for t in texts:
            n = synth.normalise(t)
            if not n or n in seen:
                continue
            g = synth._trigrams(n)
            if any(len(g & h) / max(1, len(g | h)) > threshold for h in grams):
                continue
            seen.add(n), grams.append(g), kept.append(t.strip())
        return kept

    rng = random.Random(0)
    words = "a b c d e f g h".split()
    base = [[rng.choice(words) for _ in range(rng.randint(1, 12))] for _ in range(40)]
    texts = []
    for _ in range(600):
        w = list(rng.choice(base))
        for _ in range(rng.randint(0, 3)):  # a few edits of a base text
            w[rng.randrange(len(w))] = rng.choice(words)
        texts.append(" ".join(w))
    for threshold in (0.3, 0.5, 0.7, 0.9):
        got = synth.dedupe(texts, threshold)
        assert got == all_pairs(texts, threshold)
        assert 1 < len(got) < len(texts)  # the case is not trivial


class _Tok:
    """A stand-in tokenizer: one id per character (40 + code % 50), a chat template, end of turn = id 2."""

    chat_template = "yes"
    eos_token = "<e>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<u>{m['content']}<e>" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [40 + ord(ch) % 50 for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i % 26)) if i > 2 else " " for i in ids)


def test_magpie_keeps_finished_distinct_turns(monkeypatch):
    monkeypatch.setattr(synth, "end_of_turn_ids", lambda tok: [2])
    assert synth.pre_query_template(_Tok()) == "<u>"
    calls = []

    def generate(prompts, **kw):
        calls.append(kw["seed"])
        rows = [[5, 6, 1, 7, 8, 1, 9, 2],  # finished: "fg hi j" (3 words)
                [5, 6, 1, 7, 8, 1, 9, 2],  # its duplicate
                [10, 11, 1, 12, 1, 13, 14],  # never ended: dropped
                [3, 4, 1, 2],  # too short: dropped
                [15, 16, 1, 17, 18, 1, 19, 20, 2]]
        return SimpleNamespace(tokens=rows[: len(prompts)])

    got = synth.magpie_prompts(SimpleNamespace(generate=generate), _Tok(), n=2, seed=3, batch_size=5)
    assert got == ["fg hi j", "pq rs tu"]
    assert calls == [300009]  # one round was enough; the seed is the recipe's


def test_self_distill_answers_are_the_targets_greedy_output(target, monkeypatch):
    monkeypatch.setattr(synth, "end_of_turn_ids", lambda tok: [2])
    engine = Engine(target, max_batch_size=4, max_seq_len=64)
    tok = _Tok()
    recs = synth.self_distill(engine, tok, ["ab", "cde"], max_new_tokens=5, batch_size=4)
    for r in recs:
        assert r["prompt_ids"] == tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                              add_generation_prompt=True))["input_ids"]
    plain = engine.generate([r["prompt_ids"] for r in recs], max_new_tokens=5, stop_tokens=[2]).tokens
    assert [r["answer_ids"] for r in recs] == plain


def test_train_eagle3_recipe_writes_a_loadable_draft(target, tmp_path):
    """The whole recipe on a synthesised-data file: draft, report and data path on disk; the draft loads and
    drafts losslessly; a config error names its field."""
    from flashtune.recipes.eagle import Eagle3TrainConfig, train_eagle3
    from flashtune.errors import ConfigError
    from tiny import random_ids

    engine = Engine(target, max_batch_size=8, max_seq_len=64)
    prompts = [random_ids(1, 5, seed=s)[0].tolist() for s in range(12)]
    answers = engine.generate(prompts[:8], max_new_tokens=10, stop_tokens=[]).tokens + \
        engine.generate(prompts[8:], max_new_tokens=10, stop_tokens=[]).tokens
    lines = [json.dumps({"recipe": "magpie+self-distill", "seed": 0, "n_requested": 12, "n": 12})]
    lines += [json.dumps({"prompt": f"p{i}", "prompt_ids": p, "answer_ids": a}) for i, (p, a) in
              enumerate(zip(prompts, answers))]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = Eagle3TrainConfig(out_dir=str(tmp_path / "out"), data=str(data), draft_vocab_size=48, ttt_steps=2,
                            steps=5, batch_size=4, holdout=4, device="cpu")
    report = train_eagle3(cfg, model=target, tokenizer=None, log=lambda *_: None)
    assert report["records"] == 12 and report["data"] == str(data) and len(report["heldout_step_accuracy"]) == 2
    assert (tmp_path / "out" / "eagle3_report.json").is_file()
    draft = Eagle3Draft.load(tmp_path / "out", target)
    ref = engine.generate(prompts[:3], max_new_tokens=8, stop_tokens=[])
    out = engine.generate(prompts[:3], max_new_tokens=8, stop_tokens=[], speculative=Eagle3Drafter(draft, depth=3))
    assert out.tokens == ref.tokens
    with pytest.raises(ConfigError, match="ttt_steps"):
        Eagle3TrainConfig(ttt_steps=0)


def test_import_ignores_a_target_embedding_and_refuses_foreign_tensors(target, draft, tmp_path):
    """Some trainers save the target's embedding beside an EAGLE-3 draft: it is ignored (the draft shares the
    target's). Any other tensor the draft lacks is one line naming it, never silently dropped."""
    from safetensors.torch import save_file

    export_eagle3(draft, tmp_path, "vllm", dtype="float32")
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "embed_tokens.weight": torch.zeros(VOCAB, draft.config.hidden_size)}, str(weights))
    back = import_eagle3(tmp_path, target)
    for (k, a), (_, b) in zip(sorted(draft.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    save_file({**tensors, "midlayer.self_attn.q_norm.weight": torch.ones(4)}, str(weights))
    with pytest.raises(FlashtuneError, match="q_norm") as exc:
        import_eagle3(tmp_path, target)
    assert "\n" not in str(exc.value)
