"""Decoding benchmark: flashtune's engine against Hugging Face `generate`, and Medusa against plain decoding.

    python3 bench/decode.py                 # GPU run (the H200): writes bench/results/decode.json
    python3 bench/decode.py --device cpu    # CPU rows: bench/results/decode_cpu.json
    python3 bench/decode.py --smoke         # seconds on a CPU: tiny models, every code path, a temp file
    python3 bench/decode.py --parts plain --models 1b,smollm2 --out bench/results/decode-peers.json

Part 1, plain decoding, greedy, batch 1 and 8, on SmolLM2-135M-Instruct and on a 1.1B Llama shape
(22 layers, hidden 2048, 32/4 heads, intermediate 5632, vocab 32000, random weights): tokens/s of
HF `generate` and of the engine (same prompts, same number of new tokens, eos suppressed), the engine's
decode-only rate, and its share of the bandwidth floor (all weight bytes read once per step at 4.3 TB/s).
With --peers (default on CUDA), the same rows also time the two peers a user would otherwise pick: HF
`generate` with cache_implementation="static" (which compiles the forward itself on CUDA), and a gpt-fast-style
plain PyTorch Llama with its one-token step compiled with mode="reduce-overhead" (bench/gptfast_peer.py).

Part 2, Medusa on SmolLM2: heads trained here (Medusa-1, self-distilled on E2E-style prompts, the
`flashtune train-heads` recipe), then plain vs Medusa greedy decoding on held-out E2E-style prompts, batch 1
and 8, trees of several sizes: tokens accepted per step and wall-clock speedup. The Medusa output must equal
the plain output token for token (asserted at the end, after the results are written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashtune.decoding import Engine, MedusaHeads  # noqa: E402
from flashtune.decoding.tree import build_tree  # noqa: E402

BANDWIDTH = 4.3e12  # H200 HBM3e, bytes/s
ENGINE_KW: dict = {}  # --smoke: the CUDA path's arithmetic (fast=True, attention="matmul") on the CPU
ROOT = Path(__file__).resolve().parents[1]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def weight_bytes(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def hf_greedy(model, ids, new, dev):
    """HF generate, exactly `new` tokens (eos suppressed by min_new_tokens). Returns (tokens [B, new], seconds)."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    out, sec = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **kw), dev)
    return out[:, ids.shape[1]:].tolist(), sec


def hf_static_greedy(model, ids, new, dev):
    """HF generate with cache_implementation="static" (on CUDA, generate then compiles the forward itself with
    mode="reduce-overhead"), eos suppressed as in `hf_greedy`. The warm-up is the same call, so that it compiles
    and captures the shapes that are timed. Returns (tokens [B, new], seconds, warm-up seconds)."""
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0, cache_implementation="static")
    _, warm = timed(lambda: model.generate(ids, **kw), dev)
    out, sec = timed(lambda: model.generate(ids, **kw), dev)
    return out[:, ids.shape[1]:].tolist(), sec, warm


def gptfast_greedy(model, ids, new, dev):
    """The gpt-fast-style peer (bench/gptfast_peer.py): its step compiled with mode="reduce-overhead" on CUDA,
    traced by Dynamo with the eager backend elsewhere. Returns (tokens [B, new], seconds, decode-only tokens/s,
    seconds of compilation and capture, i.e. the first call's extra time)."""
    from gptfast_peer import GPTFastLlama, compile_step, generate

    bsz, plen = ids.shape
    peer = GPTFastLlama.from_hf(model, max_batch=bsz, max_len=plen + new + 8)
    step = compile_step("inductor" if dev.type == "cuda" else "eager")
    _, first = timed(lambda: generate(peer, ids, new, step), dev)  # compiles, warms up, captures the graph
    out, sec = timed(lambda: generate(peer, ids, new, step), dev)
    _, sec1 = timed(lambda: generate(peer, ids, 1, step), dev)  # the prefill alone
    decode = bsz * (new - 1) / max(1e-9, sec - sec1)
    return out[:, plen:].tolist(), sec, decode, first - sec


def engine_greedy(engine, prompts, new, dev, **kw):
    """Engine greedy, exactly `new` tokens. Returns (tokens, seconds, decode-only tokens/s)."""
    engine.generate(prompts, max_new_tokens=new, stop_tokens=[], **kw)  # warm-up: CUDA graphs captured
    out, sec = timed(lambda: engine.generate(prompts, max_new_tokens=new, stop_tokens=[], **kw), dev)
    _, sec1 = timed(lambda: engine.generate(prompts, max_new_tokens=1, stop_tokens=[], **kw), dev)
    decode = len(prompts) * (new - 1) / max(1e-9, sec - sec1)
    return out.tokens, sec, decode


def prefix_match(a, b) -> float:
    """Mean share of the common prefix of two token lists (1.0 = identical)."""
    fr = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        fr.append(n / max(1, max(len(x), len(y))))
    return sum(fr) / len(fr)


def llama_1b(dev, dtype, smoke):
    import transformers as tf

    if smoke:
        cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    else:
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = tf.LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def plain_rows(name, model, dev, new, batches, prompt_len, skip_hf, compile_too=False, peers=False, gemv=False):
    rows = []
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    for bsz in batches:
        ids = torch.randint(3, vocab, (bsz, prompt_len), generator=g).to(dev)
        engine = Engine(model, max_batch_size=bsz, max_seq_len=prompt_len + new + 8, device=dev, **ENGINE_KW)
        toks, sec, decode = engine_greedy(engine, ids.tolist(), new, dev)
        row = {"part": "plain", "model": name, "batch": bsz, "new_tokens": new, "prompt_len": prompt_len,
               "dtype": str(engine.dtype).replace("torch.", ""), "engine_tok_s": bsz * new / sec,
               "engine_decode_tok_s": decode, "cuda_graphs": engine._graphs.all_captured,
               "attention": engine.model.backend}
        wb = weight_bytes(engine.model)
        row["weight_bytes"] = wb
        row["floor_tok_s"] = bsz * BANDWIDTH / wb
        row["share_of_floor"] = decode / row["floor_tok_s"]
        if not skip_hf:
            ref, hsec = hf_greedy(model, ids, new, dev)
            row["hf_tok_s"] = bsz * new / hsec
            row["speedup_vs_hf"] = row["engine_tok_s"] / row["hf_tok_s"]
            row["tokens_match_hf"] = prefix_match(toks, ref)
        del engine
        _free(dev)
        if gemv:
            _gemv_columns(row, model, ids, toks, new, dev, prompt_len)
        if peers:
            _peer_columns(row, model, ids, toks, new, dev)
        if compile_too and bsz == 1 and dev.type == "cuda":  # Inductor-fused kernels inside the CUDA graphs
            try:
                engine = Engine(model, max_batch_size=bsz, max_seq_len=prompt_len + new + 8, device=dev,
                                compile=True)
                t0 = time.perf_counter()
                ctoks, csec, cdecode = engine_greedy(engine, ids.tolist(), new, dev)
                row["compiled_engine_tok_s"] = bsz * new / csec
                row["compiled_engine_decode_tok_s"] = cdecode
                row["compiled_share_of_floor"] = cdecode / row["floor_tok_s"]
                row["compiled_tokens_match_eager"] = prefix_match(ctoks, toks)
                row["compile_seconds"] = time.perf_counter() - t0
                del engine
            except Exception as exc:  # noqa: BLE001 - recorded, the eager rows stand
                row["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            _free(dev)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _gemv_columns(row, model, ids, toks, new, dev, prompt_len):
    """The same engine with its decode linears on flashtune's split-K GEMV kernel (flashtune/decoding/gemv.py)
    instead of cuBLAS; a failure is recorded, not raised."""
    import flashtune.decoding.gemv as gemv

    bsz = ids.shape[0]
    gemv.ENABLED = True
    try:
        engine = Engine(model, max_batch_size=bsz, max_seq_len=prompt_len + new + 8, device=dev, **ENGINE_KW)
        gtoks, sec, decode = engine_greedy(engine, ids.tolist(), new, dev)
        row["gemv_engine_tok_s"] = bsz * new / sec
        row["gemv_engine_decode_tok_s"] = decode
        row["gemv_share_of_floor"] = decode / row["floor_tok_s"]
        row["gemv_tokens_match_cublas"] = prefix_match(gtoks, toks)
        del engine
    except Exception as exc:  # noqa: BLE001 - recorded, the cuBLAS columns stand
        row["gemv_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        gemv.ENABLED = False
    _free(dev)


def _peer_columns(row, model, ids, toks, new, dev):
    """The two peers a user would otherwise pick, same prompts, same run; a failure is recorded, not raised."""
    from torch._dynamo.utils import counters  # Inductor counts the graphs it had to run without CUDA graphs

    bsz = ids.shape[0]
    skips = counters["inductor"]["cudagraph_skips"]
    try:
        ref, sec, warm = hf_static_greedy(model, ids, new, dev)
        row["hf_static_cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        row["hf_static_tok_s"] = bsz * new / sec
        row["hf_static_warmup_seconds"] = warm
        row["speedup_vs_hf_static"] = row["engine_tok_s"] / row["hf_static_tok_s"]
        row["hf_static_tokens_match_engine"] = prefix_match(toks, ref)
    except Exception as exc:  # noqa: BLE001 - recorded, the other columns stand
        row["hf_static_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    _free(dev)
    skips = counters["inductor"]["cudagraph_skips"]
    try:
        gtoks, sec, decode, comp = gptfast_greedy(model, ids, new, dev)
        row["gptfast_cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        row["gptfast_tok_s"] = bsz * new / sec
        row["gptfast_decode_tok_s"] = decode
        row["gptfast_share_of_floor"] = decode / row["floor_tok_s"]
        row["gptfast_compile_seconds"] = comp
        row["speedup_vs_gptfast"] = row["engine_tok_s"] / row["gptfast_tok_s"]
        row["decode_speedup_vs_gptfast"] = row["engine_decode_tok_s"] / decode
        row["gptfast_tokens_match_engine"] = prefix_match(toks, gtoks)
    except Exception as exc:  # noqa: BLE001
        row["gptfast_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    _free(dev)


def _free(dev):
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def medusa_part(dev, smoke, cpu, out_dir, dtype):
    from flashtune.recipes.heads import MedusaRecipe, train_medusa_heads
    from flashtune.data import encode_prompt, generate_e2e_style, stop_token_ids
    from flashtune.models import default_model_dir, load_base_model

    if smoke:  # a tiny random Llama with SmolLM2's tokenizer: every code path in seconds
        import transformers as tf

        tok = tf.AutoTokenizer.from_pretrained(str(default_model_dir()))
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg).eval()
        recipe = dict(num_prompts=8, max_new_tokens=8, steps=2, batch_size=4, num_heads=2, tree_nodes=6)
        n_eval, new, sizes = 2, 8, [3, 6]
    else:
        model, tok = load_base_model(dtype=dtype)
        if cpu:
            recipe = dict(num_prompts=48, max_new_tokens=48, steps=40, batch_size=8, num_heads=4, tree_nodes=63)
            n_eval, new, sizes = 8, 64, [15, 31, 63]
        else:
            recipe = dict(num_prompts=2048, max_new_tokens=128, steps=600, batch_size=32, num_heads=4,
                          tree_nodes=63, precision="bf16")
            n_eval, new, sizes = 32, 128, [15, 31, 63]
    model.to(dev).eval()
    t0 = time.perf_counter()
    report = train_medusa_heads(MedusaRecipe(out_dir=str(out_dir / "heads"), device=str(dev), **recipe),
                                model=model, tokenizer=tok, progress=False)
    train_sec = time.perf_counter() - t0
    print(json.dumps({"medusa_training": report, "seconds": train_sec}), flush=True)
    heads = MedusaHeads.load(out_dir / "heads", device=dev)
    if dev.type == "cuda":  # heads only propose: bf16 halves what they read and cannot change the output
        heads.to(torch.bfloat16)
    table = _accuracy_table(out_dir / "heads", heads, report)
    prompts = [encode_prompt(tok, ex.mr) for ex in generate_e2e_style(n=n_eval + 8, seed=4242)[-n_eval:]]
    stop = stop_token_ids(tok)
    longest = max(len(p) for p in prompts)
    rows, mismatches = [], []
    # fp32: "lossless" is checked token for token (asserted). bf16 (GPU): faster tree passes; a tree pass and
    # a one-token pass round differently, so near-ties may flip: the match is reported, not asserted.
    dtypes = [torch.float32] if dev.type != "cuda" else [torch.float32, torch.bfloat16]
    if ENGINE_KW.get("invariant"):  # --invariant: bf16 with batch-invariant kernels, identity asserted there
        dtypes = [torch.bfloat16]
    for dt in dtypes:
        for bsz in (1, 8):
            engine = Engine(model, tok, max_batch_size=bsz, max_seq_len=longest + new + 80, device=dev, dtype=dt,
                            **ENGINE_KW)
            batches = [prompts[i: i + bsz] for i in range(0, len(prompts), bsz)]

            def run(spec):
                total, toks, steps_tok = 0.0, [], []
                for b in batches:  # warm-up: every CUDA graph (step, and prefill per prompt-length bucket)
                    engine.generate(b, max_new_tokens=new, stop_tokens=stop, speculative=spec)
                for b in batches:
                    out, sec = timed(lambda: engine.generate(b, max_new_tokens=new, stop_tokens=stop,
                                                             speculative=spec), dev)
                    total += sec
                    toks += out.tokens
                    steps_tok.append(out.accepted_per_step)
                return toks, total, sum(steps_tok) / len(steps_tok)

            plain, plain_sec, _ = run(None)
            n_tok = sum(len(t) for t in plain)
            base = {"part": "medusa", "batch": bsz, "dtype": str(engine.dtype).replace("torch.", ""),
                    "prompts": len(prompts), "generated_tokens": n_tok, "plain_tok_s": n_tok / plain_sec}
            for size in sizes:
                heads.set_tree(build_tree(table, size, topk=heads.config.topk))
                spec, sec, per_step = run(heads)
                same = spec == plain
                if not same and (dt == torch.float32 or ENGINE_KW.get("invariant")):
                    mismatches.append((bsz, size, prefix_match(spec, plain)))
                n_spec = sum(len(t) for t in spec)
                row = {**base, "tree_nodes": size, "tokens_per_step": per_step, "medusa_tok_s": n_spec / sec,
                       "speedup": (n_spec / sec) / (n_tok / plain_sec), "identical_to_plain": same,
                       "prefix_match": prefix_match(spec, plain)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del engine
            _free(dev)
    return {"training": report, "training_seconds": train_sec, "accuracy_table": table.tolist(),
            "rows": rows}, mismatches


def _accuracy_table(heads_dir, heads, report):
    """The full [K, topk] accuracy table the recipe measured (stored next to the heads), else top-1 only."""
    path = Path(heads_dir) / "head_accuracy.json"
    if path.is_file():
        return torch.tensor(json.loads(path.read_text()))
    k = len(report["head_top1"])
    t = torch.zeros(k, heads.config.topk)
    t[:, 0] = torch.tensor(report["head_top1"])
    return t


def save(result, out_path, t0):
    """Written after each model too, so that a run cut short by a time limit keeps its finished rows."""
    result["seconds"] = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds; writes --out or a temp file")
    ap.add_argument("--out", help="results file (default: bench/results/decode[_cpu].json)")
    ap.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face generate rows")
    ap.add_argument("--parts", default="plain,medusa", help="comma list of: plain, medusa")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                    help="plain rows also time HF generate with a static cache and the gpt-fast-style compiled "
                         "step (default: on with CUDA and --smoke; GPU: adds compilation, ~1 min a row)")
    ap.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=None,
                    help="plain rows also time the engine with its decode linears on flashtune's split-K GEMV "
                         "kernel (flashtune/decoding/gemv.py) instead of cuBLAS (default: on with CUDA and --smoke)")
    ap.add_argument("--models", default="smollm2,1b", help="plain rows: comma list of: smollm2, 1b (run in this order)")
    ap.add_argument("--big-on-cpu", action="store_true", help="also run the 1.1B shape on the CPU (slow)")
    ap.add_argument("--compile", action="store_true",
                    help="also time Engine(compile=True) at batch 1 (GPU; adds ~1-2 min of compilation)")
    ap.add_argument("--invariant", action="store_true",
                    help="Engine(invariant=True): batch-invariant kernels; Medusa in bf16 only, its identity to "
                         "plain greedy asserted (write with --out, e.g. bench/results/decode-invariant.json)")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.smoke else args.device)
    if args.invariant:
        if dev.type != "cuda":
            ap.error("--invariant runs the Triton kernels natively: it needs --device cuda")
        ENGINE_KW["invariant"] = True
    if args.smoke:
        ENGINE_KW.update(fast=True, attention="matmul")
    cpu = dev.type == "cpu"
    if cpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    parts = set(args.parts.split(","))
    models = list(dict.fromkeys(args.models.split(",")))
    if not set(models) <= {"smollm2", "1b"}:
        ap.error(f"--models: unknown {sorted(set(models) - {'smollm2', '1b'})}")
    peers = args.peers if args.peers is not None else (args.smoke or dev.type == "cuda")
    gemv = args.gemv if args.gemv is not None else (args.smoke or dev.type == "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    if args.out:
        out_path = Path(args.out)
    elif args.smoke:
        out_path = Path(tempfile.mkdtemp(prefix="decode-smoke-")) / "decode.json"
    else:
        out_path = ROOT / "bench" / "results" / ("decode_cpu.json" if cpu else "decode.json")
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"bench": "decode", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
              "smoke": args.smoke, "peers": peers, "bandwidth_bytes_per_s": BANDWIDTH, "rows": []}
    t0 = time.perf_counter()
    new = 8 if args.smoke else (32 if cpu else 128)
    if "plain" in parts:
        from flashtune.models import load_base_model

        if args.smoke:
            small = llama_1b(dev, dtype, smoke=True)
            result["rows"] += plain_rows("tiny-llama", small, dev, new, (1, 8), 16, args.skip_hf, peers=peers,
                                         gemv=gemv)
        else:
            for which in models:  # in the order given
                if which == "1b" and cpu and not args.big_on_cpu:
                    continue
                if which == "smollm2":
                    name, model = "SmolLM2-135M-Instruct", load_base_model(dtype=dtype)[0].to(dev).eval()
                else:
                    name, model = "llama-1.1B-shape (random)", llama_1b(dev, dtype, smoke=False)
                result["rows"] += plain_rows(name, model, dev, new, (1, 8), 32, args.skip_hf,
                                             compile_too=args.compile, peers=peers, gemv=gemv)
                del model
                _free(dev)
                save(result, out_path, t0)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    mismatches = []
    if "medusa" in parts:
        work = Path(tempfile.mkdtemp(prefix="decode-medusa-"))
        # Medusa runs in fp32 so that the plain and tree passes (different matrix shapes) round alike and
        # "lossless" can be checked token for token; heads are bf16 on the GPU (they only propose).
        result["medusa"], mismatches = medusa_part(dev, args.smoke, cpu, work, torch.float32)
    save(result, out_path, t0)
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")
    if mismatches:
        raise SystemExit(f"Medusa output differs from plain greedy (batch, tree, prefix match): {mismatches}")


if __name__ == "__main__":
    main()
