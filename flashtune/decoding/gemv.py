"""Split-K GEMV for the memory-bound decode step: y = x @ W^T (+ bias) for a few rows x and a large weight W.

Idea: at 1-16 rows a linear layer reads every weight byte once and does ~2 flops per byte, so its time is the
weight's size over HBM bandwidth, if enough loads are in flight on every SM. A matrix of 2048-2560 output
columns gives only 32-160 column tiles, too few programs for the 132 SMs of an H100/H200, so the reduction
dimension K is split as well (split-K, the partition Flash-Decoding applies to the keys of attention:
Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023; the same memory-bound argument as
the "Accelerating Generative AI" posts behind gpt-fast: decoding time is bytes read over bandwidth).

  grid        (column tiles x SPLIT_K, row blocks of 16): each program owns BLOCK_N output columns, 16 rows
              and one K slice, and walks its slice in BLOCK_K steps with wide contiguous loads of W
  reduction   deterministic, no atomic adds: each program writes its fp32 partial [16, BLOCK_N] to a
              workspace [SPLIT_K, M, N]; the last program of a column tile (a ticket counter tells it which
              one it is) sums the SPLIT_K partials in split order 0, 1, ... and writes y. The same sum in a
              second small kernel (`serial=False`, or while a CUDA graph is being captured and the counters
              would need to grow) gives the same bits.
  products    tl.dot on a fixed 16-row tile, rows past M clamped to real rows and discarded: tensor cores make
              the multiply free at any row count <= 16, and a row's result never involves another row's data.
              (A broadcast multiply + tl.sum would hold a [rows, BLOCK_N, BLOCK_K] product in registers and
              force tiles too small to keep enough bytes in flight.)

Batch invariance: the tiles, the split and the K order are a function of the weight's shape (N, K) only
(`config_for`), never of the row count, and the 16-row tile is fixed; so row m's result is bit for bit the
same whether it comes alone or with other rows, for any number of rows (more than 16 rows: more row blocks
with the same arithmetic). That makes this one kernel usable by the engine's `invariant` mode for every row
count (`INVARIANT`), as well as by its default path for small row counts (`ENABLED`, `MAX_ROWS`).

The ticket counters are one buffer per device that the last program of each tile resets to zero, so two
launches must not run at the same time on different streams (the engine uses one stream).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import flashtune.attention.ops  # noqa: F401 - applies the CPU-interpreter fixes the tests rely on

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Engine switches (decoding/model.py `_linear`), off until measured on the GPU:
ENABLED = False  # default (non-invariant) path: linears with at most MAX_ROWS rows run here instead of cuBLAS
MAX_ROWS = 16
INVARIANT = False  # invariant mode: every linear runs here (any row count) instead of invariant.linear_fixed

BLOCK_M = 16  # rows per tile: fixed, so that a row's arithmetic never depends on the row count
SMS = 132  # H100 / H200 SM count; the rule aims at a few programs per SM


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    serial: bool = True  # split-K partials summed by the last program (True) or by a second kernel (False)


# Measured picks per weight shape (N, K), which override the rule: the fastest config over 1 and 8 rows in
# bench/results/gemv-h200.json (H200; the 1.1B Llama shape's and SmolLM2-135M's decode matrices).
TABLE: dict[tuple[int, int], GemvConfig] = {
    (2560, 2048): GemvConfig(32, 128, 4, 4, 4, True),
    (2048, 2048): GemvConfig(32, 128, 4, 4, 4, True),
    (11264, 2048): GemvConfig(64, 256, 1, 4, 3, True),
    (2048, 5632): GemvConfig(32, 128, 4, 4, 4, True),
    (32000, 2048): GemvConfig(128, 128, 1, 8, 3, True),
    (960, 576): GemvConfig(16, 256, 1, 4, 3, True),
    (576, 576): GemvConfig(16, 128, 1, 4, 3, True),
    (3072, 576): GemvConfig(64, 128, 1, 4, 4, True),
    (576, 1536): GemvConfig(32, 128, 4, 4, 4, True),
    (49152, 576): GemvConfig(128, 128, 1, 8, 3, True),
}


def default_config(n: int, k: int) -> GemvConfig:
    """The rule: 16/32/64-column tiles as N grows, K steps of 256 (128 for K < 1024), and K split in 2, 4 or 8
    while there are fewer than ~4 programs per SM and each slice keeps at least 512 of K."""
    block_n = 16 if n <= 4096 else 32 if n <= 16384 else 64
    block_k = 256 if k >= 1024 else 128
    tiles = triton.cdiv(n, block_n)
    split = 1
    while split < 8 and tiles * split < 4 * SMS and k >= 1024 * split:
        split *= 2
    return GemvConfig(block_n, block_k, split, num_warps=4, num_stages=3)


def config_for(n: int, k: int) -> GemvConfig:
    """The configuration for a [N, K] weight: a function of the shape only (the batch invariance)."""
    return TABLE.get((n, k)) or default_config(n, k)


@triton.jit
def _write_sum(P, BIAS, Y, rm, rn, M, N, stride_ps, stride_ym,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[rm, rn] = (partial_0 + partial_1 + ... in split order) + bias, from the workspace P [SPLIT_K, M, N]."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = P + rm[:, None] * N + rn[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")  # .cg: other SMs wrote it, skip L1
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(X, W, BIAS, Y, P, TICKETS, M, N, K, K_SLICE, stride_xm, stride_wn, stride_ym, stride_ps,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, SERIAL: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)  # column tile * SPLIT_K + K slice
    pid_m = tl.program_id(1)
    pid_n = pid // SPLIT_K
    pid_k = pid % SPLIT_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows and columns past the ends read real ones (clamped) and are never stored: no masks on the wide loads
    xm = tl.minimum(rm, M - 1)
    wn = tl.minimum(rn, N - 1)
    k_lo = pid_k * K_SLICE  # K_SLICE: a multiple of BLOCK_K
    k_hi = tl.minimum(K, k_lo + K_SLICE)
    x_ptrs = X + xm[:, None] * stride_xm + (k_lo + rk)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + wn[:, None] * stride_wn + (k_lo + rk)[None, :]  # [BLOCK_N, BLOCK_K], contiguous along K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # one K order per (N, K): the same for every row count
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
    else:
        tl.store(P + pid_k * stride_ps + rm[:, None] * N + rn[None, :], acc,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
        if SERIAL:
            tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release)
            ticket = TICKETS + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
            if tl.atomic_add(ticket, 1, sem="acq_rel") == SPLIT_K - 1:  # the last slice of this tile
                _write_sum(P, BIAS, Y, rm, rn, M, N, stride_ps, stride_ym, HAS_BIAS, SPLIT_K)
                tl.atomic_xchg(ticket, 0, sem="relaxed")  # ready for the next launch


@triton.jit(do_not_specialize=["M"])
def _sum_kernel(P, BIAS, Y, M, N, stride_ps, stride_ym,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    _write_sum(P, BIAS, Y, rm, rn, M, N, stride_ps, stride_ym, HAS_BIAS, SPLIT_K)


_TICKETS: dict = {}  # device -> int32 counters, all zero between launches; never freed (graphs keep pointers)


def _tickets(device, count: int):
    """A zeroed int32 buffer of at least `count` counters, or None while a CUDA graph is being captured and the
    buffer would have to grow (the caller then sums in a second kernel: same bits)."""
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(count, 1 << 14), dtype=torch.int32, device=device)
        _TICKETS[device] = buf
        _KEEP.append(buf)
    return buf


_KEEP: list = []


def gemv(x, weight, bias=None, config: GemvConfig | None = None):
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype, fp32 accumulation; each row's result
    independent of the other rows and of their number. `config`: override `config_for(N, K)` (benchmarks; an
    override that depends on the row count breaks the invariance). On the CPU outside Triton's interpreter:
    F.linear."""
    k = x.shape[-1]
    n = weight.shape[0]
    if not (x.is_cuda or _INTERPRET):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, k)  # [..., K] -> [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    cfg = config or config_for(n, k)
    split = cfg.split_k
    k_slice = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k  # slices aligned to BLOCK_K
    tiles, row_blocks = triton.cdiv(n, cfg.block_n), triton.cdiv(m, BLOCK_M)
    part = tickets = None
    serial = cfg.serial
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)  # [SPLIT_K, M, N] partials
        tickets = _tickets(x.device, tiles * row_blocks) if serial else None
        serial = tickets is not None
    has_bias = bias is not None
    _gemv_kernel[(tiles * split, row_blocks)](
        x2, w, bias if has_bias else w, y, part if part is not None else y, tickets if serial else y,
        m, n, k, k_slice, x2.stride(0), w.stride(0), y.stride(0), m * n,
        HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        SERIAL=serial, EVEN_K=k % cfg.block_k == 0, PRECISION="ieee" if w.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1 and not serial:
        _sum_kernel[(tiles, row_blocks)](part, bias if has_bias else w, y, m, n, m * n, y.stride(0),
                                         HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, SPLIT_K=split,
                                         num_warps=4)
    return y.view(*x.shape[:-1], n)


def routes(x, invariant: bool) -> bool:
    """Whether the engine's `_linear` sends x [..., K] through `gemv` (CUDA, or the interpreter in tests)."""
    if not (x.is_cuda or _INTERPRET):
        return False
    if invariant:
        return INVARIANT
    return ENABLED and x.numel() <= MAX_ROWS * x.shape[-1]
