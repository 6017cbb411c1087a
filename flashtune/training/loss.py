"""Causal-LM cross-entropy, optionally through a chunked linear + cross-entropy that never holds all logits.

For a batch of B x T tokens and a vocabulary V, the plain path materializes logits [B, T, V] (and Hugging Face
upcasts them to fp32, and keeps the softmax for backward): for 4 x 2048 tokens and V = 32000 that is 1 GiB
per fp32 copy. The chunked path takes the final hidden states of only the positions that carry a label,
and for each chunk of C rows computes logits [C, V] in fp32, their log-sum-exp, the loss and, at once, the
gradients of the loss with respect to the hidden states and (when it trains) the head weight. Backward only
scales those stored gradients by the incoming scalar. Peak extra memory is one [C, V] fp32 block.

The technique is the "fused linear cross-entropy" of Liger Kernel (Hsu et al., arXiv:2410.10989), written
here in plain PyTorch; the chunked-vocabulary idea goes back to Cut Your Losses in Large-Vocabulary Language
Models (Wijmans et al., arXiv:2411.09009).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows h [N, H], weight W [V, H], targets y [N]; gradients computed eagerly."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype):
        n = hidden.shape[0]
        want_w = weight.requires_grad
        acc = torch.promote_types(compute_dtype, torch.float32)     # fp32 softmax (fp64 for fp64 inputs)
        grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device)               # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        w = weight.to(compute_dtype)                                                      # [V, H]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)                       # [C, H]
            y = targets[start:start + chunk_size]                                         # [C]
            logits = (h @ w.t()).to(acc)                                                  # [C, V]
            lse = torch.logsumexp(logits, dim=-1)                                         # [C]
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            # d(sum CE)/d logits = softmax - onehot, computed in place over the logits block.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            g = g.to(compute_dtype)
            grad_h[start:start + chunk_size] = (g @ w).to(acc)                            # [C, H]
            if want_w:
                grad_w += (g.t() @ h).to(acc)                                             # [V, H]
        ctx.save_for_backward(grad_h, grad_w if want_w else torch.empty(0))
        ctx.want_w = want_w
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0])
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if ctx.want_w else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 4096, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of logits `hidden @ weight.T` against `targets`, without materializing all logits.

    hidden [N, H], weight [V, H] (an `nn.Linear` head without bias), targets [N] in [0, V): every row counts
    (select the labelled rows before calling). Under autocast the products run in the autocast dtype, the
    softmax in fp32, as `F.cross_entropy(F.linear(hidden, weight).float(), targets)` would.
    Returns the sum (reduction="sum") or mean ("mean") over rows.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    total = _LinearCrossEntropySum.apply(hidden, weight, targets, chunk_size, compute_dtype)
    if reduction == "mean":
        return total / max(targets.numel(), 1)
    return total


def shifted_labels(batch: dict) -> torch.Tensor:
    """Next-token targets [B, T-1] from batch["labels"] (or input_ids with padding masked), -100 = ignore."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return labels[:, 1:]


def count_targets(batch: dict) -> int:
    """How many tokens carry a loss in this batch (after the shift)."""
    return int((shifted_labels(batch) != IGNORE_INDEX).sum())


def _model_inputs(model, batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs.setdefault("use_cache", False)   # training needs no KV cache
    return inputs


def _chunkable_head(model):
    """The model's lm head as a plain bias-free nn.Linear, and its backbone; (None, None) if not that shape."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    backbone = getattr(model, "base_model", None)
    cfg = getattr(model, "config", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or backbone is None or backbone is model
            or getattr(cfg, "is_encoder_decoder", False)
            or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)):
        return None, None
    return head, backbone


def causal_lm_loss_sum(model, batch: dict, chunk_size: int | None = 4096) -> torch.Tensor:
    """Sum over labelled tokens of the next-token cross-entropy (divide by `count_targets` for the mean).

    chunk_size: rows per block of the chunked head + loss; None for the plain path (full logits). Models whose
    head is not a plain bias-free Linear (or that scale/softcap logits) always take the plain path.
    """
    targets = shifted_labels(batch)                                              # [B, T-1]
    head, backbone = _chunkable_head(model) if chunk_size else (None, None)
    if head is None:
        logits = model(**_model_inputs(model, batch)).logits[:, :-1]                    # [B, T-1, V]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    hidden = backbone(**_model_inputs(model, batch)).last_hidden_state[:, :-1]            # [B, T-1, H]
    keep = targets != IGNORE_INDEX
    return linear_cross_entropy(hidden[keep], head.weight, targets[keep], chunk_size=chunk_size)  # [N, H] rows
