"""Generation over a split of table-to-text examples, and its scores.

Prompts are left-padded into batches (sorted by length so that padding is small) and decoded with Hugging
Face `generate`: greedy (`num_beams=1`) or beam search. Outputs come back in the input order. For E2E MRs
the outputs' slot errors are scored too, and beam candidates can be reranked by them (TGen's reranker: "Sequence-
to-Sequence Generation for Spoken Dialogue via Deep Syntax Trees and Strings", Dušek and Jurčíček, ACL 2016).
"""

from __future__ import annotations

import time

import torch

from flashtune.data.dataset import Collator, encode_prompt
from flashtune.data.prompts import stop_token_ids
from flashtune.errors import ConfigError
from flashtune.evaluation.metrics import score_all
from flashtune.evaluation.slot_errors import is_e2e_mr, matcher_for, slot_error_scores


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_candidates(model, tokenizer, mrs: list[str], batch_size: int = 16, num_beams: int = 1,
                        num_return: int = 1, max_new_tokens: int = 64, length_penalty: float = 1.0,
                        progress: bool = False) -> list[list[str]]:
    """For each of `mrs` (same order), its `num_return` best beams (best first; greedy when `num_beams=1`).

    `length_penalty` is Hugging Face's beam-score exponent: a beam scores sum(log p) / length**length_penalty,
    so values above 1 favour longer outputs.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is out of range; it must be >= 1")
    if num_beams < 1:
        raise ConfigError(f"num_beams={num_beams} is out of range; it must be >= 1")
    if not 1 <= num_return <= num_beams:
        raise ConfigError(f"num_return={num_return} is out of range; it must be between 1 and num_beams={num_beams}")
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    collate = Collator(pad_id, padding_side="left")
    prompts = [encode_prompt(tokenizer, mr) for mr in mrs]
    order = sorted(range(len(mrs)), key=lambda i: len(prompts[i]))
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs: list[list[str] | None] = [None] * len(mrs)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    beam_args = {"early_stopping": True, "length_penalty": length_penalty} if num_beams > 1 else {}
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
                                 do_sample=False, num_beams=num_beams, num_return_sequences=num_return,
                                 eos_token_id=stops, pad_token_id=pad_id, **beam_args)
            new = out[:, ids.shape[1]:]                  # [B * num_return, <= max_new_tokens], input-major
            for row, i in enumerate(idx):
                texts = []
                for k in range(num_return):
                    toks = new[row * num_return + k].tolist()
                    cut = next((j for j, t in enumerate(toks) if t in stops), len(toks))
                    texts.append(tokenizer.decode(toks[:cut], skip_special_tokens=True).strip())
                outputs[i] = texts
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def generate_texts(model, tokenizer, mrs: list[str], batch_size: int = 16, num_beams: int = 1,
                   max_new_tokens: int = 64, progress: bool = False, length_penalty: float = 1.0) -> list[str]:
    """Descriptions of `mrs` (same order), decoded with greedy search or `num_beams`-beam search."""
    return [c[0] for c in generate_candidates(model, tokenizer, mrs, batch_size=batch_size, num_beams=num_beams,
                                              max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                              progress=progress)]


def pick_fewest_slot_errors(mr: str, candidates: list[str], matcher=None) -> tuple[int, list]:
    """Index of the candidate with the fewest slot errors (ties: the earlier, i.e. the better beam), and every
    candidate's `SlotErrors`. Reranking as in TGen (Dušek and Jurčíček 2016), with our slot-error rules."""
    matcher = matcher or matcher_for([mr])
    errs = [matcher.errors(mr, c) for c in candidates]
    best = min(range(len(candidates)), key=lambda k: (errs[k].errors, k))
    return best, errs


def evaluate_generation(model, tokenizer, examples, batch_size: int = 16, num_beams: int = 1,
                        max_new_tokens: int = 64, progress: bool = False, length_penalty: float = 1.0,
                        rerank: str | None = None) -> dict:
    """Generate for every example and score against its references.

    rerank="slots": beam search returns all `num_beams` candidates and the one with the fewest slot errors is
    kept (ties: beam order). Slot errors are scored whenever every MR is an E2E MR.

    Returns {"metrics": {"bleu", "rouge_l", "nist"?, "slot_error_rate"?, "outputs_correct"?, "slots_missing"?,
             "slots_wrong"?, "slots_added"?, "slots_total"?, "n_inputs", "num_beams", "seconds"},
             "samples": [{"mr", "output", "refs", "slot_errors"?}, ...]} (samples in input order).
    """
    if rerank not in (None, "slots"):
        raise ConfigError(f"rerank={rerank!r} is not allowed; choose None or 'slots'")
    examples = list(examples)
    mrs = [ex.mr for ex in examples]
    e2e = bool(mrs) and all(is_e2e_mr(mr) for mr in mrs)
    if rerank == "slots":
        if num_beams < 2:
            raise ConfigError("rerank='slots' picks among beam candidates; set num_beams >= 2")
        if not e2e:
            raise ConfigError("rerank='slots' needs E2E MRs (attribute[value] pairs over the E2E attributes)")
    start = time.perf_counter()
    cands = generate_candidates(model, tokenizer, mrs, batch_size=batch_size, num_beams=num_beams,
                                num_return=num_beams if rerank else 1, max_new_tokens=max_new_tokens,
                                length_penalty=length_penalty, progress=progress)
    matcher = matcher_for(mrs) if e2e else None
    outs = [c[pick_fewest_slot_errors(mr, c, matcher)[0]] if rerank else c[0] for mr, c in zip(mrs, cands)]
    seconds = time.perf_counter() - start
    metrics = score_all(outs, [ex.refs for ex in examples])
    samples = [{"mr": ex.mr, "output": o, "refs": list(ex.refs)} for ex, o in zip(examples, outs)]
    if e2e:
        slots = slot_error_scores(mrs, outs)
        metrics.update(slot_error_rate=slots["slot_error_rate"], outputs_correct=slots["outputs_correct"],
                       slots_missing=slots["missing"], slots_wrong=slots["wrong"], slots_added=slots["added"],
                       slots_total=slots["slots"])
        for s, e in zip(samples, slots["per_output"]):
            s["slot_errors"] = e.describe()
    metrics.update(n_inputs=len(examples), num_beams=num_beams, seconds=round(seconds, 2))
    if rerank:
        metrics["rerank"] = rerank
    if length_penalty != 1.0:
        metrics["length_penalty"] = length_penalty
    return {"metrics": metrics, "samples": samples}
