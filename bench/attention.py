"""FlashAttention benchmark and GPU check: flashtune's Triton kernels against SDPA (flash backend, cuDNN, and
SDPA with an explicit mask) in one run on one GPU.

    python3 bench/attention.py            # check, then the benchmark grid and the masked cases
    python3 bench/attention.py --check    # correctness only, on every case; exit 1 on any failure
    python3 bench/attention.py --tune     # time candidate block shapes per kernel and head dim
    python3 bench/attention.py --smoke    # a tiny CPU run through the interpreter (every code path)

FLOPs: 4·b·h·n²·d for a forward pass (halved when causal), forward+backward = 3.5× forward.
Writes bench/results/attention-h200.json (or --out) with the GPU name, versions and every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flashtune.attention import attention_reference, flash_attention  # noqa: E402
from flashtune.attention import ops  # noqa: E402

F = torch.nn.functional


# ---- correctness -----------------------------------------------------------------------------------------

def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_case(name, *, b=2, lq=113, lk=None, hq=4, hk=2, d=64, dtype=torch.bfloat16, causal=False, tree=False,
               varlen=None, prefix=0, grad=True, device="cuda", seed=0):
    """Kernel vs float64 reference, held to 2x (3x for gradients) the error of the same math in `dtype`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lk = lk or lq
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kw = dict(causal=causal)
    if varlen:
        lens_q = torch.tensor(varlen[0], dtype=torch.int32)
        lens_k = torch.tensor(varlen[1], dtype=torch.int32)
        cu_q = torch.zeros(len(lens_q) + 1, dtype=torch.int32)
        cu_q[1:] = lens_q.cumsum(0)
        cu_k = torch.zeros(len(lens_k) + 1, dtype=torch.int32)
        cu_k[1:] = lens_k.cumsum(0)
        q, k, v = rnd(int(cu_q[-1]), hq, d), rnd(int(cu_k[-1]), hk, d), rnd(int(cu_k[-1]), hk, d)
        kw.update(cu_seqlens_q=cu_q.to(device), cu_seqlens_k=cu_k.to(device))
        nb = len(lens_q)
    else:
        q, k, v = rnd(b, lq, hq, d), rnd(b, lk, hk, d), rnd(b, lk, hk, d)
        nb = b
    if prefix:
        kw.update(prefix_k=rnd(nb, prefix, hk, d), prefix_v=rnd(nb, prefix, hk, d))
    if tree:
        tm = torch.rand(lq, lq, generator=g) < 0.3
        tm |= torch.eye(lq, dtype=torch.bool)
        kw.update(tree_mask=tm.to(device))
    leaves = [q, k, v] + ([kw["prefix_k"], kw["prefix_v"]] if prefix else [])
    for t in leaves:
        t.requires_grad_(grad)
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    ref_kw = {**kw}
    if prefix:
        ref_kw.update(prefix_k=kw["prefix_k"].double(), prefix_v=kw["prefix_v"].double())
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **ref_kw)
    low = attention_reference(q, k, v, compute_dtype=dtype, **kw)
    eps = 1e-5
    ok = bool(torch.isfinite(out).all()) and _err(out, ref) <= 2 * _err(low, ref) + eps
    lse_ok = _err(lse, ref_lse) <= 1e-3 * (1 + ref_lse.abs().max().item() if torch.isfinite(ref_lse).all() else 1)
    row = dict(case=name, out_err=_err(out, ref), torch_err=_err(low, ref), lse_err=_err(lse, ref_lse))
    ok = ok and lse_ok
    if grad:
        do = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
        gk = torch.autograd.grad(out, leaves, do)
        gr = torch.autograd.grad(ref, leaves, do.double())
        gl = torch.autograd.grad(low, leaves, do)
        for n, a, r, lo in zip(("dq", "dk", "dv", "dpk", "dpv"), gk, gr, gl):
            good = bool(torch.isfinite(a).all()) and _err(a, r) <= 3 * _err(lo, r) + eps
            row[n + "_err"], row[n + "_torch_err"] = _err(a, r), _err(lo, r)
            ok = ok and good
    row["ok"] = ok
    return row


CHECK_CASES = [
    ("dense hd64", dict(d=64)),
    ("dense hd64 causal", dict(d=64, causal=True)),
    ("causal gqa hd128 fp16", dict(d=128, hq=8, hk=2, causal=True, dtype=torch.float16)),
    ("mqa hd128 lq<lk", dict(d=128, hq=4, hk=1, lq=37, lk=203, causal=True)),
    ("hd32", dict(d=32, causal=True)),
    ("hd80 (padded)", dict(d=80, causal=True)),
    ("hd96 (padded)", dict(d=96)),
    ("hd256", dict(d=256, causal=True, lq=77)),
    ("varlen causal gqa", dict(d=128, hq=8, hk=2, causal=True, varlen=([113, 1, 203, 64], [113, 1, 203, 64]))),
    ("varlen kv offset", dict(d=64, causal=True, varlen=([5, 17, 1], [100, 17, 300]))),
    ("prefix causal", dict(d=128, causal=True, prefix=19)),
    ("prefix varlen", dict(d=64, causal=True, prefix=7, varlen=([50, 31], [50, 31]))),
    ("tree 64 after 300", dict(d=128, hq=8, hk=2, lq=64, lk=364, tree=True, b=2)),
    ("tree+causal odd", dict(d=64, lq=29, lk=29 + 97, tree=True, causal=True)),
    ("decode q=1 4k split", dict(d=128, hq=8, hk=2, lq=1, lk=4096, b=1, grad=False, causal=True)),
    ("decode q=16 8k split", dict(d=128, hq=32, hk=8, lq=16, lk=8195, b=1, grad=False, causal=True)),
    ("large causal 2k", dict(d=128, hq=4, hk=4, lq=2048, b=1, causal=True)),
    ("fp32 ieee", dict(d=64, dtype=torch.float32, causal=True)),
]


def run_checks(device, cases=CHECK_CASES, small=False, shard=(0, 1)):
    rows, failed = [], 0
    for name, kw in cases[shard[0]::shard[1]]:
        if small:
            kw = {**kw, "lq": min(kw.get("lq", 40), 40), "lk": min(kw.get("lk", kw.get("lq", 40)), 90),
                  "b": 1, "varlen": kw.get("varlen") and ([3, 9], [3, 9])}
        try:
            row = check_case(name, device=device, **kw)
        except Exception as e:  # report and count as a failure
            row = dict(case=name, ok=False, error=repr(e)[:300])
        rows.append(row)
        failed += not row["ok"]
        print(("PASS " if row["ok"] else "FAIL ") + name + " " + json.dumps(
            {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items() if k not in ("case", "ok")}),
            flush=True)
    return rows, failed


# ---- timing ----------------------------------------------------------------------------------------------

def bench_ms(fn, grads=None):
    if not torch.cuda.is_available():  # --smoke: one timed call, just to run the code path
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=grads)


def graph_ms(fn):
    """Median time of replaying `fn` captured in a CUDA graph (no Python or launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench_ms(g.replay)


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name])


def grid_rows(dims=(64, 128), lens=(1024, 4096, 16384), hidden=2048, tokens=32768, dtype=torch.bfloat16,
              device="cuda"):
    rows = []
    for d in dims:
        h = hidden // d
        for n in lens:
            b = tokens // n
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(3))
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D) for SDPA
                do = torch.randn_like(q)
                dot = do.transpose(1, 2).contiguous()
                row = dict(kind="grid", head_dim=d, n=n, batch=b, heads=h, causal=causal)
                # correctness at this shape first (forward, vs SDPA flash in the same precision)
                with sdpa_backend("flash"):
                    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                row["max_abs_diff_vs_sdpa"] = _err(flash_attention(q, k, v, causal=causal), ref.transpose(1, 2))
                for mode in ("fwd", "fwd+bwd"):
                    mult = 1.0 if mode == "fwd" else 3.5
                    for impl in ("flashtune", "sdpa_flash", "cudnn"):
                        if impl == "flashtune":
                            args, fn0 = (q, k, v), lambda a, b_, c: flash_attention(a, b_, c, causal=causal)
                            dd = do
                        else:
                            args = (qt, kt, vt)
                            fn0 = lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=causal)
                            dd = dot
                        ctx = sdpa_backend("flash" if impl == "sdpa_flash" else "cudnn") if impl != "flashtune" \
                            else torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)
                        try:
                            with ctx:
                                if mode == "fwd":
                                    with torch.no_grad():
                                        ms = bench_ms(lambda: fn0(*args))
                                else:
                                    leaves = [t.detach().requires_grad_() for t in args]
                                    ms = bench_ms(lambda: fn0(*leaves).backward(dd), grads=leaves)
                            row[f"{mode}_{impl}_ms"] = ms
                            row[f"{mode}_{impl}_tflops"] = mult * flops / ms / 1e9
                        except Exception as e:
                            row[f"{mode}_{impl}_error"] = repr(e)[:200]
                    for peer in ("sdpa_flash", "cudnn"):
                        if f"{mode}_{peer}_ms" in row and f"{mode}_flashtune_ms" in row:
                            row[f"{mode}_speedup_vs_{peer}"] = row[f"{mode}_{peer}_ms"] / row[f"{mode}_flashtune_ms"]
                rows.append(row)
                print(_fmt(row), flush=True)
                del q, k, v, qt, kt, vt, do, dot
    return rows


def _fmt(row):
    keys = [k for k in row if k.endswith(("tflops", "speedup_vs_sdpa_flash", "speedup_vs_cudnn", "speedup", "us",
                                          "max_abs_diff_vs_sdpa",
                                          "bandwidth_tbs", "error"))]
    head = {k: row[k] for k in row if k in ("kind", "case", "head_dim", "n", "causal")}
    return json.dumps(head) + " " + " ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                             for k in keys)


def masked_rows(dtype=torch.bfloat16, hq=32, hk=8, d=128, device="cuda", scale=1):
    """scale divides every length (the smoke run uses a large one)."""
    rows = []
    S = lambda n: max(1, n // scale)  # noqa: E731

    def run(case, ours, peer, nbytes=None, flops=None, compare=True):
        diff = _err(ours(), peer()) if compare else None
        with torch.no_grad():
            t_ours, t_peer = bench_ms(ours), bench_ms(peer)
        row = dict(kind="masked", case=case, flashtune_us=t_ours * 1e3, sdpa_us=t_peer * 1e3,
                   speedup=t_peer / t_ours, max_abs_diff_vs_sdpa=diff)
        if torch.cuda.is_available():  # launch-bound cases: both sides replayed from a CUDA graph
            try:
                with torch.no_grad():
                    g_ours, g_peer = graph_ms(ours), graph_ms(peer)
                row.update(graph_flashtune_us=g_ours * 1e3, graph_sdpa_us=g_peer * 1e3, graph_speedup=g_peer / g_ours)
                t_ours = min(t_ours, g_ours)
            except Exception as e:
                row["graph_error"] = repr(e)[:200]
        if nbytes:
            row["bandwidth_tbs"] = nbytes / t_ours / 1e9
        if flops:
            row["flashtune_tflops"] = flops / t_ours / 1e9
        rows.append(row)
        print(_fmt(row), flush=True)

    def rnd(*s):
        return torch.randn(*s, device=device, dtype=dtype)

    # decoding: q queries at the end of L cached keys (bottom-right causal)
    for b, lq, lk in ((1, 1, 4096), (1, 1, 32768), (8, 1, 32768), (1, 16, 4096), (1, 64, 32768)):
        lq, lk = min(lq, S(lk)), S(lk)
        q, k, v = rnd(b, lq, hq, d), rnd(b, lk, hk, d), rnd(b, lk, hk, d)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        mask = None
        if lq > 1:
            i = torch.arange(lq, device=device)[:, None]
            mask = torch.arange(lk, device=device)[None, :] <= i + lk - lq
        peer = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)  # noqa: E731
        with torch.no_grad():
            run(f"decode q={lq} kv={lk} batch={b}", lambda: flash_attention(q, k, v, causal=True).transpose(1, 2),
                peer, nbytes=2 * b * lk * hk * d * q.element_size())
    # tree verification: a 64x64 tree mask after a prefix of L committed keys
    for b, L in ((1, 4096), (1, 32768), (8, 32768)):
        n, L = min(64, S(L)), S(L)
        q, k, v = rnd(b, n, hq, d), rnd(b, L + n, hk, d), rnd(b, L + n, hk, d)
        tm = torch.rand(n, n, device=device) < 0.2
        tm = tm.tril() | torch.eye(n, dtype=torch.bool, device=device)
        full = torch.ones(n, L + n, dtype=torch.bool, device=device)
        full[:, L:] = tm
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        run(f"tree {n}x{n} after {L} batch={b}",
            lambda: flash_attention(q, k, v, tree_mask=tm).transpose(1, 2),
            lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=full, enable_gqa=True),
            nbytes=2 * b * (L + n) * hk * d * 2)
    # varlen: 16 causal sequences of 256..2048 packed, vs a padded batch with a padding+causal mask
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(S(256), S(2048) + 1, (16,), generator=g)
    lens[0] = S(2048)
    cu = torch.zeros(17, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    total, maxlen = int(cu[-1]), int(lens.max())
    q, k, v = rnd(total, hq, d), rnd(total, hk, d), rnd(total, hk, d)
    cu_d = cu.to(device)
    pad = lambda t: torch.stack([F.pad(t[cu[i]:cu[i + 1]], (0, 0, 0, 0, 0, maxlen - int(lens[i])))  # noqa: E731
                                 for i in range(16)]).transpose(1, 2).contiguous()
    qp, kp, vp = pad(q), pad(k), pad(v)
    valid = torch.arange(maxlen)[None, :] < lens[:, None]
    m = (valid[:, None, None, :] & torch.ones(maxlen, maxlen, dtype=torch.bool).tril()[None, None]).to(device)
    ours = lambda: flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_d, cu_seqlens_k=cu_d,  # noqa: E731
                                   max_seqlen_q=maxlen, max_seqlen_k=maxlen)
    useful = sum(4 * hq * int(n_) ** 2 * d / 2 for n_ in lens)
    run("varlen 16 seqs 256-2048 causal", ours,
        lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m, enable_gqa=True), flops=useful,
        compare=False)
    rows[-1]["max_abs_diff_vs_sdpa"] = _err(pad(ours())[valid.to(device)[:, None, :].expand(-1, hq, -1)],
                                            F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m, enable_gqa=True)
                                            [valid.to(device)[:, None, :].expand(-1, hq, -1)])
    # prefix-tuning: P prefix keys visible to all + causal over 2048
    for P in (10, 200):
        b, n, P = 8, S(2048), S(P)
        q, k, v = rnd(b, n, hq, d), rnd(b, n, hk, d), rnd(b, n, hk, d)
        pk, pv = rnd(1, P, hk, d), rnd(1, P, hk, d)
        kc, vc = torch.cat([pk.expand(b, -1, -1, -1), k], 1), torch.cat([pv.expand(b, -1, -1, -1), v], 1)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, kc, vc))
        i = torch.arange(n, device=device)[:, None]
        mask = torch.arange(n + P, device=device)[None, :] <= i + P
        run(f"prefix {P} + causal {n} batch={b}",
            lambda: flash_attention(q, k, v, causal=True, prefix_k=pk, prefix_v=pv).transpose(1, 2),
            lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True),
            flops=4 * b * hq * d * (n * n / 2 + n * P))
    return rows


# ---- tuning ----------------------------------------------------------------------------------------------

TUNE = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4), (128, 32, 4, 4)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 1)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)],
}


def tune_rows(dtype=torch.bfloat16, n=4096):
    rows = []
    for d in (64, 128):
        h, b = 2048 // d, 32768 // n
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (False, True):
            out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
            lse_int = lse.permute(0, 2, 1).contiguous()
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            for name, cands in TUNE.items():
                if causal and name != "fwd":
                    continue
                for cfg in cands:
                    ops._OVERRIDE.clear()
                    key = name if name != "fwd" else ("fwd_causal" if causal else "fwd")
                    ops._OVERRIDE[key] = cfg
                    try:
                        t0 = time.time()
                        if name == "fwd":
                            fn = lambda: ops.fwd_launch(q, k, v, None, None, None, d ** -0.5, causal, 0, n, n)  # noqa
                            mult = 1.0
                        else:
                            fn = lambda: ops.bwd_launch(do, q, k, v, out, lse_int, None, None, None, d ** -0.5,  # noqa
                                                        causal, 0, n, n)
                            mult = 2.5  # the whole backward; both kernels run, only `name` varies
                        fn()
                        torch.cuda.synchronize()
                        compile_s = time.time() - t0
                        ms = bench_ms(fn)
                        row = dict(kind="tune", kernel=name, head_dim=d, causal=causal, config=list(cfg), ms=ms,
                                   tflops=mult * flops / ms / 1e9, compile_s=compile_s)
                    except Exception as e:
                        row = dict(kind="tune", kernel=name, head_dim=d, causal=causal, config=list(cfg),
                                   error=repr(e)[:200])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            ops._OVERRIDE.clear()
    return rows


BWD_CANDIDATES = {  # the first of each list is ops' built-in choice
    64: [(False, (32, 128, 4, 3)), (False, (64, 128, 8, 3)), (True, (32, 128, 4, 3))],
    128: [(False, (64, 128, 8, 3)), (False, (64, 128, 8, 2)), (True, (64, 128, 8, 3))],
}


def select_backward(n=4096, dtype=torch.bfloat16):
    """Time whole backward passes (dK/dV kernel + dQ kernel, or the single pass with atomic dQ) per head dim at
    the grid's 4k shape, and install the fastest in ops' tables for the rest of the run."""
    rows = []
    for d, cands in BWD_CANDIDATES.items():
        h, b = 2048 // d, 32768 // n
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
        do = torch.randn_like(q)
        out, lse = flash_attention(q, k, v, return_lse=True)
        lse_int = lse.permute(0, 2, 1).contiguous()
        best = None
        for atomic, cfg in cands:
            ops._OVERRIDE.clear()
            ops._OVERRIDE.update(atomic_dq=(atomic,), dkdv=cfg)
            fn = lambda: ops.bwd_launch(do, q, k, v, out, lse_int, None, None, None, d ** -0.5, False, 0, n, n)  # noqa
            try:
                dq = fn()[0]
                ok = bool(torch.isfinite(dq).all())
                ms = bench_ms(fn)
                row = dict(kind="bwd_select", head_dim=d, atomic_dq=atomic, dkdv=list(cfg), ms=ms, finite=ok,
                           tflops=2.5 * 4 * b * h * n * n * d / ms / 1e9)
                if ok and (best is None or ms < best[0]):
                    best = (ms, atomic, cfg)
            except Exception as e:
                row = dict(kind="bwd_select", head_dim=d, atomic_dq=atomic, dkdv=list(cfg), error=repr(e)[:200])
            rows.append(row)
            print(json.dumps(row), flush=True)
        ops._OVERRIDE.clear()
        if best is not None:
            ops._ATOMIC_DQ[d] = best[1]
            ops._DKDV[d] = best[2]
        del q, k, v, do, out, lse, lse_int
    return rows


def env_info():
    import transformers
    import triton
    info = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="correctness only; exit 1 on failure")
    ap.add_argument("--tune", action="store_true", help="time candidate block shapes")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run through the Triton interpreter")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th check case from i (parallel compiles)")
    ap.add_argument("--no-select", action="store_true", help="keep the built-in backward configs")
    ap.add_argument("--check-results", nargs="*", default=[], help="JSON files of earlier --check shards to include")
    ap.add_argument("--only", choices=["grid", "masked"], default=None)
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if args.smoke:
        out = args.out or os.path.join(tempfile.gettempdir(), "attention-smoke.json")
        rows, failed = run_checks("cpu", [CHECK_CASES[1], CHECK_CASES[8], CHECK_CASES[10], CHECK_CASES[13]],
                                  small=True)
        grid = grid_rows(dims=(32,), lens=(32,), hidden=32, tokens=32, dtype=torch.float32, device="cpu")
        masked = masked_rows(dtype=torch.float32, hq=2, hk=1, d=16, device="cpu", scale=512)
        write_json(out, dict(env=env_info(), smoke=True, check=rows, grid=grid, masked=masked))
        print(f"smoke: {len(rows) - failed}/{len(rows)} checks passed -> {out}")
        return 1 if failed else 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: use --smoke for the CPU path")
        return 2
    payload = dict(env=env_info())
    t0 = time.time()
    if not args.skip_check:
        shard = tuple(int(x) for x in args.shard.split("/"))
        payload["check"], failed = run_checks("cuda", shard=shard)
        print(f"check: {len(payload['check']) - failed}/{len(payload['check'])} passed in {time.time() - t0:.0f}s")
        if args.check and args.out:
            write_json(args.out, payload)
        if failed:
            return 1
        if args.check:
            return 0
    for path in args.check_results:
        with open(path) as f:
            payload.setdefault("check", []).extend(json.load(f).get("check", []))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention-h200.json")
    if args.tune:
        payload["tune"] = tune_rows()
    else:
        if not args.no_select:
            payload["backward_selection"] = select_backward()
        payload["configs"] = dict(fwd=ops._FWD, fwd_causal=ops._FWD_CAUSAL, dkdv=ops._DKDV, dq=ops._DQ,
                                  atomic_dq=ops._ATOMIC_DQ)
        write_json(out, payload)
        if args.only in (None, "masked"):
            payload["masked"] = masked_rows()
            write_json(out, payload)
        if args.only in (None, "grid"):
            payload["grid"] = grid_rows()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention-h200.json")
    write_json(out, payload)
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
