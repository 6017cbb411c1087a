"""Tokenized training examples and their collation.

Table-to-text: one example per (MR, reference) pair, `input_ids = prompt + target` and `labels` equal to the
target tokens with -100 on every prompt position, so the loss covers target tokens only. Plain text: the
texts are joined with EOS and cut into fixed-length blocks (packing), labels = input_ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from flashtune.data.prompts import build_prompt, build_target
from flashtune.errors import ConfigError

IGNORE_INDEX = -100


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _bos(tokenizer) -> list[int]:
    """A BOS token for models whose tokenizer adds one (the chat template of a chat model carries its own)."""
    if getattr(tokenizer, "chat_template", None):
        return []
    probe = tokenizer("a").input_ids
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return [tokenizer.bos_token_id]
    return []


def encode_prompt(tokenizer, mr: str) -> list[int]:
    """Token ids of the prompt for `mr` (what generation starts from)."""
    return _bos(tokenizer) + _encode(tokenizer, build_prompt(tokenizer, mr))


def head_training_prompts(source: str, n: int, seed: int, tokenizer) -> tuple[list[list[int]], list | None]:
    """Up to `n` prompts that drafters (heads, EAGLE-3) are trained on, as token ids, and their E2E examples
    where they have references (else None).

    `source`: "synthetic" (generated E2E-style inputs), a .txt file (one prompt a line), or a data file
    (.jsonl/.json/.csv/.tsv/.parquet) or Hub dataset name: each row's first user turn (`messages`, or a
    conversational `prompt`) or its `prompt` string, asked as a one-turn chat; E2E rows (mr + ref) give their
    MRs in the E2E prompt. Answers in the data are not used (drafters learn the target's own answers)."""
    from pathlib import Path

    from flashtune.data.synth import generate_e2e_style

    if source == "synthetic":
        examples = generate_e2e_style(n=n, seed=seed)
        return [encode_prompt(tokenizer, ex.mr) for ex in examples], examples
    from flashtune.data.files import read_text_file
    from flashtune.data.formats import read_table, records_from_table

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in read_text_file(path, "prompts file").splitlines() if ln.strip()][:n]
        return [chat_prompt_ids(tokenizer, ln) for ln in lines], None
    table = read_table(source)
    cols = set(table.columns)
    if "messages" not in cols and "prompt" not in cols:
        if {"mr", "ref"} <= cols:  # E2E rows: their MRs in the E2E prompt, with their references
            records = records_from_table(table, "e2e")[0][:n]  # (checks the rows' types)
            return [encode_prompt(tokenizer, ex.mr) for ex in records], records
        raise ConfigError(f"{table.source} has no 'messages' or 'prompt' column (its columns: "
                          f"{', '.join(map(str, table.columns)) or 'none'}); drafters learn from the model's answers "
                          f"to prompts: give chat messages, prompt rows, or a .txt file with one prompt a line")
    texts = []
    for row in table.rows:
        msgs = row.get("messages")
        turn = _first_user_turn(msgs) if isinstance(msgs, list) else _first_user_turn(row.get("prompt"))
        if turn:
            texts.append(turn)
        if len(texts) == n:
            break
    if not texts:
        raise ConfigError(f"{table.source} has no user turn or prompt text to train drafters on; give chat "
                          f"messages with a user turn, or prompt strings")
    return [chat_prompt_ids(tokenizer, t) for t in texts], None


def _first_user_turn(value) -> str | None:
    """A prompt's text: a non-empty string as is, or the first user message of a list of chat messages."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        for m in value:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"].strip() or None
    return None


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """The token ids of a one-turn chat asking `text`, ready for the assistant's answer (the plain text's ids
    when the tokenizer has no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        s = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
        return tokenizer(s, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def make_lm_dataset(examples, tokenizer, max_length: int = 256, refs: str = "all") -> list[dict]:
    """One training example per (MR, reference): dicts with `input_ids` and `labels` (lists of ints).

    refs: "all" (every reference is an example) or "first". Examples longer than `max_length` are cut at the
    right (the target keeps at least one token; longer prompts are a ConfigError).
    """
    if refs not in ("all", "first"):
        raise ConfigError(f"refs={refs!r} is not allowed; choose one of 'all', 'first'")
    out = []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.mr)
        if len(prompt) >= max_length:
            raise ConfigError(f"max_length={max_length} is too small: a prompt has {len(prompt)} tokens")
        for ref in ex.refs[:1] if refs == "first" else ex.refs:
            target = _encode(tokenizer, build_target(tokenizer, ref))
            ids = (prompt + target)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
            out.append({"input_ids": ids, "labels": labels})
    return out


def make_text_dataset(texts, tokenizer, block_size: int = 128) -> list[dict]:
    """Plain-text language modelling: texts joined with EOS, cut into `block_size`-token blocks (the tail that
    does not fill a block is dropped)."""
    if block_size < 2:
        raise ConfigError(f"block_size={block_size} is out of range; it must be >= 2")
    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in texts:
        stream += _bos(tokenizer) + _encode(tokenizer, t) + eos
    blocks = []
    for start in range(0, len(stream) - block_size + 1, block_size):
        ids = stream[start:start + block_size]
        blocks.append({"input_ids": ids, "labels": list(ids)})
    return blocks


def example_length(example: dict) -> int:
    """The `length_fn` for length bucketing."""
    return len(example["input_ids"])


@dataclass
class Collator:
    """Pads a list of examples to the longest one: `input_ids`, `attention_mask` [B, T] and `labels` [B, T]
    (-100 on padding). `padding_side` "right" for training, "left" for generation. Packed examples (with
    `position_ids`, from `pack_examples`) give `input_ids`, `position_ids` and `labels` instead."""

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side={self.padding_side!r} is not allowed; choose one of 'left', 'right'")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        packed = sum("position_ids" in ex for ex in examples)
        if packed:
            if packed != len(examples):
                raise ConfigError("a batch mixes packed examples (with position_ids) and unpacked ones; pack all "
                                  "or none")
            return self._packed(examples)
        width = max(len(ex["input_ids"]) for ex in examples)
        ids, mask, labels = [], [], []
        for ex in examples:
            n = len(ex["input_ids"])
            pad = width - n
            lab = ex.get("labels", ex["input_ids"])
            if self.padding_side == "right":
                ids.append(list(ex["input_ids"]) + [self.pad_token_id] * pad)
                mask.append([1] * n + [0] * pad)
                labels.append(list(lab) + [IGNORE_INDEX] * pad)
            else:
                ids.append([self.pad_token_id] * pad + list(ex["input_ids"]))
                mask.append([0] * pad + [1] * n)
                labels.append([IGNORE_INDEX] * pad + list(lab))
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}


    def _packed(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Packed rows: `input_ids`, `position_ids`, `labels` [B, T], and no `attention_mask`, so the model finds
        the example boundaries from the positions (see flashtune/data/packing.py). Padding goes on the right as
        one more sequence (positions from 0, no labels): causal attention keeps real tokens from seeing it."""
        if self.padding_side != "right":
            raise ConfigError("packed examples are for training; collate them with padding_side='right'")
        width = max(len(ex["input_ids"]) for ex in examples)
        ids, pos, labels = [], [], []
        for ex in examples:
            pad = width - len(ex["input_ids"])
            ids.append(list(ex["input_ids"]) + [self.pad_token_id] * pad)
            pos.append(list(ex["position_ids"]) + list(range(pad)))
            labels.append(list(ex.get("labels", ex["input_ids"])) + [IGNORE_INDEX] * pad)
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "position_ids": torch.tensor(pos, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}


def bucket_batches(lengths, batch_size: int, seed: int = 0, window: int = 50) -> list[list[int]]:
    """Length bucketing: a seeded shuffle, then sort by length inside windows of `window` batches and cut into
    batches, then shuffle the batches. Returns lists of indices; padding per batch is small."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
