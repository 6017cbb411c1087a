"""Data: the E2E loader and split, the generated E2E-style data, prompts, label masking, collation."""

from __future__ import annotations

import csv
import os
import string

import pytest
import torch

from flashtune.data import (IGNORE_INDEX, Collator, E2EExample, bucket_batches, build_prompt, encode_prompt,
                            generate_e2e_style, load_e2e_csv, make_lm_dataset, make_text_dataset, parse_mr,
                            split_by_mr, stop_token_ids)
from flashtune.data.e2e import E2E_ATTRIBUTES, default_e2e_path, format_mr
from flashtune.errors import ConfigError, FlashtuneError

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def char_tokenizer(chat: bool = True):
    """A lower-casing character tokenizer with ids < 96 (fits tests/tiny.py's models): pad 0, bos 1, eos 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.ascii_lowercase + string.digits + " .,:;|[]-'£!?()&/\n":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t


def write_csv(path, rows, header=("mr", "ref", "fixed")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(r)


def test_load_csv_groups_references_per_mr(tmp_path):
    rows = [("name[A], area[riverside]", "A is by the river.", 0), ("name[B]", "B.", 1),
            ("name[A], area[riverside]", "By the river is A.", 0), ("name[C], near[A]", "C, near A, is nice", 0),
            ("name[B]", "There is B.", 0)]
    write_csv(tmp_path / "d.csv", rows)
    got = load_e2e_csv(tmp_path / "d.csv")
    expected: dict[str, list[str]] = {}
    for mr, ref, _ in rows:
        expected.setdefault(mr, []).append(ref)
    assert [(e.mr, e.refs) for e in got] == list(expected.items())
    assert [e.mr for e in load_e2e_csv(tmp_path / "d.csv", limit=2)] == list(expected)[:2]


def test_load_csv_errors_are_one_line(tmp_path):
    with pytest.raises(FlashtuneError, match="does not exist") as exc:
        load_e2e_csv(tmp_path / "missing.csv")
    assert "\n" not in str(exc.value)
    write_csv(tmp_path / "bad.csv", [("x", "y")], header=("input", "output"))
    with pytest.raises(FlashtuneError, match="'mr' and 'ref'"):
        load_e2e_csv(tmp_path / "bad.csv")


@pytest.mark.skipif(not default_e2e_path().is_file(), reason="the shared E2E csv is not on this machine")
def test_real_e2e_counts_match_its_readme():
    examples = load_e2e_csv()
    assert len(examples) == 1484                       # README: 1,484 distinct MRs
    assert sum(len(e.refs) for e in examples) == 4299  # README: 4,299 rows
    for e in examples[:50]:
        assert {k for k, _ in parse_mr(e.mr)} <= set(E2E_ATTRIBUTES)


def test_parse_and_format_mr_round_trip():
    mr = "name[The Eagle], eatType[coffee shop], priceRange[£20-25], customer rating[3 out of 5]"
    pairs = parse_mr(mr)
    assert pairs == [("name", "The Eagle"), ("eatType", "coffee shop"), ("priceRange", "£20-25"),
                     ("customer rating", "3 out of 5")]
    assert format_mr(pairs) == mr
    with pytest.raises(FlashtuneError, match="cannot parse"):
        parse_mr("name[X] area[y]")


def test_split_by_mr_is_disjoint_seeded_and_sized():
    examples = generate_e2e_style(60, seed=3)
    flat = [E2EExample(e.mr, [r]) for e in examples for r in e.refs]   # ungrouped: one row per reference
    train, val = split_by_mr(flat, 10, seed=1)
    train_mrs, val_mrs = {e.mr for e in train}, {e.mr for e in val}
    assert len(val_mrs) == 10 and not train_mrs & val_mrs
    assert train_mrs | val_mrs == {e.mr for e in examples}
    assert len(train) + len(val) == len(flat)
    again = split_by_mr(flat, 10, seed=1)
    assert [e.mr for e in again[1]] == [e.mr for e in val]
    other = split_by_mr(flat, 10, seed=2)[1]
    assert {e.mr for e in other} != val_mrs
    assert len({e.mr for e in split_by_mr(examples, 0.25, seed=0)[1]}) == 15
    with pytest.raises(ConfigError, match="val_size"):
        split_by_mr(examples, 60)


# Surface forms that realize each value (the generator must state every attribute of its MR).
def _mentions(ref: str, attr: str, value: str) -> bool:
    r = ref.lower()
    if attr in ("name", "near"):
        return value.lower() in r
    if attr == "eatType":
        return value in r
    if attr == "food":
        return value.lower() in r
    if attr == "area":
        return ("river" in r) if value == "riverside" else ("centre" in r)
    if attr == "familyFriendly":
        negated = any(w in r for w in ("not family", "not kid", "not child", "not welcome", "adults only"))
        friendly = any(w in r for w in ("famil", "kid", "child", "adults"))
        return friendly and (negated if value == "no" else not negated)
    if attr == "priceRange":
        words = {"cheap": ("cheap", "low", "inexpensive"), "moderate": ("moderate", "average"),
                 "high": ("high", "expensive"), "less than £20": ("£20",), "£20-25": ("£20",),
                 "more than £30": ("£30",)}[value]
        return any(w in r for w in words)
    if attr == "customer rating":
        return value in r and "rat" in r
    raise AssertionError(attr)


def test_generated_data_is_deterministic_distinct_and_faithful():
    a = generate_e2e_style(300, seed=7)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in generate_e2e_style(300, seed=7)]
    assert [e.mr for e in a] != [e.mr for e in generate_e2e_style(300, seed=8)]
    assert len({e.mr for e in a}) == 300
    seen_attrs = set()
    for e in a:
        pairs = parse_mr(e.mr)
        keys = [k for k, _ in pairs]
        assert keys[0] == "name" and keys == [k for k in E2E_ATTRIBUTES if k in keys]   # E2E order
        assert 2 <= len(e.refs) <= 4 and len(set(e.refs)) == len(e.refs)
        seen_attrs |= set(keys)
        for ref in e.refs:
            for k, v in pairs:
                assert _mentions(ref, k, v), (k, v, ref)
    assert seen_attrs == set(E2E_ATTRIBUTES)
    # Varied phrasings: the reference "shapes" (text with values blanked) are many.
    shapes = set()
    for e in a:
        for ref in e.refs:
            s = ref
            for _, v in parse_mr(e.mr):
                s = s.replace(v, "_")
            shapes.add(s)
    assert len(shapes) > 200


def test_prompt_uses_the_chat_template_and_masks_the_prompt():
    tok = char_tokenizer(chat=True)
    ex = [E2EExample("name[Blue Oak], area[riverside]", ["Blue Oak is by the river.", "By the river: Blue Oak."])]
    prompt = build_prompt(tok, ex[0].mr)
    assert prompt.startswith("<s>system: ") and prompt.endswith("<s>assistant: ")
    assert "name: Blue Oak | area: riverside" in prompt
    data = make_lm_dataset(ex, tok)
    assert len(data) == 2
    for item, ref in zip(data, ex[0].refs):
        p = encode_prompt(tok, ex[0].mr)
        assert item["input_ids"][:len(p)] == p
        assert item["labels"][:len(p)] == [IGNORE_INDEX] * len(p)
        target = [t for t in item["labels"] if t != IGNORE_INDEX]
        assert item["input_ids"][len(p):] == target
        assert tok.decode(target) == ref.lower() + "</s>"
    assert stop_token_ids(tok) == [tok.eos_token_id]
    assert len(make_lm_dataset(ex, tok, refs="first")) == 1


def test_prompt_without_chat_template_ends_with_eos():
    tok = char_tokenizer(chat=False)
    data = make_lm_dataset([E2EExample("name[X]", ["X."])], tok)
    target = [t for t in data[0]["labels"] if t != IGNORE_INDEX]
    assert tok.decode(target) == " x.</s>"
    assert tok.decode(data[0]["input_ids"]).endswith("description: x.</s>")


def test_collator_pads_right_and_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = Collator(pad_token_id=0)(examples)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = Collator(pad_token_id=0, padding_side="left")(examples)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].dtype == torch.long
    with pytest.raises(ConfigError, match="padding_side"):
        Collator(0, padding_side="middle")


def test_text_dataset_packs_the_token_stream():
    tok = char_tokenizer(chat=False)
    texts = ["hello world.", "a second text", "three"]
    blocks = make_text_dataset(texts, tok, block_size=8)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 8] for i in range(0, len(stream) - 7, 8)]
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_bucket_batches_cover_everything_with_less_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(400)]
    batches = bucket_batches(lengths, 8, seed=0, window=10)
    assert sorted(i for b in batches for i in b) == list(range(400))

    def waste(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    order = list(range(400))
    rng.shuffle(order)
    assert waste(batches) < 0.5 * waste([order[i:i + 8] for i in range(0, 400, 8)])


def test_head_training_prompt_files_are_checked_at_the_edge(tmp_path):
    from flashtune.data import head_training_prompts

    tok = char_tokenizer()
    (tmp_path / "p.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    ids, examples = head_training_prompts(str(tmp_path / "p.txt"), 5, 0, tok)
    asked = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("one", "two")]  # each line is asked as a one-turn chat, as generation will see it
    assert ids == [tok(a, add_special_tokens=False)["input_ids"] for a in asked] and examples is None
    plain = char_tokenizer(chat=False)
    assert head_training_prompts(str(tmp_path / "p.txt"), 5, 0, plain)[0] == [plain("one")["input_ids"],
                                                                             plain("two")["input_ids"]]
    (tmp_path / "l1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(FlashtuneError, match="not UTF-8") as exc:
        head_training_prompts(str(tmp_path / "l1.txt"), 5, 0, tok)
    assert "l1.txt" in str(exc.value) and "\n" not in str(exc.value)


def test_head_training_prompts_from_chat_and_prompt_data(tmp_path):
    """Drafters train on the prompts of the data people keep: the first user turn of chat `messages` (with or
    without answers), `prompt` strings or conversational prompts, from JSONL or CSV; plain text, a missing
    file and an unreachable Hub name are one clear line each."""
    import json

    from flashtune.data import head_training_prompts

    tok = char_tokenizer()

    def asked(q):
        s = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        return tok(s, add_special_tokens=False)["input_ids"]

    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi there "},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "later turn"}]},
            {"messages": [{"role": "user", "content": "no answer yet"}]},
            {"messages": [{"role": "assistant", "content": "no user turn"}]},
            {"messages": "not a list"}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert head_training_prompts(str(chat), 10, 0, tok) == ([asked("hi there"), asked("no answer yet")], None)
    assert head_training_prompts(str(chat), 1, 0, tok)[0] == [asked("hi there")]
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "q1"}],
                                "completion": [{"role": "assistant", "content": "a"}]}) + "\n"
                    + json.dumps({"prompt": "q2"}) + "\n", encoding="utf-8")
    assert head_training_prompts(str(conv), 10, 0, tok)[0] == [asked("q1"), asked("q2")]
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,completion\nwhat is up,x\n,\nhow so,y\n", encoding="utf-8")
    assert head_training_prompts(str(csv), 10, 0, tok)[0] == [asked("what is up"), asked("how so")]
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n", encoding="utf-8")
    for bad, match in ((text, "no 'messages' or 'prompt' column .*text"), (tmp_path / "gone.jsonl", "does not exist"),
                       ("someone/some-dataset", "not reachable")):
        with pytest.raises(FlashtuneError, match=match) as exc:
            head_training_prompts(str(bad), 10, 0, tok)
        assert "\n" not in str(exc.value)
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(FlashtuneError, match="no user turn"):
        head_training_prompts(str(empty), 10, 0, tok)

