"""Where a decoding step's time goes, on the GPU: host loop, graph replay, kernels.

    python3 bench/profile_decode.py [--out DIR]      # CUDA only; random weights, no downloads; ~2 min

For the SmolLM2-135M shape and the 1.1B Llama shape (random weights, bf16), batch 1 and 8, it measures:
  gen_ms_step     a whole `Engine.generate` of 128 tokens, per step (what bench/decode.py reports)
  replay_ms       the captured one-step CUDA graph replayed back to back (GPU time of one step)
  call_ms         the engine's graph call (input copies + replay) in a loop, synchronised at the end
  kernels         kernels in one step (profiler, eager step) and the ten most expensive
  multi_ms        K steps captured in one graph, per step (what replaying several steps per call would give)
for each attention backend ("matmul": grouped matmuls over the whole static cache; "triton": the fused kernels of
flashtune/decoding/kernels.py), with --compile the same replay with Inductor-fused kernels, and the replay time
of one speculative step (Medusa trees of 15 and 63 nodes with random heads, MTP chains of k = 1..3 with a
random module) on the SmolLM2 shape. Writes DIR/profile_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ColdWeights, events_ms, graph_us  # noqa: E402
from flashtune.decoding import Engine, MedusaHeads  # noqa: E402
from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules  # noqa: E402
from flashtune.decoding.tree import default_tree  # noqa: E402


def shapes():
    import transformers as tf

    smol = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=100000.0)
    big = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    return {"smollm2-135m-shape": smol, "llama-1.1b-shape": big}


def kernel_table(fn, steps=1):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    total = sum(e.device_time for e in kernels) / 1e3 / steps
    by = {}
    for e in kernels:
        n, t = by.get(e.name, (0, 0.0))
        by[e.name] = (n + 1, t + e.device_time / 1e3)
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:10]
    return {"kernels_per_step": len(kernels) / steps, "kernel_ms_per_step": total,
            "top": [{"name": k[:90], "count": n / steps, "ms": t / steps} for k, (n, t) in top]}


def state_of(engine, bsz, prompt_len=32):
    """Prefill a random prompt; return the step state the engine's loop starts from."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, engine.model.args.vocab_size, (bsz, prompt_len), generator=g).tolist()
    hidden, logits, tokens, lens = engine.prefill(prompts)
    ar = torch.arange(bsz, device=engine.device)
    n_out = torch.ones(bsz, dtype=torch.long, device=engine.device)
    active = torch.ones(bsz, dtype=torch.bool, device=engine.device)
    state = (torch.argmax(logits, -1), hidden[ar, lens - 1], lens.clone(), active, n_out, torch.zeros_like(n_out))
    max_new = torch.full((bsz,), 10_000, dtype=torch.long, device=engine.device)  # never stops
    return state, max_new


def build(cfg):
    import transformers as tf

    torch.manual_seed(0)
    with torch.device("cuda"):
        return tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def one(name, model, bsz, backend, compile_, multi_k, new=128):
    cfg = model.config
    row = {"model": name, "batch": bsz, "backend": backend, "compile": compile_}
    eng = Engine(model, max_batch_size=bsz, max_seq_len=32 + new + 8 * multi_k + 8, compile=compile_,
                 attention=backend)
    prompts = torch.randint(3, cfg.vocab_size, (bsz, 32)).tolist()
    t0 = time.perf_counter()
    eng.generate(prompts, max_new_tokens=new, stop_tokens=[])
    row["first_generate_s"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.generate(prompts, max_new_tokens=new, stop_tokens=[])
    torch.cuda.synchronize()
    row["gen_ms_step"] = (time.perf_counter() - t0) * 1e3 / new
    with torch.inference_mode():
        key = next(k for k in eng._graphs.graphs if k[0] == "step")
        graph = eng._graphs.graphs[key][0]
        row["replay_ms"] = events_ms(graph.replay, 200)
        state, max_new = state_of(eng, bsz)
        tree = eng._root_tree
        fn = lambda *s: eng._step(tree, None, "greedy", None, None, *s)  # noqa: E731
        row["call_ms"] = events_ms(lambda: eng._graphs(key, fn, *state, max_new), 200)
        t0 = time.perf_counter()
        for _ in range(200):
            eng._graphs(key, fn, *state, max_new)
        row["host_call_ms"] = (time.perf_counter() - t0) * 1e3 / 200  # host side only (GPU runs behind)
        torch.cuda.synchronize()
        if not compile_:
            eager = Engine(model, max_batch_size=bsz, max_seq_len=32 + new + 8, cuda_graphs=False, attention=backend)
            st, mn = state_of(eager, bsz)
            efn = lambda: eager._step(tree, None, "greedy", None, None, *st, mn)  # noqa: E731
            efn()
            row["eager_ms"] = events_ms(efn, 50)
            try:
                row.update(kernel_table(efn, 3))
            except Exception as exc:  # noqa: BLE001 - the profiler is a diagnostic
                row["kernel_error"] = f"{type(exc).__name__}: {exc}"[:200]
            del eager

            def k_steps(*s):
                s = s[:-1]
                for _ in range(multi_k):
                    s = eng._step(tree, None, "greedy", None, None, *s, max_new)
                return s

            state, max_new = state_of(eng, bsz)
            eng._graphs(("multi", bsz, multi_k), k_steps, *state, max_new)
            mgraph = eng._graphs.graphs[("multi", bsz, multi_k)][0]
            row["multi_k"] = multi_k
            row["multi_ms_per_step"] = events_ms(mgraph.replay, 50) / multi_k
    wb = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in eng.model.parameters()}.values())
    row["weight_bytes"] = wb
    row["floor_ms"] = wb / 4.3e12 * 1e3
    del eng
    torch.cuda.empty_cache()
    return row


def spec_rows(name, model, bsz, backend, new=48, dtype=None):
    """Replay time of one speculative step (whole-step graph) against the plain step, same engine."""
    eng = Engine(model, max_batch_size=bsz, max_seq_len=32 + new + 80, attention=backend, dtype=dtype)
    prompts = torch.randint(3, model.config.vocab_size, (bsz, 32)).tolist()
    lm = eng.model.lm_head.weight
    drafters = {"plain": None}
    paths = default_tree(4, 10).paths  # sorted by length: every prefix of the list is a tree
    for nodes in (15, 63):
        h = MedusaHeads.for_model(lm.float(), num_heads=4, topk=10).to(torch.bfloat16)
        h.set_tree([list(p) for p in paths[: nodes - 1]])
        drafters[f"medusa-{nodes}"] = h
    mtp = MTPModules.build(model, depth=1)
    for k in (1, 2, 3):
        drafters[f"mtp-k{k}"] = MTPDrafter(mtp, k=k)
    rows = []
    for label, d in drafters.items():
        try:
            eng.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=d)
            graphs = [v for key, v in eng._graphs.graphs.items() if key[0] == "step" and key[3] == id(d)]
            ms = events_ms(graphs[-1][0].replay, 100) if graphs else None
            rows.append({"model": name, "batch": bsz, "backend": backend, "dtype": str(eng.dtype)[6:],
                         "drafter": label, "step_ms": ms,
                         "tree_nodes": 1 if d is None else d.tree.num_nodes})
        except Exception as exc:  # noqa: BLE001 - keep the other rows
            rows.append({"model": name, "batch": bsz, "backend": backend, "drafter": label,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    del eng
    torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def check_backends(cfg):
    """fp32: the Triton backend's prefill and 63-node tree logits against the matmul backend's (rel. error)."""
    import transformers as tf

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).float().eval()
    prompts = torch.randint(3, cfg.vocab_size, (3, 40)).tolist()
    prompts[1] = prompts[1][:17]
    out = {}
    for backend in ("matmul", "triton"):
        eng = Engine(model, max_batch_size=3, max_seq_len=256, attention=backend)
        _, logits, _, lens = eng.prefill(prompts)
        tree = default_tree(4, 10).to(eng.device)
        tokens = torch.randint(3, cfg.vocab_size, (3, tree.num_nodes), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(1))
        _, tlog = eng.forward(tokens, lens, tree)
        out[backend] = (logits.double(), tlog.double())
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    res = {"prefill_rel_err": rel(out["triton"][0], out["matmul"][0]),
           "tree_rel_err": rel(out["triton"][1], out["matmul"][1]),
           "tree_argmax_agree": float((out["triton"][1].argmax(-1) == out["matmul"][1].argmax(-1)).double().mean())}
    print("backend check (fp32, triton vs matmul):", json.dumps(res), flush=True)
    return res


def call_profile(name, model, bsz=1, new=36, backend="triton"):
    """Where the time of whole `generate` calls goes (36 new tokens, the length of an E2E answer): wall time,
    GPU busy time (union of kernel intervals), the gap before the first kernel and after the last, and the
    kernels per step by name, for plain decoding, a 31-node Medusa tree and a depth-2 MTP chain of k = 3."""
    from torch.profiler import ProfilerActivity, profile

    eng = Engine(model, max_batch_size=bsz, max_seq_len=32 + new + 80, attention=backend)
    prompts = torch.randint(3, model.config.vocab_size, (bsz, 32)).tolist()
    lm = eng.model.lm_head.weight
    heads = MedusaHeads.for_model(lm.float(), num_heads=4, topk=10).to(torch.bfloat16)
    heads.set_tree([list(p) for p in default_tree(4, 10).paths[:30]])
    drafters = {"plain": None, "medusa-31": heads, "mtp-d2-k3": MTPDrafter(MTPModules.build(model, depth=2), k=3)}
    rows = []
    for label, d in drafters.items():
        for _ in range(2):
            eng.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=d)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            out = eng.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=d)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / 10
        eng.stop_lag = 0  # the same calls with the host reading every step's stop flag before the next step
        t0 = time.perf_counter()
        for _ in range(10):
            eng.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=d)
        torch.cuda.synchronize()
        wall_lag0 = (time.perf_counter() - t0) * 1e3 / 10
        eng.stop_lag = 1
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            eng.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=d)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
        ev = prof.events()
        kern = sorted((e for e in ev if str(e.device_type).endswith("CUDA")), key=lambda e: e.time_range.start)
        cpu = [e for e in ev if not str(e.device_type).endswith("CUDA")]
        c0 = min(e.time_range.start for e in cpu)
        c1 = max(e.time_range.end for e in cpu)
        busy, end = 0.0, None
        for e in kern:
            s_, e_ = e.time_range.start, e.time_range.end
            if end is None or s_ > end:
                busy += e_ - s_
                end = e_
            elif e_ > end:
                busy += e_ - end
                end = e_
        steps = out.steps
        by = {}
        for e in kern:
            n, t = by.get(e.name, (0, 0.0))
            by[e.name] = (n + 1, t + e.device_time / 1e3)
        top = sorted(by.items(), key=lambda kv: -kv[1][1])[:25]
        rows.append({"model": name, "batch": bsz, "drafter": label, "wall_ms": wall, "wall_ms_lag0": wall_lag0,
                     "steps": steps,
                     "profiled_ms": (t1 - t0) * 1e3, "cpu_span_ms": (c1 - c0) / 1e3,
                     "gpu_busy_ms": busy / 1e3, "gpu_span_ms": (kern[-1].time_range.end - kern[0].time_range.start) / 1e3,
                     "first_kernel_ms": (kern[0].time_range.start - c0) / 1e3,
                     "after_last_kernel_ms": (c1 - kern[-1].time_range.end) / 1e3,
                     "kernels": len(kern), "kernels_per_step": len(kern) / max(steps, 1),
                     "top": [{"name": k[:90], "per_step": n / max(steps, 1), "ms_total": t} for k, (n, t) in top]})
        r = rows[-1]
        print(f"{label:10} wall {wall:.2f} ms (stop_lag 0: {wall_lag0:.2f}) steps {steps} busy {r['gpu_busy_ms']:.2f} span {r['gpu_span_ms']:.2f} "
              f"first {r['first_kernel_ms']:.2f} tail {r['after_last_kernel_ms']:.2f} kernels/step {r['kernels_per_step']:.0f}",
              flush=True)
        for t in r["top"]:
            print(f"    {t['ms_total']:.3f} ms  x{t['per_step']:.1f}/step  {t['name']}")
    del eng
    torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def kernel_sweep():
    """slot_attention's block shapes on decoding-sized problems: µs per call inside a graph, per config, and
    the largest difference from the default config's output (the configs must agree)."""
    from flashtune.decoding.kernels import slot_attention

    tree31 = default_tree(4, 10)
    tree31 = tree_buffers_of(tree31, 31)
    rows = []
    for shape, hq, hkv, d in (("smollm2", 9, 3, 64), ("llama-1.1b", 32, 4, 128)):
        for bsz in (1, 8):
            for t, tree in ((1, None), (4, None), (31, tree31), (64, None)):
                for ctx in (70, 600):
                    q = torch.randn(bsz, t, hq, d, device="cuda", dtype=torch.bfloat16)
                    kc = torch.randn(bsz, hkv, ctx + t + 64, d, device="cuda", dtype=torch.bfloat16)
                    vc = torch.randn_like(kc)
                    start = torch.full((bsz,), ctx, dtype=torch.long, device="cuda")
                    tr = None if tree is None else tree.cuda()
                    ref = slot_attention(q, kc, vc, start, tr, 0, d ** -0.5).float()
                    for bm in (16, 32, 64):
                        for bn in (32, 64, 128):
                            for w in (2, 4):
                                f = lambda: slot_attention(q, kc, vc, start, tr, 0, d ** -0.5, bm, bn, w)  # noqa: E731
                                err = float((f().float() - ref).abs().max())
                                rows.append({"shape": shape, "batch": bsz, "t": t, "ctx": ctx, "block_m": bm,
                                             "block_n": bn, "warps": w, "us": graph_us(f), "max_err": err})
                    default = graph_us(lambda: slot_attention(q, kc, vc, start, tr, 0, d ** -0.5))
                    best = min((r for r in rows if (r["shape"], r["batch"], r["t"], r["ctx"]) == (shape, bsz, t, ctx)),
                               key=lambda r: r["us"])
                    print(f"{shape:10} b{bsz} t{t:3} ctx{ctx:4}  default {default:6.2f} us   best {best['us']:6.2f} us "
                          f"(bm {best['block_m']}, bn {best['block_n']}, w {best['warps']}) err {best['max_err']:.1e}",
                          flush=True)
                    rows.append({"shape": shape, "batch": bsz, "t": t, "ctx": ctx, "default_us": default})
    return rows


def tree_buffers_of(tree, nodes):
    """The bool [n, n] mask of the first `nodes` nodes' tree (paths sorted by length: a prefix is a tree)."""
    from flashtune.decoding.tree import tree_buffers

    return tree_buffers([list(p) for p in tree.paths[: nodes - 1]]).mask.bool()


@torch.inference_mode()
def invariant_check(new=128):
    """Batch-invariant kernels (Engine(invariant=True)) against cuBLAS + slot-order attention (False): plain
    decoding tokens/s (both shapes, batch 1 and 8) and the replay time of speculative steps (SmolLM2 shape,
    random heads / module), same run."""
    rows = []
    for name, cfg in shapes().items():
        model = build(cfg)
        for bsz in (1, 8):
            prompts = torch.randint(3, cfg.vocab_size, (bsz, 32)).tolist()
            for inv in (False, True):
                eng = Engine(model, max_batch_size=bsz, max_seq_len=32 + new + 80, invariant=inv)
                eng.generate(prompts, max_new_tokens=new, stop_tokens=[])
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(3):
                    eng.generate(prompts, max_new_tokens=new, stop_tokens=[])
                torch.cuda.synchronize()
                row = {"model": name, "batch": bsz, "invariant": inv,
                       "tok_s": 3 * bsz * new / (time.perf_counter() - t0)}
                if name.startswith("smollm2") and bsz == 1:
                    heads = MedusaHeads.for_model(eng.model.lm_head.weight.float(), num_heads=4, topk=10)
                    heads = heads.to(torch.bfloat16)
                    heads.set_tree([list(p) for p in default_tree(4, 10).paths[:30]])
                    for label, d in (("medusa-31", heads), ("mtp-d2-k3", MTPDrafter(MTPModules.build(model, depth=2), k=3))):
                        eng.generate(prompts, max_new_tokens=48, stop_tokens=[], speculative=d)
                        graphs = [v for key, v in eng._graphs.graphs.items() if key[0] == "step" and key[3] == id(d)]
                        row[f"{label}_step_ms"] = events_ms(graphs[-1][0].replay, 100)
                    key = next(k for k in eng._graphs.graphs if k[0] == "step" and k[3] == id(None))
                    row["plain_step_ms"] = events_ms(eng._graphs.graphs[key][0].replay, 100)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del eng
        del model
        torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def gemm_sweep():
    """linear_fixed tile options against cuBLAS (F.linear) on the decoding GEMMs of both shapes, bf16, M = 1
    and 8 rows: µs per call inside a graph. Informs a faster shape-only rule for the invariant mode."""
    from flashtune.decoding.invariant import linear_fixed

    shapes_nk = {"smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
                 "llama-1.1b": [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048)]}
    rows = []
    for shape, nks in shapes_nk.items():
        for n, k in nks:
            weights = ColdWeights(n, k, "cuda", least=4)  # each call reads its own copy from HBM
            w, cold = weights.first, weights.cold

            for m in (1, 8):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.nn.functional.linear(x, w)
                row = {"shape": shape, "n": n, "k": k, "m": m,
                       "cublas_us": graph_us(cold(lambda wt: torch.nn.functional.linear(x, wt))),
                       "default_us": graph_us(cold(lambda wt: linear_fixed(x, wt))), "configs": []}
                for bn in (16, 32, 64):
                    for bk in (64, 128, 256):
                        for warps, stages in ((2, 3), (4, 3), (4, 4)):
                            f = cold(lambda wt: linear_fixed(x, wt, None, bn, bk, warps, stages))  # noqa: B023
                            try:
                                err = float((linear_fixed(x, w, None, bn, bk, warps, stages).float()
                                             - ref.float()).abs().max())
                                row["configs"].append({"block_n": bn, "block_k": bk, "warps": warps,
                                                       "stages": stages, "us": graph_us(f), "max_err": err})
                            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                                row["configs"].append({"block_n": bn, "block_k": bk, "warps": warps,
                                                       "stages": stages, "error": str(exc)[:120]})
                best = min((c for c in row["configs"] if "us" in c), key=lambda c: c["us"])
                print(f"{shape:10} n{n:6} k{k:5} m{m}  cublas {row['cublas_us']:6.2f}  fixed {row['default_us']:6.2f}  "
                      f"best {best['us']:6.2f} (bn {best['block_n']} bk {best['block_k']} w {best['warps']} "
                      f"s {best['stages']}) err {best['max_err']:.1e}", flush=True)
                rows.append(row)
            del weights, cold, w
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--multi-k", type=int, default=8)
    ap.add_argument("--backends", default="matmul,triton")
    ap.add_argument("--calls", action="store_true", help="only the whole-call profiles (call_profile)")
    ap.add_argument("--kernels", action="store_true", help="only the slot_attention block-shape sweep")
    ap.add_argument("--invariant", action="store_true", help="only the invariant-kernels check (invariant_check)")
    ap.add_argument("--gemm", action="store_true", help="only the linear_fixed tile sweep (gemm_sweep)")
    args = ap.parse_args()
    only = {"gemm": gemm_sweep, "invariant": invariant_check, "kernels": kernel_sweep,
            "calls": lambda: call_profile("smollm2-135m-shape", build(shapes()["smollm2-135m-shape"]))
            + call_profile("smollm2-135m-shape", build(shapes()["smollm2-135m-shape"]), bsz=8)}
    for mode, fn in only.items():
        if getattr(args, mode):
            rows = fn()
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"profile_{mode}.json").write_text(json.dumps(rows, indent=2))
            return
    rows, spec = [], []
    check = check_backends(shapes()["smollm2-135m-shape"])
    for name, cfg in shapes().items():
        model = build(cfg)
        for bsz in (1, 8):
            for backend in args.backends.split(","):
                for comp in ((False, True) if args.compile and bsz == 1 and backend == "triton" else (False,)):
                    try:
                        r = one(name, model, bsz, backend, comp, args.multi_k)
                    except Exception as exc:  # noqa: BLE001 - keep the other rows
                        r = {"model": name, "batch": bsz, "backend": backend, "compile": comp,
                             "error": f"{type(exc).__name__}: {exc}"[:400]}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            if name.startswith("smollm2"):
                for dt in (None, torch.float32):
                    spec += spec_rows(name, model, bsz, args.backends.split(",")[-1], dtype=dt)
        del model
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_decode.json").write_text(json.dumps({"check": check, "plain": rows, "speculative": spec}, indent=2))
    for r in spec:
        print(f"{r['model']:20} {r.get('dtype', '')} b{r['batch']} {r['drafter']:10} nodes {r.get('tree_nodes', '-')!s:>3} "
              f"step {r.get('step_ms') or float('nan'):.3f} ms {r.get('error', '')[:150]}")
    print(f"{'model':20} {'b':>2} {'backend':7} {'cmp':>3} {'gen':>6} {'replay':>7} {'call':>6} {'host':>6} {'eager':>6} "
          f"{'kern':>5} {'kms':>6} {'multi':>6} {'floor':>6}")
    for r in rows:
        if "error" in r:
            print(r["model"], r["batch"], r["error"][:200])
            continue
        f = lambda k: f"{r[k]:6.3f}" if k in r else "     -"  # noqa: E731
        print(f"{r['model']:20} {r['batch']:2d} {r['backend']:7} {int(r['compile']):3d} {f('gen_ms_step')} {f('replay_ms')} "
              f"{f('call_ms')} {f('host_call_ms')} {f('eager_ms')} {r.get('kernels_per_step', 0):5.0f} "
              f"{f('kernel_ms_per_step')} {f('multi_ms_per_step')} {f('floor_ms')}")
        for t in r.get("top", [])[:6]:
            print(f"      {t['ms']:.3f} ms  x{t['count']:.0f}  {t['name']}")


if __name__ == "__main__":
    main()
