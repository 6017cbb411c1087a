"""Training data for a drafter without an external chat corpus: self-synthesised prompts, self-distilled answers.

Paper: "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing", Xu et al.,
arXiv 2406.08464 (2024). An aligned model given only its chat template's prefix up to where a user message
starts ("pre-query template") writes a user message itself; sampling many of them gives diverse instructions.

Steps: (1) the pre-query template is cut out of the tokenizer's own chat template; (2) the target samples user
turns from it until its end-of-turn token (turns that never end, or are too short, are dropped); (3) the
turns are deduplicated (normalised text, then word-trigram Jaccard similarity); (4) the target answers each
one greedily (self-distillation: the drafter learns exactly what it will have to draft). The records and the
seed are written to one JSON-lines file, atomically; the first line is the recipe (seed, counts, model).
"""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

import torch

from flashtune.data.dataset import chat_prompt_ids  # noqa: F401 - one definition, used here and by bench/
from flashtune.errors import FlashtuneError
from flashtune.fileio import atomic_write_bytes

_MARK = "\u2063FLASHTUNE_USER_TURN\u2063"


def pre_query_template(tokenizer) -> str:
    """The chat template's text up to where a user message's content starts (system prompt included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FlashtuneError("Magpie prompts need an instruct model whose tokenizer has a chat template; pass your "
                             "own prompts instead (a text file, one per line)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    if _MARK not in text:
        raise FlashtuneError("the tokenizer's chat template drops the user message; pass your own prompts instead")
    return text.split(_MARK, 1)[0]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end a turn: the template's end-of-turn marker and EOS."""
    from flashtune.data.prompts import stop_token_ids

    return stop_token_ids(tokenizer)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def _trigrams(text: str) -> set:
    w = text.split()
    return {tuple(w[i:i + 3]) for i in range(max(1, len(w) - 2))}


class Deduper:
    """Near-duplicate filter fed one text at a time: keeps a text unless it equals a kept one after normalising
    (case, punctuation, spaces) or shares more than `threshold` of its word trigrams with one (Jaccard).

    Exact, without comparing all pairs (prefix filtering, Chaudhuri et al., ICDE 2006): J(A, B) > t implies
    |A & B| >= ceil(t |A|), so under one global order of trigrams the first |A| - ceil(t |A|) + 1 of A and
    the first |B| - ceil(t |B|) + 1 of B share a trigram; only kept texts found through an index of those
    prefixes are compared."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.seen: set[str] = set()
        self.grams: list[set] = []
        self.index: dict[tuple, list[int]] = {}

    def _prefix(self, g: set) -> list:
        need = math.ceil(self.threshold * len(g))
        return sorted(g)[: len(g) - need + 1]

    def add(self, text: str) -> bool:
        """True (and the text is kept) unless it is a near-duplicate of a kept text."""
        n = normalise(text)
        if not n or n in self.seen:
            return False
        g = _trigrams(n)
        prefix = self._prefix(g)
        cands = {j for x in prefix for j in self.index.get(x, ())}
        if any(len(g & self.grams[j]) / max(1, len(g | self.grams[j])) > self.threshold for j in cands):
            return False
        self.seen.add(n)
        for x in prefix:
            self.index.setdefault(x, []).append(len(self.grams))
        self.grams.append(g)
        return True


def dedupe(texts: list[str], threshold: float = 0.7) -> list[str]:
    """The first of every group of near-duplicates (see `Deduper`), stripped, in order."""
    d = Deduper(threshold)
    return [t.strip() for t in texts if d.add(t)]


def magpie_prompts(engine, tokenizer, n: int, seed: int = 0, max_new_tokens: int = 64, temperature: float = 1.0,
                   top_p: float = 0.95, batch_size: int = 8, min_words: int = 3, max_rounds: int = 8) -> list[str]:
    """Up to `n` distinct user turns written by the model from its pre-query template (Magpie). Rounds of
    `batch_size` samples (seeds seed, seed + 1, ...) run until n survive deduplication or `max_rounds` * n
    samples were drawn."""
    prefix = tokenizer(pre_query_template(tokenizer), add_special_tokens=False)["input_ids"]
    stop = end_of_turn_ids(tokenizer)
    found: list[str] = []
    seen = Deduper()
    call = 0
    while len(found) < n and call * batch_size < max_rounds * n:
        out = engine.generate([prefix] * batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed * 100003 + call, stop_tokens=stop)
        call += 1
        for toks in out.tokens:
            if not toks or toks[-1] not in stop:  # the turn never ended: cut off, drop it
                continue
            text = tokenizer.decode(toks[:-1], skip_special_tokens=True).strip()
            if len(text.split()) >= min_words and seen.add(text):
                found.append(text)
    return found[:n]


def answers(engine, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int, stop_tokens,
            temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """The engine's answer to every prompt (token ids), `batch_size` prompts a call (seeds seed + offset)."""
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        out += engine.generate(prompt_ids[s: s + batch_size], max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed + s, stop_tokens=stop_tokens).tokens
    return [list(a) for a in out]


def self_distill(engine, tokenizer, prompts: list, max_new_tokens: int = 128, batch_size: int = 8) -> list[dict]:
    """The target's own greedy answers: records {"prompt", "prompt_ids", "answer_ids"}. prompts: texts (asked
    as one-turn chats) or token-id lists (used as they are)."""
    ids = [chat_prompt_ids(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    got = answers(engine, ids, max_new_tokens, batch_size, end_of_turn_ids(tokenizer))
    return [{"prompt": p if isinstance(p, str) else tokenizer.decode(pid, skip_special_tokens=True),
             "prompt_ids": pid, "answer_ids": ans} for p, pid, ans in zip(prompts, ids, got)]


def synthesize(model, tokenizer, n: int, out_path, seed: int = 0, prompt_tokens: int = 64, answer_tokens: int = 128,
               batch_size: int = 8, device=None, dtype=None) -> list[dict]:
    """Magpie prompts + self-distilled answers for `model`, written to `out_path` (JSON lines: the recipe, then
    one record per prompt). Returns the records."""
    from flashtune.decoding import Engine

    torch.manual_seed(seed)
    prefix_len = len(tokenizer(pre_query_template(tokenizer), add_special_tokens=False)["input_ids"])
    engine = Engine(model, tokenizer, max_batch_size=batch_size, device=device, dtype=dtype,
                    max_seq_len=max(prefix_len + prompt_tokens, prefix_len + prompt_tokens + answer_tokens) + 64)
    prompts = magpie_prompts(engine, tokenizer, n, seed=seed, max_new_tokens=prompt_tokens, batch_size=batch_size)
    records = self_distill(engine, tokenizer, prompts, answer_tokens, batch_size)
    del engine
    gc.collect()  # the engine's CUDA graphs and KV cache hold memory until its reference cycle is collected
    head = {"recipe": "magpie+self-distill", "seed": seed, "n_requested": n, "n": len(records),
            "prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens,
            "model": getattr(model.config, "_name_or_path", "") or model.config.model_type}
    lines = [json.dumps(head)] + [json.dumps(r) for r in records]
    atomic_write_bytes(Path(out_path), "\n".join(lines) + "\n")
    return records


def is_synthesised(path) -> bool:
    """Whether `path` is a file `synthesize` wrote (a JSON-lines file whose first line is the recipe)."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        return False
    with path.open("rb") as f:
        first = f.readline()
    try:
        head = json.loads(first)
    except ValueError:
        return False
    return isinstance(head, dict) and "recipe" in head


def read_records(path) -> tuple[dict, list[dict]]:
    """(recipe, records) of a file written by `synthesize`."""
    path = Path(path)
    if not path.is_file():
        raise FlashtuneError(f"{path} does not exist; write it with flashtune's EAGLE-3 recipe (data='magpie')")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines or "recipe" not in lines[0]:
        raise FlashtuneError(f"{path} is not a synthesised data file (its first line must be the recipe)")
    return lines[0], lines[1:]
