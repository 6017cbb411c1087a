"""The split-K GEMV (flashtune/decoding/gemv.py) against cuBLAS on the decode step's matrices, GPU.

For every linear layer of the SmolLM2-135M and 1.1B Llama shapes (bf16 weights [N, K]) and M = 1 and 8 rows:
cuBLAS (F.linear), the kernel with its shape rule, and a small sweep of configurations, each timed as µs per
call inside a CUDA graph of back-to-back calls (launch gaps as in a decoding step) that rotate among copies of
the weight totalling > 200 MB, so every call reads its weight from HBM, not from the 50 MB L2. Achieved TB/s =
(weight + x + y bytes) / time. Every configuration is checked against F.linear in fp32 (max abs error), a
failing one is recorded, not fatal. The best configuration per (N, K) is the one fastest over M = 1 and 8
together (the configuration may depend on the shape only: gemv.TABLE takes it as is).

    python3 bench/gemv.py            # H200: < 150 s (timing stops after --budget-s 110), writes
                                     # bench/results/gemv-h200.json
    python3 bench/gemv.py --smoke    # CPU, Triton's interpreter, tiny shapes: checks the script runs
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must be set before Triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ColdWeights, environment, graph_us  # noqa: E402

from flashtune.decoding.gemv import GemvConfig, config_for, gemv  # noqa: E402
from flashtune.fileio import atomic_write_json  # noqa: E402

MATRICES = {  # name -> (N, K): the linears of one layer (q/k/v and gate/up fused, as the engine holds them)
    "llama-1.1b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
                   "lm_head": (32000, 2048)},
    "smollm2": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
                "lm_head": (49152, 576)},
}
SMOKE_MATRICES = {"tiny": {"a": (100, 200), "b": (48, 64)}}

# (block_n, block_k, split_k, num_warps, num_stages): pruned per shape to splits that leave every slice work
SWEEP = [(16, 256, 1, 4, 3), (16, 256, 2, 4, 3), (16, 256, 4, 4, 3), (16, 256, 8, 4, 3), (16, 512, 2, 4, 3),
         (16, 512, 4, 8, 3), (16, 128, 4, 4, 4), (32, 256, 1, 4, 3), (32, 256, 2, 4, 3), (32, 256, 4, 4, 4),
         (32, 128, 4, 4, 4), (64, 256, 1, 4, 3), (64, 256, 2, 8, 3), (64, 128, 1, 4, 4), (128, 128, 1, 8, 3)]
SMOKE_SWEEP = [(16, 64, 1, 4, 2), (32, 32, 4, 4, 2), (16, 32, 2, 4, 2)]


def wall_us(fn, reps=2):
    """The smoke run's stand-in (the interpreter's time means nothing)."""
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


FIELDS = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "serial")


def config_of(r: dict) -> GemvConfig:
    return GemvConfig(*(r[f] for f in FIELDS))


def config_dict(c: GemvConfig) -> dict:
    return {"block_n": c.block_n, "block_k": c.block_k, "split_k": c.split_k, "num_warps": c.num_warps,
            "num_stages": c.num_stages, "serial": c.serial}


def candidates(n, k, sweep):
    """The rule's pick, the same with the second-kernel reduction, and the sweep pruned to useful splits."""
    rule = config_for(n, k)
    out = {rule: "rule"}
    if rule.split_k > 1:
        out[GemvConfig(rule.block_n, rule.block_k, rule.split_k, rule.num_warps, rule.num_stages, False)] = "sweep"
    for bn, bk, split, warps, stages in sweep:
        if split > 1 and k < split * bk:  # some slice would be empty
            continue
        out.setdefault(GemvConfig(bn, bk, split, warps, stages), "sweep")
    return out


def measure(n, k, m, dev, timer, sweep, deadline):
    weights = ColdWeights(n, k, dev)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x.float(), weights.first.float())
    moved = 2 * n * k + 2 * m * k + 2 * m * n

    def row(label, fn, cfg=None):
        r = {"n": n, "k": k, "m": m, "kernel": label}
        if cfg is not None:
            r.update(config_dict(cfg))
        if time.monotonic() > deadline:
            return {**r, "error": "skipped: time budget"}
        try:
            r["max_abs_err"] = float((fn(weights.first).float() - ref).abs().max())
            r["ok"] = r["max_abs_err"] <= 1e-2 * float(ref.abs().max()) + 1e-3  # bf16 output rounding
            us = timer(weights.cold(fn))
            r.update(us=round(us, 3), tb_s=round(moved / us / 1e6, 3))
        except Exception as exc:  # noqa: BLE001 - one bad configuration must not end the run
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return r

    rows = [row("cublas", lambda w: F.linear(x, w))]
    for cfg, label in candidates(n, k, sweep).items():
        rows.append(row(label, lambda w, c=cfg: gemv(x, w, None, c), cfg))
    weights.copies.clear()  # the closures hold the object: empty its list to free the copies
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def best_per_shape(rows):
    """Per (N, K): the configuration with the least time summed over the row counts measured (shape-only)."""
    best = {}
    by_cfg = {}
    for r in rows:
        if r["kernel"] == "cublas" or "us" not in r or not r["ok"]:
            continue
        key = (r["n"], r["k"], tuple(config_dict(config_of(r)).values()))
        by_cfg.setdefault(key, {})[r["m"]] = r["us"]
    ms = sorted({r["m"] for r in rows})
    for (n, k, cfg), times in by_cfg.items():
        if len(times) < len(ms):
            continue
        total = sum(times.values())
        if (n, k) not in best or total < best[(n, k)]["us_sum"]:
            best[(n, k)] = {"n": n, "k": k, "us_sum": round(total, 3), "us": times,
                            "config": dict(zip(FIELDS, cfg))}
    return list(best.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gemv-<device>.json (default: "
                    "$OUT, else bench/results; --smoke: a temp folder)")
    ap.add_argument("--budget-s", type=float, default=110.0, help="stop timing (rows say skipped) after this")
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.smoke:
        dev, timer, matrices, sweep, tag = torch.device("cpu"), wall_us, SMOKE_MATRICES, SMOKE_SWEEP, "smoke"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gemv.py needs a CUDA GPU (or --smoke)")
        dev, matrices, sweep = torch.device("cuda"), MATRICES, SWEEP
        timer = lambda f: graph_us(f, calls=40, reps=10)  # noqa: E731
        name = torch.cuda.get_device_name()
        tag = "h200" if "H200" in name else name.lower().replace(" ", "-")
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for shape, mats in matrices.items():
            for mat, (n, k) in mats.items():
                for m in (1, 8):
                    got = measure(n, k, m, dev, timer, sweep, deadline)
                    for r in got:
                        r.update(shape=shape, matrix=mat)
                    rows += got
                    fine = [r for r in got if "us" in r and r["ok"] and r["kernel"] != "cublas"]
                    cub, rule = got[0], next(r for r in got if r["kernel"] == "rule")
                    best = min(fine, key=lambda r: r["us"]) if fine else {}
                    nan = float("nan")
                    print(f"{shape:10} {mat:8} {n:6}x{k:<5} m{m}  cublas {cub.get('us', nan):7.2f} µs "
                          f"{cub.get('tb_s', nan):5.2f} TB/s | rule {rule.get('us', nan):7.2f} µs "
                          f"{rule.get('tb_s', nan):5.2f} TB/s | best {best.get('us', nan):7.2f} µs "
                          f"{best.get('tb_s', nan):5.2f} TB/s {config_of(best) if best else ''} | "
                          f"failed {sum('error' in r or not r.get('ok', True) for r in got)}", flush=True)
    best = best_per_shape(rows)
    print("gemv.TABLE entries (fastest over M = 1 and 8):")
    for b in best:
        c = b["config"]
        print(f"    ({b['n']}, {b['k']}): GemvConfig({c['block_n']}, {c['block_k']}, {c['split_k']}, "
              f"{c['num_warps']}, {c['num_stages']}, {c['serial']}),  # {b['us']}")
    result = {"env": environment(dev), "seconds": round(time.monotonic() - start, 1),
              "timing": "µs per call in a CUDA graph of 40 calls rotating over > 200 MB of weight copies"
              if dev.type == "cuda" else "wall clock in the interpreter (meaningless)",
              "rows": rows, "best_per_shape": best}
    out = args.out or (tempfile.mkdtemp(prefix="gemv-smoke-") if args.smoke else "bench/results")
    path = Path(out) / f"gemv-{tag}.json"
    atomic_write_json(path, result)
    print(f"wrote {path} in {result['seconds']} s")


if __name__ == "__main__":
    main()
