"""Mixed-precision policy: one setting gives an autocast context, a GradScaler (fp16 only) and fp32 trainables.

Mixed Precision Training (Micikevicius et al., arXiv:1710.03740): matrix products run in a 16-bit type while
the weights that are updated, and the optimizer state, stay in fp32; with fp16 the loss is scaled so small
gradients do not underflow, and a step whose gradients overflowed is skipped while the scale shrinks.
Everything here is `torch.amp`; this module only decides which pieces a precision needs.

    policy = PrecisionPolicy("bf16", device)
    with policy.autocast():
        loss = loss_fn(model, batch)
    policy.scaler.scale(loss).backward()      # scaler is a no-op (enabled=False) unless fp16
"""

from __future__ import annotations

import contextlib

import torch

from flashtune.errors import ConfigError, check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionPolicy:
    """What a precision setting means on one device: autocast dtype, loss scaler, fp32 trainables."""

    def __init__(self, precision: str, device: torch.device | str = "cpu"):
        check_choice("precision", precision, PRECISIONS)
        self.precision = precision
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.autocast_dtype = _AUTOCAST_DTYPE[precision]
        # Disabled scalers pass losses and steps through untouched, so the training loop has one code path.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")

    def autocast(self):
        """A context in which forward passes run in this precision (nothing for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def prepare(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """Cast the trainable parameters to fp32 in place (master weights); return them as (name, param).

        The frozen base may be held in bf16/fp16 to save memory; what trains must not be, or AdamW's updates
        (lr * m / sqrt(v), often below bf16's resolution of the weight) would round away.
        """
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no trainable parameters; attach an adapter (flashtune.attach) "
                              "or set requires_grad=True on what should train")
        half = {p.dtype for p in model.parameters() if not p.requires_grad} & {torch.float16, torch.bfloat16}
        if half and self.precision == "fp32":
            kind = "bf16" if torch.bfloat16 in half else "fp16"
            raise ConfigError(f"precision='fp32' but the frozen base model is held in {kind}; "
                              f"use precision='{kind}' or load the model in float32")
        for _, p in trainable:
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return trainable
