"""Launchers for the Triton kernels, wrapped as ``torch.library`` custom ops and an ``autograd.Function``.

FlashAttention-2 (Dao, arXiv:2307.08691). The custom ops (``flashtune::attn_fwd`` / ``flashtune::attn_bwd``)
carry ``register_fake`` shape functions so ``torch.compile`` traces through them without running Triton.

Tensor conventions here (the public function in interface.py does the checking):
- dense: q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D); lse (B, Lq, Hq) float32.
- varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_seqlens_q/k (S+1,) int32; lse (Tq, Hq) float32.
The last dimension must be contiguous (stride 1); other strides are passed to the kernels as they are.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from . import kernels

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_fixes() -> None:
    """Three gaps in Triton 3.6's CPU interpreter (used by the tests only). It turns a scalar into ``int`` with
    ``int(array_of_shape_1)``, which numpy 2.4 refuses, so loops with run-time bounds fail: make ``__index__``
    read the single element. Its ``tl.dot`` multiplies bfloat16 *bit patterns* (stored as uint16): widen
    bfloat16 operands to float32 first (exact, so the product matches the GPU's fp32-accumulated one). And its
    float32 -> bfloat16 cast truncates: round to nearest even, as the GPU does."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if not getattr(builder.cast_impl, "_flashtune", False):
        cast = builder.cast_impl

        def cast_impl(self, src, dst_type):
            if src.dtype.scalar.is_fp32() and dst_type.scalar.is_bf16():
                bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
                rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                out = np.where(np.isnan(src.data), np.uint32(0x7FC0), rounded).astype(np.uint16)
                return interpreter.TensorHandle(out, dst_type.scalar)
            return cast(self, src, dst_type)

        cast_impl._flashtune = True
        builder.cast_impl = cast_impl
        builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    if not getattr(builder.create_dot, "_flashtune", False):
        dot = builder.create_dot

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            def widen(h):
                if h.dtype.scalar.is_bf16():
                    bits = h.data.astype(np.uint32) << np.uint32(16)
                    return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)
                return h
            return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

        create_dot._flashtune = True
        builder.create_dot = create_dot

    original = interpreter._patch_lang_tensor
    if getattr(original, "_flashtune", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._flashtune = True
    interpreter._patch_lang_tensor = patched


if _INTERPRET:
    _interpreter_fixes()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 costs microseconds a call)."""
    return 1 << max(n - 1, 0).bit_length()


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation; the tests replace it with a NaN-filled one to prove every element gets written."""
    return torch.empty(shape, device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# Block shapes and launch settings by head dim, measured on the H200 (bench/notes/attention.md).
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
_FWD = {32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
_FWD_CAUSAL = {32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 128, 8, 3), 256: (64, 32, 4, 2)}
_DKDV = {32: (32, 128, 4, 3), 64: (32, 128, 4, 3), 128: (64, 128, 8, 3), 256: (32, 64, 4, 1)}
_DQ = {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 128, 8, 2), 256: (64, 32, 4, 1)}
# dQ by float32 atomics inside the dK/dV kernel (one pass) instead of a second kernel, per head dim.
_ATOMIC_DQ = {32: False, 64: False, 128: False, 256: False}
_OVERRIDE: dict[str, tuple] = {}  # bench/attention.py's tuning sweep fills this


def _pick(table: dict, name: str, block_d: int, rows: int):
    if name in _OVERRIDE:
        return _OVERRIDE[name]
    if _INTERPRET:
        return (32, 32, 4, 1)
    bm, bn, warps, stages = table[block_d]
    if name in ("fwd", "fwd_causal", "dq"):
        bm = min(bm, max(16, _pow2(max(rows, 1))))  # decoding: few rows
    return bm, bn, warps, stages


def _strides3(t: torch.Tensor, varlen: bool):
    """(batch, token, head) strides of a (B, L, H, D) or (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _tree_args(tree: torch.Tensor | None, dummy: torch.Tensor):
    if tree is None:
        return dummy, 0, 0
    return tree, (0 if tree.shape[0] == 1 else tree.stride(0)), tree.stride(1)


def _splits(programs: int, lk: int, device: torch.device, block_n: int) -> int:
    """Split the keys over several programs when the grid alone cannot fill the GPU (decoding)."""
    if _INTERPRET or device.type != "cuda":
        return 1
    sms = _num_sms(device.index or 0)
    if programs >= sms or lk < 1024:
        return 1
    return max(1, min(_cdiv(2 * sms, programs), lk // 256, 64))


def fwd_launch(q, k, v, cu_q, cu_k, tree, scale: float, causal: bool, prefix_len: int, max_q: int, max_k: int,
               num_splits: int | None = None):
    varlen = cu_q is not None
    d = q.shape[-1]
    hq, hk = q.shape[-2], k.shape[-2]
    group = hq // hk
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    block_d = max(16, _pow2(d))
    name = "fwd_causal" if causal else "fwd"
    bm, bn, warps, stages = _pick(_FWD_CAUSAL if causal else _FWD, name, block_d, max_q * group)
    m_blocks = _cdiv(max_q * group, bm)
    lse_shape = q.shape[:-1]  # (B, Lq, Hq) or (Tq, Hq)
    splits = num_splits or _splits(m_blocks * batch * hk, max_k, q.device, bn)
    split_len = _cdiv(_cdiv(max_k, splits), bn) * bn
    splits = _cdiv(max_k, split_len) if max_k > 0 else 1
    if splits > 1:
        out_buf = _empty((splits, *q.shape), device=q.device, dtype=torch.float32)
        lse_buf = _empty((splits, *lse_shape), device=q.device, dtype=torch.float32)
        o_view, l_view = out_buf[0], lse_buf[0]
        so, sl = out_buf.stride(0), lse_buf.stride(0)
    else:
        out_buf = _empty(q.shape, device=q.device, dtype=q.dtype)
        lse_buf = _empty(lse_shape, device=q.device, dtype=torch.float32)
        o_view, l_view, so, sl = out_buf, lse_buf, 0, 0
    tree_t, stb, stq = _tree_args(tree, q)
    dummy_cu = cu_q if varlen else q
    lb, lt = (0, l_view.stride(0)) if varlen else (l_view.stride(0), l_view.stride(1))
    grid = (m_blocks, batch * hk, splits)
    kernels._fwd_kernel[grid](
        q, k, v, out_buf, lse_buf, tree_t, dummy_cu, cu_k if varlen else q, scale * kernels.LOG2E,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), so, *_strides3(o_view, varlen),
        sl, lb, lt, stb, stq,
        max_q, max_k, prefix_len, hk, m_blocks, split_len if splits > 1 else max(max_k, 1),
        HEAD_DIM=d, BLOCK_D=block_d, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        HAS_TREE=tree is not None, VARLEN=varlen, PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)
    if splits == 1:
        return out_buf, lse_buf
    out = _empty(q.shape, device=q.device, dtype=q.dtype)
    lse = _empty(lse_shape, device=q.device, dtype=torch.float32)
    rows = lse.numel()
    kernels._split_combine_kernel[(rows,)](out_buf, lse_buf, out, lse, rows, splits, out_buf.stride(0),
                                           lse_buf.stride(0), HEAD_DIM=d, BLOCK_D=block_d,
                                           BLOCK_S=max(2, _pow2(splits)))
    return out, lse


def bwd_launch(do, q, k, v, out, lse, cu_q, cu_k, tree, scale: float, causal: bool, prefix_len: int,
               max_q: int, max_k: int):
    varlen = cu_q is not None
    d = q.shape[-1]
    hq, hk = q.shape[-2], k.shape[-2]
    group = hq // hk
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    block_d = max(16, _pow2(d))
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = _empty(q.shape[:-1], device=q.device, dtype=torch.float32)  # rowsum(dO * O): (B, Lq, Hq) | (Tq, Hq)
    n_rows = delta.numel()
    seqlen = q.shape[0] if varlen else q.shape[1]
    kernels._bwd_delta_kernel[(_cdiv(n_rows, 64),)](
        out, do, delta, n_rows, seqlen, hq, *_strides3(out, varlen), *_strides3(do, varlen),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=64)
    lse = lse.contiguous()
    dq = _empty(q.shape, device=q.device, dtype=q.dtype)
    dk = _empty(k.shape, device=k.device, dtype=k.dtype)
    dv = _empty(v.shape, device=v.device, dtype=v.dtype)
    tree_t, stb, stq = _tree_args(tree, q)
    cu_qa = cu_q if varlen else q
    cu_ka = cu_k if varlen else q
    lb, lt = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    prec = _prec(q.dtype)
    atomic = _OVERRIDE.get("atomic_dq", (_ATOMIC_DQ.get(block_d, False),))[0]
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else dq
    bm, bn, warps, stages = _pick(_DKDV, "dkdv", block_d, max_q * group)
    kernels._bwd_dkdv_kernel[(_cdiv(max_k, bn), batch * hk)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, tree_t, cu_qa, cu_ka, scale * kernels.LOG2E, scale,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
        *_strides3(dk, varlen), *_strides3(dv, varlen), *_strides3(dq_acc, varlen), lb, lt, stb, stq,
        max_q, max_k, prefix_len, hk,
        HEAD_DIM=d, BLOCK_D=block_d, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        HAS_TREE=tree is not None, VARLEN=varlen, PREC=prec, ATOMIC_DQ=atomic, num_warps=warps,
        num_stages=stages)
    if atomic:
        dq.copy_(dq_acc)
        return dq, dk, dv
    bm, bn, warps, stages = _pick(_DQ, "dq", block_d, max_q * group)
    m_blocks = _cdiv(max_q * group, bm)
    kernels._bwd_dq_kernel[(m_blocks, batch * hk)](
        q, k, v, do, lse, delta, dq, tree_t, cu_qa, cu_ka, scale * kernels.LOG2E, scale,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
        *_strides3(dq, varlen), lb, lt, stb, stq,
        max_q, max_k, prefix_len, hk, m_blocks,
        HEAD_DIM=d, BLOCK_D=block_d, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        HAS_TREE=tree is not None, VARLEN=varlen, PREC=prec, num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ---- torch.library custom ops ---------------------------------------------------------------------------

@torch.library.custom_op("flashtune::attn_fwd", mutates_args=())
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
             cu_seqlens_k: torch.Tensor | None, tree_mask: torch.Tensor | None, softmax_scale: float,
             causal: bool, prefix_len: int, max_seqlen_q: int, max_seqlen_k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, tree_mask, softmax_scale, causal, prefix_len,
                      max_seqlen_q, max_seqlen_k)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, tree_mask, softmax_scale, causal, prefix_len,
                   max_seqlen_q, max_seqlen_k):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1],
                                                                                   dtype=torch.float32)


@torch.library.custom_op("flashtune::attn_bwd", mutates_args=())
def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
             tree_mask: torch.Tensor | None, softmax_scale: float, causal: bool, prefix_len: int,
             max_seqlen_q: int, max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bwd_launch(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, tree_mask, softmax_scale, causal,
                      prefix_len, max_seqlen_q, max_seqlen_k)


@attn_bwd.register_fake
def _attn_bwd_fake(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, tree_mask, softmax_scale, causal,
                   prefix_len, max_seqlen_q, max_seqlen_k):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


class FlashAttnFunction(torch.autograd.Function):
    """out, lse = FlashAttnFunction.apply(q, k, v, cu_q, cu_k, tree, scale, causal, prefix_len, max_q, max_k).

    Saves q, k, v, out and the log-sum-exp; the backward recomputes the probabilities tile by tile.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, tree, scale, causal, prefix_len, max_q, max_k):
        out, lse = attn_fwd(q, k, v, cu_q, cu_k, tree, scale, causal, prefix_len, max_q, max_k)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, tree)
        ctx.args = (scale, causal, prefix_len, max_q, max_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, tree = ctx.saved_tensors
        scale, causal, prefix_len, max_q, max_k = ctx.args
        dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, tree, scale, causal, prefix_len, max_q, max_k)
        return dq, dk, dv, None, None, None, None, None, None, None, None
