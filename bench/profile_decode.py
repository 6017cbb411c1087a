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

from flashtune.decoding import Engine, MedusaHeads  # noqa: E402
from flashtune.decoding.mtp import MTPDrafter, MTPModules  # noqa: E402
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


def events_ms(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--multi-k", type=int, default=8)
    ap.add_argument("--backends", default="matmul,triton")
    args = ap.parse_args()
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
