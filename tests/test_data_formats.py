"""Data files and formats: chat loss masks token by token against the template written out by hand, each
format from a small file, format detection, the validation split, and every bad file as one clean line."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from flashtune.data import IGNORE_INDEX, Collator, build_datasets, load_e2e_csv, load_records, read_text_file
from flashtune.data.formats import encode_chat, split_records
from flashtune.errors import ConfigError, FlashtuneError
from test_data import char_tokenizer

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's own tokenizer and ChatML template (tokenizer files only, no weights loaded)."""
    from transformers import AutoTokenizer

    from flashtune.models import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def _expected(tok, segments):
    """Token ids and labels built segment by segment: (text, learned) pairs, each tokenized on its own."""
    ids, labels = [], []
    for text, learned in segments:
        seg = tok(text, add_special_tokens=False).input_ids
        ids += seg
        labels += seg if learned else [IGNORE_INDEX] * len(seg)
    return ids, labels


def _chatml(messages, default_system=None):
    """SmolLM2's ChatML layout written out by hand: `<|im_start|>role\\ncontent<|im_end|>\\n` per turn; an
    assistant turn's content and end marker are learned, its header is not."""
    segs = []
    if default_system is not None:
        segs.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (f"{m['content']}<|im_end|>\n", True)]
        else:
            segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return segs


CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3 ?"},
     {"role": "assistant", "content": " Six, of course!\nDone."}],
    [{"role": "user", "content": "Grüße — ünïcödé?"}, {"role": "assistant", "content": "Ja: äöü ✓"}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["system-multi-turn", "default-system-unicode"])
def test_chat_mask_matches_smollm2_template_token_by_token(smol, conv):
    default = None if conv[0]["role"] == "system" else SMOL_SYSTEM
    want_ids, want_labels = _expected(smol, _chatml(conv, default))
    # the hand-written layout is SmolLM2's rendering, and it tokenizes the same in one piece
    assert want_ids == smol(smol.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids
    got = encode_chat(smol, conv, max_length=10_000)
    assert got["input_ids"] == want_ids
    assert got["labels"] == want_labels
    learned = smol.decode([t for t in got["labels"] if t != IGNORE_INDEX])
    assert learned == "".join(f"{m['content']}<|im_end|>\n" for m in conv if m["role"] == "assistant")


def test_chat_mask_on_a_tiny_tokenizer_with_its_own_template():
    tok = char_tokenizer()        # template: <s>role: content</s> ... ; generation prompt "<s>assistant: "
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "k."}]
    segs = []
    for m in conv:
        if m["role"] == "assistant":
            segs += [("<s>assistant: ", False), (f"{m['content']}</s>", True)]
        else:
            segs.append((f"<s>{m['role']}: {m['content']}</s>", False))
    want_ids, want_labels = _expected(tok, segs)
    got = encode_chat(tok, conv, max_length=500)
    assert (got["input_ids"], got["labels"]) == (want_ids, want_labels)
    short = encode_chat(tok, conv, max_length=20)                      # cut on the right
    assert (short["input_ids"], short["labels"]) == (want_ids[:20], want_labels[:20])


def test_chat_mask_with_a_tokenizer_that_marks_the_start_of_each_text():
    """Like SentencePiece's leading space: a turn tokenized alone differs from the same turn in context, so
    the prefixes' ids are diffed against the whole instead."""
    from tokenizers import normalizers

    tok = char_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Prepend("^")])
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "k."}]
    got = encode_chat(tok, conv, max_length=500)
    assert got["input_ids"] == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids
    learned = [i for i, t in enumerate(got["labels"]) if t != IGNORE_INDEX]
    assert tok.decode([got["input_ids"][i] for i in learned]) == "yo</s>k.</s>"
    assert all(got["labels"][i] == got["input_ids"][i] for i in learned)
    # the learned tokens are exactly the last three of each assistant turn ("y", "o", "</s>"; "k", ".", "</s>")
    ends = [i for i, t in enumerate(got["input_ids"]) if t == tok.eos_token_id]
    assert learned == [ends[1] - 2, ends[1] - 1, ends[1], ends[3] - 2, ends[3] - 1, ends[3]]


def test_chat_mask_when_a_token_merges_across_the_turn_boundary(smol):
    """A template whose generation prompt ends in a space: ' Hello' is one token across the boundary; it is
    learned (offsets path), and nothing of the user turn is."""
    import copy

    tok = copy.deepcopy(smol)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello world"}]
    got = encode_chat(tok, conv, max_length=100)
    ids = got["input_ids"]
    first = next(i for i, t in enumerate(got["labels"]) if t != IGNORE_INDEX)
    assert tok.decode(ids[first:first + 1]) == " Hello"                       # the merged token is learned
    assert tok.decode([t for t in got["labels"] if t != IGNORE_INDEX]) == " Hello world\n"
    assert all(t == IGNORE_INDEX for t in got["labels"][:first])


def test_chat_template_that_rewrites_earlier_turns_is_refused():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{{ loop.length }}: {{ m['content'] }}\n"
                         "{% endfor %}")     # every turn shows the conversation length: not turn by turn
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(FlashtuneError, match="turn by turn") as exc:
        encode_chat(tok, conv, 100)
    assert "\n" not in str(exc.value)


def test_messages_need_a_chat_template():
    with pytest.raises(FlashtuneError, match="chat template"):
        encode_chat(char_tokenizer(chat=False), [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"}], 100)


# ----------------------------------------------------------------------------------------- each format
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


PC = [{"prompt": f"q{i}: ", "completion": f"answer {i}."} for i in range(6)]


def test_prompt_completion_without_template_learns_the_completion_and_eos(tmp_path):
    tok = char_tokenizer(chat=False)
    records, fmt = load_records(_jsonl(tmp_path / "pc.jsonl", PC))
    assert fmt == "prompt_completion" and records == PC
    train, val = build_datasets(records, fmt, tok, max_length=64, val_size=2, seed=0)
    assert len(train) == 4 and len(val) == 2
    want = []
    for r in PC:    # the tokenizer's own special tokens (BOS if it adds one), prompt, completion, EOS
        prompt = tok(r["prompt"]).input_ids
        target = tok(r["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        want.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    got = train + val
    assert sorted(got, key=str) == sorted(want, key=str)


def test_prompt_completion_with_template_is_a_user_and_an_assistant_turn(tmp_path, smol):
    records, fmt = load_records(_jsonl(tmp_path / "pc.jsonl", PC[:3]))
    train, _ = build_datasets(records, fmt, smol, 256, val_size=1, seed=0)
    for ex in train:
        i = next(k for k, r in enumerate(PC) if smol.decode(ex["input_ids"]).count(r["completion"]))
        conv = [{"role": "user", "content": PC[i]["prompt"]}, {"role": "assistant", "content": PC[i]["completion"]}]
        assert (ex["input_ids"], ex["labels"]) == _expected(smol, _chatml(conv, SMOL_SYSTEM))


def test_trl_conversational_prompt_completion_learns_only_the_completion(tmp_path):
    tok = char_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"a{i}"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}],
             "completion": [{"role": "assistant", "content": "d"}]} for i in range(2)]
    records, fmt = load_records(_jsonl(tmp_path / "conv.jsonl", rows))
    assert fmt == "prompt_completion" and records[0]["n_prompt"] == 3
    train, _ = build_datasets(records, fmt, tok, 200, val_size=1, seed=0)
    assert tok.decode([t for t in train[0]["labels"] if t != IGNORE_INDEX]) == "d</s>"


def test_text_format_learns_every_token_and_splits_long_texts(tmp_path):
    tok = char_tokenizer(chat=False)
    path = _csv(tmp_path / "t.csv", ["id", "text"], [[1, "hello world"], [2, ""], [3, "x" * 25], [4, "abc"]])
    records, fmt = load_records(path)
    assert fmt == "text" and [r["text"] for r in records] == ["hello world", "x" * 25, "abc"]   # empty skipped
    train, val = build_datasets(records, fmt, tok, max_length=10, val_size=1, seed=3)
    for ex in train + val:
        assert ex["labels"] == ex["input_ids"] and 2 <= len(ex["input_ids"]) <= 10
    stream = [t for ex in train + val for t in ex["input_ids"]]
    assert sorted(stream) == sorted(t for r in records for t in
                                    tok(r["text"]).input_ids + [tok.eos_token_id])


def test_text_file_is_paragraphs(tmp_path):
    (tmp_path / "notes.txt").write_text("first para\nstill first\n\nsecond\n\n\nthird\n", encoding="utf-8")
    records, fmt = load_records(tmp_path / "notes.txt")
    assert fmt == "text" and [r["text"] for r in records] == ["first para\nstill first", "second", "third"]
    with pytest.raises(FlashtuneError, match="plain-text file"):
        load_records(tmp_path / "notes.txt", format="messages")


def test_messages_from_json_csv_and_parquet_files_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)]
    convs[1][0]["name"] = "bob"       # a key only one message has
    (tmp_path / "c.json").write_text(json.dumps([{"messages": c} for c in convs]), encoding="utf-8")
    _csv(tmp_path / "c.csv", ["messages"], [[json.dumps(c)] for c in convs])
    # parquet through `datasets`: a struct column whose rows lack a key get None there, which is dropped
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in convs]), tmp_path / "c.parquet")
    for name in ("c.json", "c.csv", "c.parquet"):
        records, fmt = load_records(tmp_path / name)
        assert fmt == "messages" and [r["messages"] for r in records] == convs, name


def test_e2e_csv_is_detected_and_takes_the_existing_path(tmp_path):
    from flashtune.data import E2EExample, make_lm_dataset, split_by_mr

    rows = [("name[A], food[Thai]", "A serves Thai."), ("name[A], food[Thai]", "Thai at A."),
            ("name[B]", "B."), ("name[C]", "C is here.")]
    path = _csv(tmp_path / "e2e.csv", ["mr", "ref"], rows)
    records, fmt = load_records(path)
    assert fmt == "e2e" and all(isinstance(r, E2EExample) for r in records)
    assert [(e.mr, e.refs) for e in records] == [(e.mr, e.refs) for e in load_e2e_csv(path)]
    tok = char_tokenizer()
    train, val = build_datasets(records, fmt, tok, 128, val_size=1, seed=0)
    tr, va = split_by_mr(records, 1, seed=0)
    assert train == make_lm_dataset(tr, tok, 128) and val == make_lm_dataset(va, tok, 128, refs="first")


def test_detection_order_and_named_format(tmp_path):
    path = _jsonl(tmp_path / "both.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}] * 2)
    assert load_records(path)[1] == "prompt_completion"
    assert load_records(path, format="text")[1] == "text"
    with pytest.raises(FlashtuneError, match=r"no column 'messages' .*its columns: text, prompt, completion"):
        load_records(path, format="messages")
    with pytest.raises(ConfigError, match="format='chat' is not allowed"):
        load_records(path, format="chat")


def test_split_keeps_a_prompt_on_one_side_and_is_seeded():
    records = [{"prompt": f"p{i % 5}", "completion": f"c{i}"} for i in range(20)]
    train, val = split_records(records, "prompt_completion", 2, seed=1)
    assert len({r["prompt"] for r in val}) == 2 and len(train) + len(val) == 20
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}
    assert split_records(records, "prompt_completion", 2, seed=1) == (train, val)
    assert split_records(records, "prompt_completion", 2, seed=2) != (train, val)
    assert len(split_records(records, "text", 0.25, seed=0)[1]) == 5
    with pytest.raises(ConfigError, match="both sides non-empty"):
        split_records(records, "prompt_completion", 5, seed=0)


def test_collator_batches_packed_rows_without_an_attention_mask():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]}]
    batch = Collator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]   # padding: its own sequence
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, -100, -100]]
    with pytest.raises(ConfigError, match="mixes packed"):
        Collator(0)([rows[0], {"input_ids": [1, 2]}])
    with pytest.raises(ConfigError, match="padding_side='right'"):
        Collator(0, padding_side="left")(rows)
    assert torch.is_tensor(batch["input_ids"])


# ------------------------------------------------------------------------------------------- bad files
def _one_line(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, (n, msg)
    return msg


def test_latin1_and_binary_files_are_one_line(tmp_path):
    (tmp_path / "l1.csv").write_bytes("mr,ref\nname[Caf\xe9],Un caf\xe9.\n".encode("latin-1"))
    (tmp_path / "l1.txt").write_bytes("line one\nna\xefve\n".encode("latin-1"))
    (tmp_path / "bin.csv").write_bytes(b"mr,ref\n\x00\x01\x02\xff")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    (tmp_path / "u16.jsonl").write_bytes('{"text": "a"}\n'.encode("utf-16"))
    for fn in (load_e2e_csv, load_records):
        with pytest.raises(FlashtuneError) as exc:
            fn(tmp_path / "l1.csv")
        assert "not UTF-8" in _one_line(exc, "l1.csv", "line 2", "iconv")
        with pytest.raises(FlashtuneError) as exc:
            fn(tmp_path / "bin.csv")
        assert "binary" in _one_line(exc, "bin.csv")
    with pytest.raises(FlashtuneError) as exc:
        read_text_file(tmp_path / "l1.txt")
    _one_line(exc, "l1.txt", "not UTF-8", "line 2")
    with pytest.raises(FlashtuneError) as exc:
        read_text_file(tmp_path / "bin.txt")
    _one_line(exc, "bin.txt", "binary")
    with pytest.raises(FlashtuneError) as exc:
        load_records(tmp_path / "u16.jsonl")
    _one_line(exc, "u16.jsonl", "UTF-16")
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\n\nworld".encode("utf-8"))
    assert read_text_file(tmp_path / "bom.txt") == "hello\n\nworld"


def test_a_300kb_field_is_read_not_a_csv_error(tmp_path):
    big = "word " * 60_000   # 300 KB, past the csv module's default 128 KB field limit
    path = _csv(tmp_path / "big.csv", ["mr", "ref"], [["name[A]", big], ["name[B]", "short"]])
    got = load_e2e_csv(path)
    assert [len(e.refs[0]) for e in got] == [len(big.strip()), 5]
    records, fmt = load_records(path)
    assert fmt == "e2e" and records[0].refs[0] == big.strip()
    import csv as _csv_mod
    assert _csv_mod.field_size_limit() == 131072       # the process-wide limit is restored


def test_empty_files_are_one_line(tmp_path):
    cases = {"empty.csv": b"", "blank.jsonl": b"\n \n", "empty.txt": b"", "empty.json": b"  ",
             "empty.parquet": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FlashtuneError) as exc:
            load_records(tmp_path / name)
        assert "empty" in _one_line(exc, name)
    (tmp_path / "header.csv").write_text("prompt,completion\n", encoding="utf-8")
    with pytest.raises(FlashtuneError) as exc:
        load_records(tmp_path / "header.csv")
    _one_line(exc, "header.csv", "no prompt_completion examples")
    (tmp_path / "header_e2e.csv").write_text("mr,ref\n", encoding="utf-8")
    with pytest.raises(FlashtuneError) as exc:
        load_records(tmp_path / "header_e2e.csv")
    _one_line(exc, "header_e2e.csv", "no e2e examples")


def test_missing_columns_name_the_found_and_the_accepted(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FlashtuneError) as exc:
        load_records(path)
    _one_line(exc, "x.jsonl", "question, answer", "messages", "prompt + completion", "mr + ref", "text")
    path = _csv(tmp_path / "e.csv", ["input", "output"], [["x", "y"]])
    with pytest.raises(FlashtuneError) as exc:
        load_e2e_csv(path)
    _one_line(exc, "e.csv", "'input', 'output'", "'mr' and 'ref'")


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n', encoding="utf-8")
    with pytest.raises(FlashtuneError) as exc:
        load_records(path)
    _one_line(exc, "bad.jsonl", "line 4", "not valid JSON")
    path.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    with pytest.raises(FlashtuneError) as exc:
        load_records(path)
    _one_line(exc, "bad.jsonl", "line 2", "not an object")
    path.write_text('{"text": "a"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(FlashtuneError) as exc:
        load_records(path)
    _one_line(exc, "bad.jsonl", "line 2", "'text' is a int")
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n'
                    '{"messages": [{"role": "user", "content": ["img"]}]}\n', encoding="utf-8")
    with pytest.raises(FlashtuneError) as exc:
        load_records(path)
    _one_line(exc, "bad.jsonl", "line 1", "no assistant turn")


def test_malformed_csv_and_other_bad_paths_are_one_line(tmp_path):
    (tmp_path / "ragged.csv").write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    (tmp_path / "quote.csv").write_text('prompt,completion\na,"b\n', encoding="utf-8")
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "fake.parquet").write_text("not parquet", encoding="utf-8")
    (tmp_path / "broken.json").write_text('[{"text": "a"},', encoding="utf-8")
    (tmp_path / "folder.jsonl").mkdir()
    expect = {"ragged.csv": "line 3 has 3 fields", "quote.csv": "not valid CSV", "data.xlsx": "suffix '.xlsx'",
              "fake.parquet": "not a Parquet file", "broken.json": "not valid JSON", "folder.jsonl": "is a folder",
              "missing.jsonl": "does not exist"}
    for name, what in expect.items():
        with pytest.raises(FlashtuneError) as exc:
            load_records(tmp_path / name)
        _one_line(exc, name, what)
    with pytest.raises(FlashtuneError) as exc:
        load_e2e_csv(tmp_path / "ragged.csv")
    _one_line(exc, "ragged.csv", "line 3")


def test_hub_name_offline_is_one_quick_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FlashtuneError) as exc:
        load_records("someone/some-dataset")
    assert time.perf_counter() - start < 2.0
    _one_line(exc, "'someone/some-dataset'", "offline")


@pytest.mark.parametrize("pack", [False, True])
def test_every_format_from_a_file_trains_one_step(tmp_path, pack):
    """File -> load_records -> build_datasets -> Collator -> fit, for each format (tiny Llama, char tokenizer)."""
    from tiny import tiny_model

    from flashtune.training import TrainConfig, fit

    tok = char_tokenizer()
    files = {
        "messages": _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                                {"role": "assistant", "content": f"a{i}"}]}
                                                  for i in range(4)]),
        "prompt_completion": _jsonl(tmp_path / "pc.jsonl", PC),
        "text": _csv(tmp_path / "t.csv", ["text"], [[f"some text {i}"] for i in range(4)]),
        "e2e": _csv(tmp_path / "e.csv", ["mr", "ref"], [[f"name[n{i}]", f"n{i} is here."] for i in range(4)]),
    }
    model = tiny_model("llama", attn_implementation="sdpa")
    for want, path in files.items():
        records, fmt = load_records(path)
        assert fmt == want
        train, val = build_datasets(records, fmt, tok, 160, val_size=1, seed=0, pack=pack)
        assert all(("position_ids" in ex) == pack for ex in train + val)
        cfg = TrainConfig(out_dir=str(tmp_path / f"run-{fmt}"), max_steps=1, batch_size=4, save_every=0)
        result = fit(model, train, cfg, collate_fn=Collator(tok.pad_token_id), progress=False)
        assert result.step == 1 and 0 < result.history[-1]["loss"] < 20, fmt


def test_csv_reader_round_trips_whatever_csv_writer_writes(tmp_path):
    """Property: any strings (quotes, delimiters, newlines, unicode, empty) survive csv.writer -> read_csv."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from flashtune.data.files import read_csv

    cell = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(cell, cell), min_size=1, max_size=6))
    def check(rows):
        path = _csv(tmp_path / "p.csv", ["prompt", "completion"], rows)
        got = read_csv(path)
        assert got.columns == ["prompt", "completion"]
        assert [(r["prompt"], r["completion"]) for r in got.rows] == [tuple(r) for r in rows]

    check()
