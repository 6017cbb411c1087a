"""Choose a Medusa tree for the machine it runs on: expected tokens per step over measured time per step.

Medusa (Cai et al., arXiv 2401.10774, §3.3.3) builds its sparse tree from per-head accuracies for a fixed node
budget. Which budget pays depends on the hardware: on a GPU at batch 1 a 64-token tree pass costs ~1.5 plain
steps, on a CPU nearly 64. `tune_tree` builds the greedy expected-acceptance tree for each candidate budget,
times real speculative steps of the engine with it (CUDA graphs included), and keeps the budget with the most
expected tokens per second; if none beats plain decoding, it says so (nodes = 0).
"""

from __future__ import annotations

import time

import torch

from flashtune.decoding.tree import build_tree, expected_accept_length
from flashtune.errors import ConfigError

SIZES = (3, 7, 15, 31, 63)


def step_seconds(engine, drafter, batch_size: int = 1, steps: int = 12, prompt_len: int = 32, seed: int = 0) -> float:
    """Seconds per decoding step of `engine` with `drafter` (None: plain), prefill excluded: random prompts,
    one warm-up call (graph capture), then (time of `steps` steps - time of the prefill alone) / steps."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, engine.model.args.vocab_size, (batch_size, prompt_len), generator=gen).tolist()

    def timed(new):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        t = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=drafter)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - t, out.steps

    timed(steps + 1)  # warm-up
    prefill, _ = timed(1)
    total, n = timed(steps + 1)  # max_new_tokens = steps + 1 runs at most `steps` steps
    return max(total - prefill, 1e-9) / max(n, 1)


def tune_tree(heads, engine, head_accuracy, batch_size: int = 1, sizes=SIZES, measure=None) -> dict:
    """Set `heads.tree` to the budget in `sizes` with the most expected tokens per second on `engine`.

    head_accuracy [K, topk] (saved by `flashtune train-heads` as head_accuracy.json). measure(drafter or None)
    -> seconds per step (default: `step_seconds`). Returns {"nodes": best budget or 0 when plain decoding is
    faster, "rows": [{"nodes", "expected_tokens_per_step", "step_s", "tokens_per_s"}, ...]}; with nodes == 0
    the heads keep their tree and the caller should decode without them.
    """
    acc = torch.as_tensor(head_accuracy, dtype=torch.float64)
    if acc.ndim != 2 or acc.shape[0] > heads.config.num_heads:
        raise ConfigError(f"head_accuracy must be [num_heads <= {heads.config.num_heads}, topk]; got "
                          f"{tuple(acc.shape)}")
    measure = measure or (lambda d: step_seconds(engine, d, batch_size))
    plain = measure(None)
    rows = [{"nodes": 0, "expected_tokens_per_step": 1.0, "step_s": plain, "tokens_per_s": 1.0 / plain}]
    best = (1.0 / plain, 0, None)
    for size in sizes:
        paths = build_tree(acc, size, topk=heads.config.topk)
        n = len(paths)  # fewer than `size` when the heads cannot fill that many nodes
        if any(r["nodes"] == n for r in rows):
            continue
        heads.set_tree(paths)
        expected = expected_accept_length(paths, acc)
        sec = measure(heads)
        rows.append({"nodes": n, "expected_tokens_per_step": expected, "step_s": sec, "tokens_per_s": expected / sec})
        if expected / sec > best[0]:
            best = (expected / sec, n, paths)
    if best[2] is not None:
        heads.set_tree(best[2])
    return {"nodes": best[1], "rows": rows}
