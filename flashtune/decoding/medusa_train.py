"""Training Medusa heads: Medusa-1 (frozen backbone) and Medusa-2 (jointly with LoRA), self-distillation data,
and per-head top-k accuracies for building a tree.

Paper: Cai et al., "Medusa" (arXiv 2401.10774), §2.2. Losses, with head k (1-based) predicting token t+k+1:

    Medusa-1:  L = sum_k lambda_k CE(head_k(h_t), y_{t+k+1}),                       lambda_k = 0.8^k
    Medusa-2:  L = L_LM + lambda_0 * sum_k 0.8^k CE_k,  lambda_0 = 0.2 (optionally ramped linearly)
               with self-distillation, L_LM = KL(p_teacher || p_student) on the base head, the teacher being the
               same model with its adapters disabled; the heads keep hard-label CE.

The heads' learning rate is 4x the backbone's in Medusa-2. `fit` has one learning rate, so `HeadsLM` stores
the heads' weights divided by `head_lr_scale` and multiplies them back in forward: Adam's step does not depend
on the gradient's scale, so the heads then move `head_lr_scale` times faster.

This module does not import flashtune.training: `HeadsLM` and `MedusaLoss` are what `fit(model, data,
config, loss_fn=...)` receives (flashtune/cli/heads.py composes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from flashtune.decoding.medusa import MedusaHeads
from flashtune.errors import check_range

IGNORE = -100


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class HeadsLM(nn.Module):
    """The HF causal LM plus Medusa heads, as one module for `fit`. Trainable: the heads, plus whatever the
    base has with requires_grad (LoRA for Medusa-2; nothing for Medusa-1)."""

    def __init__(self, base: nn.Module, heads: MedusaHeads, head_lr_scale: float = 1.0):
        super().__init__()
        self.base, self.heads = base, heads
        self.head_lr_scale = head_lr_scale
        if head_lr_scale != 1.0:
            for mod in heads.modules():
                if isinstance(mod, nn.Linear):
                    for name in ("weight", "bias"):
                        if getattr(mod, name, None) is not None:
                            with torch.no_grad():
                                getattr(mod, name).div_(head_lr_scale)
                            parametrize.register_parametrization(mod, name, _Scale(head_lr_scale))

    def finish(self) -> MedusaHeads:
        """The trained heads with plain weights (parametrizations folded in)."""
        if self.head_lr_scale != 1.0:
            for mod in self.heads.modules():
                if parametrize.is_parametrized(mod):
                    for name in list(mod.parametrizations.keys()):
                        parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
            self.head_lr_scale = 1.0
        return self.heads

    def hidden(self, input_ids, attention_mask=None):
        """The backbone's final hidden states [B, T, d] (after the final norm: what lm_head reads)."""
        out = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


@dataclass
class MedusaLoss:
    """`loss_fn(model: HeadsLM, batch)` for `fit`. mode "medusa1" or "medusa2"."""

    mode: str = "medusa1"
    decay: float = 0.8  # lambda_k = decay^k
    lambda0: float = 0.2  # Medusa-2 weight of the heads' loss
    ramp_steps: int = 0  # Medusa-2: lambda_0 grows linearly over this many calls (0: constant)
    distill: bool = False  # Medusa-2: KL to the adapter-free teacher instead of the LM loss
    calls: int = 0

    def __post_init__(self):
        check_range("decay", self.decay, 0, 1)
        check_range("lambda0", self.lambda0, 0)
        check_range("ramp_steps", self.ramp_steps, 0, integer=True)

    def heads_loss(self, heads: MedusaHeads, hidden, labels):
        """sum_k decay^k CE(head_k at t, labels at t+k+1), over positions with a label. hidden [B, T, d]."""
        total = hidden.new_zeros((), dtype=torch.float32)
        t = hidden.shape[1]
        for i, head in enumerate(heads.heads):  # head i (0-based) predicts t + 2 + i
            shift = 2 + i
            if t <= shift:
                break
            target = labels[:, shift:]
            valid = target != IGNORE
            if not bool(valid.any()):
                continue
            logits = head(hidden[:, : t - shift][valid])  # only positions with a label: [n, V]
            total = total + (self.decay ** (i + 1)) * F.cross_entropy(logits.float(), target[valid])
        return total

    def __call__(self, model: HeadsLM, batch):
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        self.calls += 1
        if self.mode == "medusa1":
            with torch.no_grad():
                hidden = model.hidden(ids, mask)
            return self.heads_loss(model.heads, hidden.detach(), labels)
        hidden = model.hidden(ids, mask)
        logits = model.base.lm_head(hidden[:, :-1])  # [B, T-1, V] predicting t+1
        target = labels[:, 1:]
        valid = target != IGNORE
        if self.distill:
            from flashtune.tuners import disable_adapters

            with torch.no_grad(), disable_adapters(model.base):
                teacher = model.base(input_ids=ids, attention_mask=mask).logits[:, :-1]
            lm = F.kl_div(F.log_softmax(logits[valid].float(), -1), F.log_softmax(teacher[valid].float(), -1),
                          log_target=True, reduction="batchmean")
        else:
            lm = F.cross_entropy(logits[valid].float(), target[valid])
        lam = self.lambda0 * (min(1.0, self.calls / self.ramp_steps) if self.ramp_steps else 1.0)
        return lm + lam * self.heads_loss(model.heads, hidden, labels)


@torch.no_grad()
def self_distill_examples(engine, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8,
                          temperature: float = 0.0, seed: int = 0, stop_tokens=None) -> list[dict]:
    """Let the model answer `prompts` itself (with the engine) and return training examples:
    {"input_ids": prompt + answer, "labels": -100 on the prompt, the answer after it}."""
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s: s + batch_size]
        gen = engine.generate(chunk, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + s,
                              stop_tokens=stop_tokens)
        for p, ans in zip(chunk, gen.tokens):
            out.append({"input_ids": list(p) + list(ans), "labels": [IGNORE] * len(p) + list(ans)})
    return out


@torch.no_grad()
def head_accuracy(model: HeadsLM, batches, topk: int = 10) -> torch.Tensor:
    """Per-head top-k accuracy table [K, topk]: acc[k, j] = share of labelled positions where head k+1's rank-j
    candidate is the right token (teacher forcing on `batches` of input_ids / attention_mask / labels)."""
    k_heads = len(model.heads.heads)
    hits = torch.zeros(k_heads, topk, dtype=torch.float64)
    counts = torch.zeros(k_heads, dtype=torch.float64)
    for batch in batches:
        dev = next(model.parameters()).device
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        mask = batch.get("attention_mask")
        hidden = model.hidden(ids, None if mask is None else mask.to(dev))
        t = hidden.shape[1]
        for i, head in enumerate(model.heads.heads):
            shift = 2 + i
            if t <= shift:
                continue
            target = labels[:, shift:]
            valid = target != IGNORE
            if not bool(valid.any()):
                continue
            top = torch.topk(head(hidden[:, : t - shift][valid]), topk, dim=-1).indices  # [n, topk]
            hits[i] += (top == target[valid][:, None]).sum(0).double().cpu()
            counts[i] += float(valid.sum())
    return hits / counts.clamp_min(1)[:, None]
