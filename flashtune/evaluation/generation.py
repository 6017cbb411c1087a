"""Generation over a split of table-to-text examples, and its scores.

Prompts are left-padded into batches (sorted by length so that padding is small) and decoded with Hugging
Face `generate`: greedy (`num_beams=1`) or beam search. Outputs come back in the input order.
"""

from __future__ import annotations

import time

import torch

from flashtune.data.dataset import Collator, encode_prompt
from flashtune.data.prompts import stop_token_ids
from flashtune.errors import ConfigError
from flashtune.evaluation.metrics import score_all


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_texts(model, tokenizer, mrs: list[str], batch_size: int = 16, num_beams: int = 1,
                   max_new_tokens: int = 64, progress: bool = False) -> list[str]:
    """Descriptions of `mrs` (same order), decoded with greedy search or `num_beams`-beam search."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is out of range; it must be >= 1")
    if num_beams < 1:
        raise ConfigError(f"num_beams={num_beams} is out of range; it must be >= 1")
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    collate = Collator(pad_id, padding_side="left")
    prompts = [encode_prompt(tokenizer, mr) for mr in mrs]
    order = sorted(range(len(mrs)), key=lambda i: len(prompts[i]))
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs: list[str | None] = [None] * len(mrs)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mrs), desc=f"generate ({'greedy' if num_beams == 1 else f'beam {num_beams}'})",
                   unit="ex", leave=False)
    try:
        for idx in batches:
            batch = collate([{"input_ids": prompts[i]} for i in idx])
            ids = batch["input_ids"].to(device)          # [B, T] left-padded
            mask = batch["attention_mask"].to(device)    # [B, T]
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=num_beams, early_stopping=num_beams > 1,
                                 eos_token_id=stops, pad_token_id=pad_id)
            new = out[:, ids.shape[1]:]                  # [B, <= max_new_tokens]
            for row, i in enumerate(idx):
                toks = new[row].tolist()
                cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
                outputs[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def evaluate_generation(model, tokenizer, examples, batch_size: int = 16, num_beams: int = 1,
                        max_new_tokens: int = 64, progress: bool = False) -> dict:
    """Generate for every example and score against its references.

    Returns {"metrics": {"bleu", "rouge_l", "nist"?, "n_inputs", "num_beams", "seconds"},
             "samples": [{"mr", "output", "refs"}, ...]} (samples in input order).
    """
    examples = list(examples)
    start = time.perf_counter()
    outs = generate_texts(model, tokenizer, [ex.mr for ex in examples], batch_size=batch_size,
                          num_beams=num_beams, max_new_tokens=max_new_tokens, progress=progress)
    seconds = time.perf_counter() - start
    metrics = score_all(outs, [ex.refs for ex in examples])
    metrics.update(n_inputs=len(examples), num_beams=num_beams, seconds=round(seconds, 2))
    samples = [{"mr": ex.mr, "output": o, "refs": list(ex.refs)} for ex, o in zip(examples, outs)]
    return {"metrics": metrics, "samples": samples}
