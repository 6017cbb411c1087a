"""Packing short examples into full rows, with attention kept inside each example.

Packing without cross-contamination as in "Efficient Sequence Packing without Cross-contamination"
(Krell et al., arXiv:2107.02027): several examples share one row of up to `max_length` tokens, each with its
own position ids restarting at 0, and no token attends to another example. The bins are filled best-fit
decreasing (each example, longest first, goes into the fullest row it still fits).

How attention stays inside an example: a packed batch carries `position_ids` and no `attention_mask`
(`Collator` sees to it). Hugging Face models then find the example boundaries where the positions stop
counting up: the eager and SDPA paths get a block-diagonal causal mask (transformers' masking_utils), and
flashtune's FlashAttention (`attn_implementation="flashtune"`, the GPU default) makes one variable-length
kernel call with `cu_seqlens` at the positions' restarts (flashtune/attention/hf.py). The first token of each
packed example carries no label: it would be predicted from the previous example. `check_packing(model)`
proves the model (with its tuner attached) honours the boundaries before a run relies on it; prefix-tuning
does not (its prefix arrives as a KV cache, and transformers looks for packed rows only without a cache).
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch

from flashtune.data.dataset import IGNORE_INDEX
from flashtune.errors import ConfigError, FlashtuneError


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples (dicts of `input_ids` / `labels` lists) into rows of at most `max_length` tokens: dicts of
    `input_ids`, `labels` (each example's first label -100) and `position_ids` (0..n-1 per example). Inside a
    row the examples keep their input order; the rows are ordered by their first example."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length={max_length!r} is out of range; it must be an integer >= 1")
    lengths = [len(ex["input_ids"]) for ex in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ConfigError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
                          f"max_length={max_length}; cut examples to max_length before packing")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []           # (room left, bin index), sorted: best fit = first with room
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], i)):
        j = bisect_left(free, (lengths[i], -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            insort(free, (room - lengths[i], b))
    rows = []
    for members in sorted((sorted(b) for b in bins), key=lambda b: b[0]):
        ids, labels, pos = [], [], []
        for i in members:
            ex = examples[i]
            lab = list(ex.get("labels", ex["input_ids"]))
            ids += list(ex["input_ids"])
            labels += [IGNORE_INDEX] + lab[1:]
            pos += list(range(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def packing_efficiency(rows: list[dict], max_length: int) -> float:
    """Fraction of the rows' `max_length` slots that hold tokens."""
    return sum(len(r["input_ids"]) for r in rows) / max(1, len(rows) * max_length)


@torch.no_grad()
def check_packing(model, length: int = 8, seed: int = 0) -> None:
    """FlashtuneError unless `model` keeps packed examples apart: the logits of a sequence packed after
    another must equal its logits alone (one tiny forward pass each; the model's mode is restored)."""
    params = next(model.parameters())
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, vocab, (1, length), generator=g).to(params.device) for _ in range(2))
    pos = torch.arange(length, device=params.device)[None]
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=b, position_ids=pos, use_cache=False).logits.float()
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.cat([pos, pos], 1),
                       use_cache=False).logits[:, length:].float()
    finally:
        model.train(was_training)
    tol = 1e-3 if params.dtype in (torch.float32, torch.float64) else 3e-2
    err = float((packed - alone).abs().max())
    if err > tol * max(1.0, float(alone.abs().max())):
        raise FlashtuneError(f"{type(model).__name__} (attention {getattr(model.config, '_attn_implementation', '?')}) "
                             f"lets packed examples attend to each other (logits differ by {err:.3g}); train "
                             f"without packing (data.pack = false): prefix-tuning, and attention that ignores "
                             f"position_ids, cannot keep packed examples apart")
