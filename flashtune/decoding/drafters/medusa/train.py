"""Training Medusa heads: Medusa-1 (frozen backbone) and Medusa-2 (jointly with LoRA).

Paper: Cai et al., "Medusa" (arXiv 2401.10774), §2.2. Losses, with head k (1-based) predicting token t+k+1:

    Medusa-1:  L = sum_k lambda_k CE(head_k(h_t), y_{t+k+1}),                       lambda_k = 0.8^k
    Medusa-2:  L = L_LM + lambda_0 * sum_k 0.8^k CE_k,  lambda_0 = 0.2 (optionally ramped linearly)
               with self-distillation, L_LM = KL(p_teacher || p_student) on the base head, the teacher being the
               same model with its adapters disabled; the heads keep hard-label CE.

The heads' learning rate is 4x the backbone's in Medusa-2. A training loop has one learning rate, so `HeadsLM`
stores the heads' weights divided by `head_lr_scale` and multiplies them back in forward: Adam's step does not
depend on the gradient's scale, so the heads then move `head_lr_scale` times faster.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from flashtune.decoding.drafters.base import HeadsLoss, WithHeads, offset_accuracy, offset_losses
from flashtune.decoding.drafters.medusa.heads import MedusaHeads
from flashtune.errors import check_choice, check_range


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class HeadsLM(WithHeads):
    """The HF causal LM plus Medusa heads, as one module for a training loop. Trainable: the heads, plus whatever
    the base has with requires_grad (LoRA for Medusa-2; nothing for Medusa-1)."""

    def __init__(self, base: nn.Module, heads: MedusaHeads, head_lr_scale: float = 1.0):
        super().__init__(base, heads)
        self.head_lr_scale = head_lr_scale
        if head_lr_scale != 1.0:
            for mod in heads.modules():
                if isinstance(mod, nn.Linear):
                    for name in ("weight", "bias"):
                        if getattr(mod, name, None) is not None:
                            with torch.no_grad():
                                getattr(mod, name).div_(head_lr_scale)
                            parametrize.register_parametrization(mod, name, _Scale(head_lr_scale))

    @property
    def base(self):
        return self.model

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
        return self.heads.features(self.model, input_ids, attention_mask)[0]


class MedusaLoss(HeadsLoss):
    """`loss_fn(model: HeadsLM, batch)`. mode "medusa1" (heads only, base frozen) or "medusa2" (LM loss, or
    with `distill` the KL to the adapter-free base, plus lambda_0 times the heads' loss)."""

    name = "medusa"

    def __init__(self, mode: str = "medusa1", decay: float = 0.8, lambda0: float = 0.2, ramp_steps: int = 0,
                 distill: bool = False):
        check_choice("mode", mode, ("medusa1", "medusa2"))
        check_range("decay", decay, 0, 1)
        check_range("lambda0", lambda0, 0)
        check_range("ramp_steps", ramp_steps, 0, integer=True)
        super().__init__(distill=distill)
        self.mode, self.decay, self.lambda0, self.ramp_steps = mode, decay, lambda0, ramp_steps
        self.calls = 0

    def joint(self, wrapper) -> bool:
        return self.mode == "medusa2"

    def weights(self, n, wrapper, labels):
        self.calls += 1
        lam = 1.0
        if self.mode == "medusa2":
            lam = self.lambda0 * (min(1.0, self.calls / self.ramp_steps) if self.ramp_steps else 1.0)
        return [lam * self.decay ** (i + 1) for i in range(n)]

    def heads_loss(self, heads: MedusaHeads, hidden, labels):
        """sum_k decay^k CE(head_k at t, labels at t+k+1), over positions with a label. hidden [B, T, d]."""
        losses = offset_losses(heads, heads.offsets(hidden, None), labels)
        return sum(self.decay ** (i + 1) * x for i, x in enumerate(losses))


def head_accuracy(model: HeadsLM, batches, topk: int = 10) -> torch.Tensor:
    """Per-head top-k accuracy table [K, topk]: acc[k, j] = share of labelled positions where head k+1's rank-j
    candidate is the right token (teacher forcing on `batches` of input_ids / attention_mask / labels)."""
    return offset_accuracy(model, batches, topk)
