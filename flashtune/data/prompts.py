"""Prompts for table-to-text: an MR is linearized into `attribute: value` lines under a short instruction.

With a chat model (the tokenizer has a chat template, as the default SmolLM2-135M-Instruct does) the
instruction is the system turn and the linearized MR the user turn; the reference is the assistant turn and
ends with the template's end-of-turn marker, so generation stops there. Without a template, a plain
`instruction / input / "Description:"` prompt is used and the target ends with the EOS token.
"""

from __future__ import annotations

from flashtune.data.e2e import parse_mr

INSTRUCTION = "Describe this restaurant in one sentence."
_MARK = "\x00FLASHTUNE\x00"


def linearize_mr(mr: str) -> str:
    """`name[X], eatType[pub]` -> `name: X | eatType: pub` (shorter in tokens, and unambiguous)."""
    return " | ".join(f"{k}: {v}" for k, v in parse_mr(mr))


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, mr: str, instruction: str = INSTRUCTION) -> str:
    """The text the model is conditioned on (special tokens written as text; tokenize it without adding more)."""
    body = linearize_mr(mr)
    if _has_chat_template(tokenizer):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{instruction}\nInput: {body}\nDescription:"


def end_of_target(tokenizer) -> str:
    """What follows a target text: the chat template's end-of-turn marker, else the EOS token."""
    if _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        tail = text.split(_MARK, 1)[1]
        tail = tail.split("\n", 1)[0].strip() if tail.strip() else ""
        if tail:
            return tail
    return tokenizer.eos_token or ""


def build_target(tokenizer, ref: str) -> str:
    """The text the model learns to produce for `ref` (a leading space when the prompt ends without one)."""
    lead = "" if _has_chat_template(tokenizer) else " "
    return f"{lead}{ref}{end_of_target(tokenizer)}"


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generated description: the end-of-turn marker's first token, and EOS."""
    ids = []
    end = end_of_target(tokenizer)
    if end:
        enc = tokenizer(end, add_special_tokens=False).input_ids
        if enc:
            ids.append(enc[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
