"""RMSNorm and SwiGLU as one Triton kernel each way, for training (opt-in: `fuse_norm_mlp(model)`).

Hugging Face's Llama RMSNorm (Zhang & Sennrich, arXiv:1910.07467) runs in eager mode as ~6 kernels forward and
more backward, and autograd keeps an fp32 copy of its input; its SwiGLU MLP (Shazeer, arXiv:2002.05202) keeps
silu(gate) beside gate and up. Here each is one autograd node whose forward is one launch and whose backward is
one launch: RMSNorm saves its input in the model's dtype and one fp32 rstd per row, SwiGLU saves gate and up.
The rounding follows Hugging Face's (the normalized input and silu(gate) are rounded to the input dtype before
the product), so outputs match the modules' but for the last bit of a rare element. Liger Kernel (Hsu et al.,
arXiv:2410.10989) fuses the same two; `torch.compile` of the blocks fuses them too, so this is for the eager path.

The kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 (the tests); anything else takes the
module's own forward.
"""

from __future__ import annotations

import os
import types

import torch
import triton
import triton.language as tl

import flashtune.attention.ops  # noqa: F401 - applies the CPU-interpreter fixes the tests rely on

_BLOCK = 1024


def _kernel_ok(*ts) -> bool:
    on = all(t.is_cuda for t in ts) or (all(t.device.type == "cpu" for t in ts)
                                        and os.environ.get("TRITON_INTERPRET", "0") == "1")
    return on and all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in ts)


# ------------------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_fwd(X, W, Y, RSTD, N, eps, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    tl.store(RSTD + row, r)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    xn = (x * r).to(X.dtype.element_ty).to(tl.float32)          # Hugging Face rounds x * rstd to x's dtype first
    tl.store(Y + row * stride_y + cols, (xn * w).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, N, stride_dy, stride_x, stride_dx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(RSTD + row)
    g = dy * w                                                     # d loss / d (x * rstd)
    xh = x * r
    dx = r * (g - xh * (tl.sum(g * xh, 0) / N))
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, d = x.shape, x.shape[-1]
        x2 = x.reshape(-1, d)                                                         # [N, d]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)         # [N]
        block = triton.next_power_of_2(d)
        _rms_fwd[(x2.shape[0],)](x2, weight, y, rstd, d, eps, x2.stride(0), y.stride(0), BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.block = shape, block
        return y.view(*shape[:-1], d)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        d = x2.shape[-1]
        dy2 = dy.reshape(-1, d)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
            _rms_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, d, dy2.stride(0), x2.stride(0), dx.stride(0),
                                     BLOCK=ctx.block)
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:                    # a trained norm weight (the frozen base's is not)
            xn = (x2.float() * rstd[:, None]).to(x2.dtype).float()
            dw = (dy2.float() * xn).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), the statistics in fp32, as Hugging Face's LlamaRMSNorm."""
    return _RMSNorm.apply(x, weight, float(eps))


# -------------------------------------------------------------------------------------------------- SwiGLU
@triton.jit
def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    s = (a * tl.sigmoid(a)).to(Y.dtype.element_ty).to(tl.float32)   # silu(gate) in the input dtype, as in eager
    tl.store(Y + offs, (s * b).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(DB + offs, (dy * a * sig).to(DB.dtype.element_ty), mask=ok)
    tl.store(DA + offs, (dy * b * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=ok)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        n = a.numel()
        _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](a, b, y, n, BLOCK=_BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dy, a, b, da, db, n, BLOCK=_BLOCK)
        return da, db


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    return _SwiGLU.apply(gate, up)


# ------------------------------------------------------------------------------------------ model patching
def _norm_forward(self, x):
    if not _kernel_ok(x, self.weight):
        return type(self).forward(self, x)
    return rms_norm(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.shape != up.shape or gate.dtype != up.dtype or not _kernel_ok(gate, up):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(silu_mul(gate, up))


def _is_llama_norm(m) -> bool:
    # Llama-style: weight * normalized (Gemma's (1 + weight) norms keep their own forward).
    return (type(m).__name__.endswith("RMSNorm") and "Gemma" not in type(m).__name__
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_swiglu_mlp(m) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(isinstance(getattr(m, p, None), torch.nn.Module) for p in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def fuse_norm_mlp(model: torch.nn.Module) -> dict:
    """Route the model's Llama-style RMSNorms and SiLU-gated MLPs through the fused kernels (in place).

    Returns how many of each were switched. `unfuse_norm_mlp` undoes it.
    """
    n = {"rms_norm": 0, "swiglu": 0}
    for m in model.modules():
        if _is_llama_norm(m):
            m.forward = types.MethodType(_norm_forward, m)
            n["rms_norm"] += 1
        elif _is_swiglu_mlp(m):
            m.forward = types.MethodType(_mlp_forward, m)
            n["swiglu"] += 1
    return n


def unfuse_norm_mlp(model: torch.nn.Module) -> None:
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) in (_norm_forward, _mlp_forward):
            del m.forward
