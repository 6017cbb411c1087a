"""A fused LoRA linear for training: y = x W^T + b + s (x A^T) B^T in one autograd node.

LoRA (Hu et al., arXiv:2106.09685). The tuner's layer (`flashtune.tuners.lora.LoraLayer`, the reference)
computes the base product and the branch as separate modules, casting x to the adapter's fp32 and, under
autocast, back to bf16: every adapted projection keeps its own bf16 copy of its input for backward, which for
seven projections per block is a third of the block's activations. Here the base product and the branch share
one saved input (the very tensor the caller passed, so q/k/v share it too), the branch is accumulated into
the base output by one `addmm`, and backward computes the input gradient as `gy W + (s gy B) A` with another
`addmm`. Adapter weights stay fp32 parameters; their products run in the autocast dtype and their gradients
come back in fp32.

Dropout on the branch input (`lora_dropout`, Srivastava et al., JMLR 2014) is fused too: the kept-element mask
is drawn once in forward and saved as one byte per element (instead of a dropped copy of the input), the
branch reads x * mask / (1 - p), and backward applies the same mask to the branch's share of the input
gradient and to A's gradient.

`fuse_lora(model)` switches LoRA layers to this path where it applies (a plain nn.Linear base, one live
unmerged adapter, identity or nn.Dropout on the branch); any other case falls back to the layer's own forward
at call time.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def keep_mask(x2: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask: True where an element of x2 [N, in] is kept, each with probability 1 - p."""
    return torch.empty(x2.shape, dtype=torch.uint8, device=x2.device).bernoulli_(1.0 - p).bool()


def _dropped(x2: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """x2 * keep / (1 - p), or x2 itself without dropout."""
    return x2 if keep is None else x2 * keep * (1.0 / (1.0 - p))


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dtype, p):
        # x [..., in], weight [out, in], lora_a [r, in], lora_b [out, r]; p: dropout on the branch input
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)                                     # [N, in]
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        keep = keep_mask(x2, p) if p > 0 else None                                     # bool [N, in]
        u = _dropped(x2, keep, p) @ a.t()                                              # [N, r]
        y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())    # [N, out]
        y = torch.addmm(y, u, b.t(), alpha=scale)                                      # y + s u B^T
        ctx.save_for_backward(x2, u, weight, lora_a, lora_b, keep)
        ctx.scale, ctx.dtype, ctx.x_meta, ctx.p = scale, dtype, (x.shape, x.dtype), p
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, u, weight, lora_a, lora_b, keep = ctx.saved_tensors
        dtype, s, p = ctx.dtype, ctx.scale, ctx.p
        gy2 = gy.reshape(-1, gy.shape[-1]).to(dtype)                                  # [N, out]
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        gu = (gy2 @ b).mul_(s)                                                         # [N, r]
        gx = gw = gbias = ga = gb = None
        if ctx.needs_input_grad[0]:
            if keep is None:
                gx = torch.addmm(gy2 @ weight.to(dtype), gu, a)                        # [N, in]
            else:  # the branch's share goes back through the dropout mask
                gx = gy2 @ weight.to(dtype) + _dropped(gu @ a, keep, p)
            gx = gx.view(ctx.x_meta[0]).to(ctx.x_meta[1])
        if ctx.needs_input_grad[1]:
            gw = (gy2.t() @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gbias = gy2.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            ga = (gu.t() @ _dropped(x2, keep, p)).to(lora_a.dtype)                    # [r, in]
        if ctx.needs_input_grad[4]:
            gb = (gy2.t() @ u).mul_(s).to(lora_b.dtype)                                # [out, r]
        return gx, gw, gbias, ga, gb, None, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """x W^T + bias + scale (drop(x) A^T) B^T, drop: dropout with probability `dropout` on the branch input;
    products in the autocast dtype when autocast is on, else x's."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scale), dtype, float(dropout))


def _fused_forward(self, x, *args, **kwargs):
    name = self.live_adapter()
    base = self.base_layer
    drop = self.lora_dropout[name] if name is not None else None
    if (name is None or self.merged or args or kwargs or type(base) is not nn.Linear or self.fan_in_fan_out
            or type(drop) not in (nn.Identity, nn.Dropout)):
        return type(self).forward(self, x, *args, **kwargs)
    p = drop.p if type(drop) is nn.Dropout and drop.training else 0.0
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], p)


def fuse_lora(model: nn.Module) -> int:
    """Route the model's LoRA layers through `lora_linear` (in place); return how many layers were switched."""
    try:
        from flashtune.tuners.lora import LoraLayer
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def unfuse_lora(model: nn.Module) -> None:
    """Undo `fuse_lora`: the layers use their own forward again."""
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _fused_forward:
            del module.forward
