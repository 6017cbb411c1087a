"""Fine-tuning data in the formats people keep it in: chat `messages`, `prompt` + `completion`, `text`, and
the E2E csv (`mr` + `ref`), from .jsonl / .json / .csv / .tsv / .parquet / .txt files or a Hub dataset name.

    records, fmt = load_records("chats.jsonl")                       # format detected from the columns
    train_ds, val_ds = build_datasets(records, fmt, tokenizer, max_length=512, val_size=0.05, seed=0, pack=True)
    fit(model, train_ds, cfg, collate_fn=Collator(tokenizer.pad_token_id))

Where the loss goes (labels are -100 elsewhere):
- `messages` [{"role", "content"}, ...]: rendered with the tokenizer's own chat template; loss on every
  assistant turn (its content and the template's end-of-turn text), found by rendering the conversation turn
  by turn and diffing the token ids of each prefix against the whole (any template that renders a
  conversation as the concatenation of its turns works, without `{% generation %}` markers);
- `prompt` + `completion` (strings): with a chat template, a user turn and an assistant turn (what
  `flashtune generate` sends a chat model), loss on the assistant turn; without one, prompt tokens then
  completion tokens and EOS, loss on the completion. TRL's conversational form (both lists of messages) is a
  `messages` conversation whose loss covers the completion's assistant turns only;
- `text`: BOS + text + EOS, loss on every token; a text longer than `max_length` becomes several examples;
- `e2e`: the table-to-text path of `make_lm_dataset` (one example per reference; validation: first reference).

The validation split is seeded: by distinct MR (e2e), by distinct prompt (prompt/completion), else by record.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from flashtune.data.dataset import IGNORE_INDEX, _bos, _encode, make_lm_dataset
from flashtune.data.e2e import E2EExample, examples_from_rows, split_by_mr, val_count
from flashtune.data.files import SUFFIXES, Rows, read_hub, read_rows, read_text_file
from flashtune.errors import ConfigError, FlashtuneError, check_choice

log = logging.getLogger("flashtune.data")

FORMATS = ("messages", "prompt_completion", "text", "e2e")
COLUMNS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "e2e": ("mr", "ref"),
           "text": ("text",)}
_DETECT_ORDER = ("messages", "prompt_completion", "e2e", "text")
_ACCEPTED = "messages (chat), prompt + completion, mr + ref (E2E), text"


# ------------------------------------------------------------------------------------------------- loading
def load_records(path_or_name, format: str | None = None):
    """(records, format) from a data file or a Hub dataset name.

    format: one of FORMATS, or None to detect it from the columns (messages > prompt + completion > mr + ref >
    text). A .txt file is `text`, one record per paragraph (blank-line separated; one per line when the file
    has no blank lines). Records: E2EExample objects for `e2e`, else dicts {"messages": [...]} (plus
    "n_prompt" for TRL's conversational prompt/completion), {"prompt", "completion"} or {"text"}.
    Every problem is a one-line FlashtuneError naming the file (and row) and the fix.
    """
    if format is not None:
        check_choice("format", format, FORMATS)
    source = str(path_or_name)
    p = Path(source).expanduser()
    if p.is_file() and SUFFIXES.get(p.suffix.lower()) == "text":
        return _text_file_records(p, format), "text"
    return records_from_table(read_table(source), format)


def records_from_table(table: Rows, format: str | None = None) -> tuple[list, str]:
    """`load_records` for a table already read: (records, format), the format detected when None."""
    fmt = format or detect_format(table)
    missing = [c for c in COLUMNS[fmt] if c not in table.columns]
    if missing:
        raise FlashtuneError(f"{table.source} has no column {' or '.join(map(repr, missing))} for format {fmt!r} "
                             f"(its columns: {', '.join(map(str, table.columns)) or 'none'}); rename the columns "
                             f"or choose another format")
    if fmt == "e2e":
        for i, row in enumerate(table.rows):
            for c in ("mr", "ref"):
                if row.get(c) is not None and not isinstance(row[c], str):
                    raise FlashtuneError(f"{table.at(i)}: {c!r} is a {type(row[c]).__name__}, not a string; "
                                         f"fix that row")
        records = examples_from_rows(table.rows)
    else:
        records = [r for i, row in enumerate(table.rows) if (r := _normalize(fmt, row, table, i)) is not None]
        if len(records) < len(table.rows):
            other = sum(all(row.get(c) is None for c in COLUMNS[fmt]) for row in table.rows)
            empty = len(table.rows) - len(records) - other
            if other:
                log.warning("%s: %d of %d rows have none of the columns of format %r (%s) and were skipped; give "
                            "every row the same format", table.source, other, len(table.rows), fmt,
                            ", ".join(COLUMNS[fmt]))
            if empty:
                log.warning("%s: %d of %d rows are empty and were skipped", table.source, empty, len(table.rows))
    if not records:
        raise FlashtuneError(f"{table.source} holds no {fmt} examples (every row is empty); give it some data")
    return records, fmt


def read_table(path_or_name) -> Rows:
    """The rows of a data file (.jsonl/.json/.csv/.tsv/.parquet) or of a Hub dataset's train split; one line
    naming the problem when a path does not exist or the Hub cannot be reached."""
    p = check_source(path_or_name)
    return read_rows(p) if p.exists() else read_hub(str(path_or_name))


def check_source(path_or_name) -> Path:
    """The path of a data source, checked without reading it: one that looks like a file path (a data suffix,
    a leading '.', '/' or '~', or more than one '/') must exist; anything else may be a Hub dataset name."""
    source = str(path_or_name)
    p = Path(source).expanduser()
    if not p.exists() and (p.suffix.lower() in SUFFIXES or source.startswith((".", "/", "~"))
                           or source.count("/") > 1):
        raise FlashtuneError(f"data file {source!r} does not exist; check the path")
    return p


def detect_format(table: Rows) -> str:
    """The first format whose columns the table has; FlashtuneError naming the columns found and accepted."""
    for fmt in _DETECT_ORDER:
        if all(c in table.columns for c in COLUMNS[fmt]):
            return fmt
    found = ", ".join(map(str, table.columns)) or "none"
    raise FlashtuneError(f"{table.source} has the columns {found}; flashtune reads the columns {_ACCEPTED}: "
                         f"rename the columns or name the format")


def _text_file_records(p: Path, format):
    if format not in (None, "text"):
        raise FlashtuneError(f"{p} is a plain-text file, which is read as format 'text', not {format!r}; use a "
                             f".jsonl/.json/.csv/.parquet file for {format!r}")
    return [{"text": t} for t in split_paragraphs(read_text_file(p))]


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated), or lines when the text has no blank line."""
    paras = [t.strip() for t in text.replace("\r\n", "\n").split("\n\n") if t.strip()]
    if len(paras) < 2:
        paras = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return paras


def _string(value, table: Rows, i: int, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FlashtuneError(f"{table.at(i)}: {name!r} is a {type(value).__name__}, not a string; fix that row")
    return value


def _messages(value, table: Rows, i: int, name: str) -> list[dict]:
    if isinstance(value, str):       # a CSV cell holding the conversation as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise FlashtuneError(f"{table.at(i)}: {name!r} is text that is not a JSON list of messages; write it "
                                 f'as [{{"role": "user", "content": "..."}}, ...]') from None
    if not isinstance(value, list) or not value:
        raise FlashtuneError(f"{table.at(i)}: {name!r} must be a non-empty list of "
                             f'{{"role": ..., "content": ...}} messages')
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise FlashtuneError(f"{table.at(i)}: {name}[{k}] is not an object with 'role' and 'content'")
        m = {key: v for key, v in m.items() if v is not None}   # columnar readers fill absent keys with None
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise FlashtuneError(f"{table.at(i)}: {name}[{k}] has no 'role' string (system, user, assistant)")
        if not isinstance(m.get("content"), str):
            got = type(m.get("content")).__name__ if "content" in m else "nothing"
            raise FlashtuneError(f"{table.at(i)}: {name}[{k}] 'content' must be a string, got {got}; "
                                 f"flashtune trains on text conversations")
        out.append(m)
    return out


def _normalize(fmt: str, row: dict, table: Rows, i: int) -> dict | None:
    """The canonical record of one row, or None for an empty row."""
    if fmt == "text":
        text = _string(row.get("text"), table, i, "text")
        return {"text": text} if text.strip() else None
    if fmt == "messages":
        if row.get("messages") in (None, "", []):
            return None
        msgs = _messages(row["messages"], table, i, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise FlashtuneError(f"{table.at(i)}: the conversation has no assistant turn, so nothing to learn; "
                                 f"add one or remove the row")
        return {"messages": msgs}
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):    # TRL's conversational prompt/completion
        for name, value in (("prompt", prompt), ("completion", completion)):
            if value not in (None, "") and not isinstance(value, list):
                raise FlashtuneError(f"{table.at(i)}: {name!r} is a {type(value).__name__} while the other is a list; "
                                     f"write both as strings, or both as lists of "
                                     f'{{"role": ..., "content": ...}} messages')
        p = _messages(prompt, table, i, "prompt") if prompt else []
        c = _messages(completion, table, i, "completion")
        if not any(m["role"] == "assistant" for m in c):
            raise FlashtuneError(f"{table.at(i)}: 'completion' has no assistant message; add one")
        return {"messages": p + c, "n_prompt": len(p)}
    prompt = _string(prompt, table, i, "prompt")
    completion = _string(completion, table, i, "completion")
    if not completion.strip():
        return None
    return {"prompt": prompt, "completion": completion}


# ---------------------------------------------------------------------------------------------- splitting
def split_records(records, format: str, val_size, seed: int = 0):
    """(train, val) records: a seeded split that keeps all records of one MR (e2e) or one prompt
    (prompt/completion) on one side. val_size: a count, or a fraction in (0, 1)."""
    check_choice("format", format, FORMATS)
    if format == "e2e":
        return split_by_mr(records, val_size, seed=seed)
    if format == "prompt_completion":
        key = [json.dumps(r.get("prompt", r.get("messages", [])[:r.get("n_prompt", 0)])) for r in records]
    else:
        key = list(range(len(records)))
    distinct = list(dict.fromkeys(key))
    n_val = val_count(val_size, len(distinct), "examples")
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    val_keys = {distinct[i] for i in order[:n_val]}
    return ([r for r, k in zip(records, key) if k not in val_keys],
            [r for r, k in zip(records, key) if k in val_keys])


# ---------------------------------------------------------------------------------------------- encoding
def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:    # jinja2 TemplateError from raise_exception(), or a template bug
        raise FlashtuneError(f"the tokenizer's chat template refused a conversation ({str(exc).splitlines()[0]}); "
                             f"fix the conversation (roles, order) or use another format") from None


def _token_cuts(tokenizer, full: str, full_ids: list[int], cuts: list[int]) -> dict[int, tuple[int, int]]:
    """For each text offset in `cuts` (sorted turn boundaries of `full`): (tokens wholly before it, tokens
    that begin before it); the two differ only where one token spans the boundary.

    Three ways, cheapest first: the pieces between the cuts tokenized one by one concatenate to the full ids
    (one pass); else each prefix's own ids are a prefix of the full ids (a tokenizer that treats the start
    of a text specially, e.g. SentencePiece's leading space); else, where a token merges across a boundary,
    the fast tokenizer's character offsets."""
    edges = [0, *cuts, len(full)]
    pieces = [_encode(tokenizer, full[a:b]) for a, b in zip(edges, edges[1:])]
    if [t for piece in pieces for t in piece] == full_ids:
        out, n = {}, 0
        for c, piece in zip(cuts, pieces):
            n += len(piece)
            out[c] = (n, n)
        return out
    out, offsets = {}, None
    for c in cuts:
        ids = _encode(tokenizer, full[:c])
        if full_ids[:len(ids)] == ids:
            out[c] = (len(ids), len(ids))
            continue
        if offsets is None:
            try:
                offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            except Exception:
                raise FlashtuneError("the tokenizer merges tokens across chat-turn boundaries and has no "
                                     "offset mapping (not a fast tokenizer); use a fast tokenizer or the text "
                                     "format") from None
        out[c] = (sum(1 for _, e in offsets if e <= c), sum(1 for s, _ in offsets if s < c))
    return out


def encode_chat(tokenizer, messages: list[dict], max_length: int, n_prompt: int = 0) -> dict:
    """`input_ids` of the conversation rendered with the chat template, and `labels` equal to them on the
    assistant turns at index >= n_prompt (content and end-of-turn text), -100 elsewhere; cut at max_length.
    A token that spans a turn boundary and holds assistant text is learned."""
    if not getattr(tokenizer, "chat_template", None):
        raise FlashtuneError("format 'messages' needs a tokenizer with a chat template, and this model's has none; "
                             "use a chat model, or the prompt/completion or text format")
    full = _render(tokenizer, messages)
    ids = _encode(tokenizer, full)
    spans = []                         # (text offset where assistant turn i starts, where it ends)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < n_prompt:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[:i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise FlashtuneError(f"the chat template does not render this conversation turn by turn (the text "
                                 f"before assistant turn {i} changes when later turns follow), so its assistant "
                                 f"tokens cannot be found; use the prompt/completion format")
        spans.append((len(before), len(through)))
    cut = _token_cuts(tokenizer, full, ids, sorted({c for span in spans for c in span}))
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        start, end = cut[a][0], cut[b][1]
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_record(record: dict, format: str, tokenizer, max_length: int) -> list[dict]:
    """The training examples of one record (dicts of `input_ids` / `labels` lists; several for a long text,
    none when truncation leaves no labelled token)."""
    if format == "messages" or "messages" in record:
        out = [encode_chat(tokenizer, record["messages"], max_length, record.get("n_prompt", 0))]
    elif format == "prompt_completion":
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
            out = [encode_chat(tokenizer, msgs, max_length, n_prompt=1)]
        else:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            prompt = _bos(tokenizer) + _encode(tokenizer, record["prompt"])
            target = _encode(tokenizer, record["completion"]) + eos
            out = [{"input_ids": (prompt + target)[:max_length],
                    "labels": ([IGNORE_INDEX] * len(prompt) + target)[:max_length]}]
    elif format == "text":
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = _bos(tokenizer) + _encode(tokenizer, record["text"]) + eos
        out = [{"input_ids": ids[s:s + max_length], "labels": ids[s:s + max_length]}
               for s in range(0, len(ids), max_length)]
    else:
        raise ConfigError(f"format={format!r} is not allowed here; choose one of 'messages', "
                          f"'prompt_completion', 'text'")
    return [ex for ex in out if any(t != IGNORE_INDEX for t in ex["labels"][1:])]


def encode_records(records, format: str, tokenizer, max_length: int) -> list[dict]:
    """`encode_record` over a list; FlashtuneError when nothing is left to train on."""
    out, dropped = [], 0
    for r in records:
        got = encode_record(r, format, tokenizer, max_length)
        dropped += not got
        out += got
    if dropped:
        log.warning("%d of %d %s examples have no loss token within max_length=%d and were dropped",
                    dropped, len(records), format, max_length)
    return out


def build_datasets(records, format: str, tokenizer, max_length: int, val_size, seed: int = 0,
                   pack: bool = False, refs: str = "all"):
    """(train_ds, val_ds): lists of dicts with `input_ids` and `labels` (-100 where no loss), plus
    `position_ids` when packed, that `Collator` batches and `training.fit` trains on.

    val_size: a count or a fraction in (0, 1) (see `split_records`). pack: best-fit packing of examples into
    rows of up to `max_length` tokens, positions restarting per example, attention kept inside each example.
    refs: the e2e format's training references ("all" or "first"; validation always uses the first).
    """
    from flashtune.data.packing import pack_examples

    check_choice("format", format, FORMATS)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length={max_length!r} is out of range; it must be an integer >= 2")
    train_r, val_r = split_records(records, format, val_size, seed)
    if format == "e2e":
        if not all(isinstance(r, E2EExample) for r in records):
            raise ConfigError("format 'e2e' needs E2EExample records (what load_records returns for it)")
        train = make_lm_dataset(train_r, tokenizer, max_length, refs=refs)
        val = make_lm_dataset(val_r, tokenizer, max_length, refs="first")
    else:
        train = encode_records(train_r, format, tokenizer, max_length)
        val = encode_records(val_r, format, tokenizer, max_length) if val_r else []
    if not train:
        raise FlashtuneError("the training set is empty after tokenization; raise max_length or give more data")
    if pack:
        train, val = pack_examples(train, max_length), pack_examples(val, max_length)
    return train, val
