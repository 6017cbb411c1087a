"""MTP speculative decoding on SmolLM2-135M-Instruct tuned on E2E-style data, against plain decoding and Medusa.

Stages (all inside this script, on one device):
  1. tune: LoRA (r=16, q/k/v/o) on generated E2E-style MR -> text pairs with `flashtune.training.fit`, then merged
     (the tuned model is the target every row decodes with);
  2. data: the tuned model answers held-apart E2E-style prompts itself (greedy, the engine): self-distillation,
     so the MTP module learns exactly what it will have to draft;
  3. train: one DeepSeek-V3-style MTP module (frozen target) with `fit` and `MTPLoss`; Medusa heads (4 heads,
     Medusa-1) with the Medusa recipe `train_medusa_heads` on the same tuned model, unless `--medusa DIR`;
  4. decode: fresh E2E-style prompts, batch 1 and 8, greedy with the model's stop tokens: the plain engine, MTP
     drafts with k = 1..4, and Medusa; wall-clock speedup over the plain engine of the same run; the output
     must be token-identical to the plain engine's (lossless greedy; also checked in fp32); first-drafted-
     token acceptance and mean accepted length counted per active sequence from the drafter's trace.

    python3 bench/mtp.py                 # GPU (bf16 engine): bench/results/mtp.json, ~2-3 min
    python3 bench/mtp.py --device cpu --reuse --ks 1,3 --reps 1   # CPU (fp32), the GPU run's target and modules
    python3 bench/mtp.py --smoke         # tiny random Llama on CPU, every code path, seconds, temp output
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flashtune.decoding import Engine  # noqa: E402
from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules  # noqa: E402
from flashtune.recipes.heads import MTPRecipe, self_distill_examples, train_mtp_heads  # noqa: E402
from flashtune.training import TrainConfig, fit  # noqa: E402


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def env_info(device) -> dict:
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------- setup
def tiny_setup():
    """--smoke: a tiny random Llama and random prompts (no tokenizer)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.1)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]
    return model, None, prompts[:48], prompts[48:], []


def tune_default(args, device):
    """SmolLM2 + LoRA tuned on E2E-style pairs, merged; train/eval prompts; stop tokens."""
    from flashtune.data import Collator, encode_prompt, generate_e2e_style, make_lm_dataset, stop_token_ids
    from flashtune.models import load_base_model
    from flashtune.tuners import LoraConfig, attach, load_adapter, save_adapter, unload

    model, tok = load_base_model(dtype="float32")
    model.to(device).eval()
    examples = generate_e2e_style(n=args.num_prompts + 600, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = Path(args.save_dir) / "lora_adapter"
    if args.reuse:
        load_adapter(model, adapter)
        log(f"LoRA tune: loaded {adapter}")
    else:
        lm_data = make_lm_dataset(examples[args.num_prompts:], tok, refs="all")
        attach(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        cfg = TrainConfig(out_dir=str(Path(args.save_dir) / "lora"), lr=1e-3, max_steps=args.tune_steps,
                          precision="bf16" if device.type == "cuda" else "fp32", batch_size=16,
                          warmup_steps=max(1, args.tune_steps // 10), schedule="cosine", overwrite=True,
                          save_every=0, log_every=max(1, args.tune_steps // 5))
        res = fit(model, lm_data, cfg, collate_fn=Collator(tok.pad_token_id), progress=False)
        save_adapter(model, adapter)
        log(f"LoRA tune: {args.tune_steps} steps, final loss {res.history[-1]['loss']:.3f}")
    model = unload(model, merge=True).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_prompts = [encode_prompt(tok, ex.mr) for ex in examples[: args.num_prompts]]
    eval_prompts = [encode_prompt(tok, ex.mr) for ex in generate_e2e_style(n=16, seed=4242)]
    return model, tok, train_prompts, eval_prompts, stop_token_ids(tok)


def self_distill(model, tok, prompts, stop, device, dtype, max_new) -> list[dict]:
    engine = Engine(model, tok, max_batch_size=32, max_seq_len=max(len(p) for p in prompts) + max_new + 8,
                    device=device, dtype=dtype)
    data = self_distill_examples(engine, prompts, max_new, batch_size=32, stop_tokens=stop)
    del engine
    return data


def train_mtp(model, data, args, device, pad_id) -> tuple[MTPModules, dict]:
    """The MTP recipe (recipes/heads.py) on the self-distilled `data`; 10% of it held out for accuracy."""
    out = Path(args.save_dir) / "mtp"
    t0 = time.perf_counter()
    report = train_mtp_heads(MTPRecipe(out_dir=str(out), device=str(device), depth=args.depth, lr=args.lr,
                                       steps=args.steps, batch_size=16, precision="fp32"),
                             model=model, examples=data, progress=False)
    mtp = MTPModules.load(out, model)
    info = {"steps": args.steps, "seconds": round(time.perf_counter() - t0, 1), "final_loss": report["final_loss"],
            "depth_top1": report["depth_top1"]}
    log(f"MTP trained: {info}")
    return mtp, info


def get_medusa(model, tok, args, device):
    from flashtune.decoding import MedusaHeads

    if args.medusa or args.reuse:
        where = args.medusa or str(Path(args.save_dir) / "medusa")
        return MedusaHeads.load(where, device=device), {"loaded": where}
    if tok is None:  # smoke: untrained heads exercise the same decoding path
        heads = MedusaHeads.for_model(model.get_output_embeddings().weight, 3, 1, topk=4)
        heads.save(Path(args.save_dir) / "medusa")
        return heads, {"trained": False}
    from flashtune.recipes.heads import MedusaRecipe, train_medusa_heads

    t0 = time.perf_counter()
    report = train_medusa_heads(MedusaRecipe(out_dir=str(Path(args.save_dir) / "medusa"), device=str(device),
                                            num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                                            steps=args.steps, batch_size=16, tree_nodes=63), model=model,
                                tokenizer=tok, progress=False)
    heads = MedusaHeads.load(Path(args.save_dir) / "medusa", device=device)
    return heads, {"seconds": round(time.perf_counter() - t0, 1), "head_top1": report.get("head_top1"),
                   "tree_nodes": report.get("tree_nodes")}


# ---------------------------------------------------------------------------------------------- decoding
def groups_for(prompts, bsz, n_groups):
    return [prompts[i * bsz:(i + 1) * bsz] for i in range(n_groups)]


def decode(engine, groups, spec, args, stop):
    tokens, steps, per_step = [], 0, []
    for g in groups:
        out = engine.generate(g, max_new_tokens=args.max_new_tokens, stop_tokens=stop, speculative=spec)
        tokens += out.tokens
        steps += out.steps
        per_step.append(out.accepted_per_step)
    return tokens, steps, statistics.mean(per_step)


def timed(engine, groups, spec, args, stop, device):
    decode(engine, groups, spec, args, stop)  # warm-up: CUDA-graph capture, allocator
    times = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        tokens, steps, per_step = decode(engine, groups, spec, args, stop)
        sync(device)
        times.append(time.perf_counter() - t0)
    return tokens, statistics.median(times), per_step


def acceptance(model, tok, mtp, k, groups, args, stop, device, dtype) -> dict:
    """First-draft acceptance and mean accepted length over active sequences, from an eager run's trace."""
    engine = Engine(model, tok, max_batch_size=len(groups[0]), max_seq_len=args.max_seq, device=device,
                    dtype=dtype, cuda_graphs=False)
    drafter = MTPDrafter(mtp, k=k)
    n_steps = first = emitted = 0
    for g in groups:
        drafter.trace = []
        out = engine.generate(g, max_new_tokens=args.max_new_tokens, stop_tokens=stop, speculative=drafter)
        for b, toks in enumerate(out.tokens):
            done = 1  # the prefill's token
            for entry in drafter.trace:
                if done >= len(toks):
                    break
                a = int(entry["accepted"][b])
                n_steps += 1
                first += a > 0
                done += a + 1
                emitted += a + 1
    return {"first_token_acceptance": first / max(n_steps, 1), "mean_accepted_length": emitted / max(n_steps, 1),
            "active_steps": n_steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on CPU; writes to a temp file")
    ap.add_argument("--out", help="result file (default bench/results/mtp.json, mtp-cpu.json on the CPU)")
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400, help="MTP (and Medusa) training steps")
    ap.add_argument("--tune-steps", type=int, default=150, help="LoRA tuning steps of the target on E2E-style data")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--num-prompts", type=int, default=512, help="self-distillation prompts")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the tuned target (LoRA), MTP module and Medusa heads an earlier run saved in --save-dir")
    ap.add_argument("--medusa", help="reuse Medusa heads from this folder")
    ap.add_argument("--save-dir", default=str(ROOT / "runs" / "bench_mtp"))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which remaining decode rows are skipped (default: 200 on CUDA, where "
                         "bench/gpu_run.sh allows 240; none on the CPU)")
    ap.add_argument("--invariant", action="store_true",
                    help="decode with Engine(invariant=True) (batch-invariant kernels: bf16 output identical)")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.steps, args.tune_steps, args.reps, args.max_new_tokens = "cpu", 10, 0, 1, 12
        args.num_prompts, args.ks, args.batches = 32, "2", "1,4"
        if args.save_dir == str(ROOT / "runs" / "bench_mtp"):
            args.save_dir = tempfile.mkdtemp(prefix="mtp-smoke-")
    device = torch.device(args.device)
    if args.invariant and device.type != "cuda":
        ap.error("--invariant runs the Triton kernels natively: it needs --device cuda")
    if args.budget is None:
        args.budget = 200.0 if device.type == "cuda" else 0.0
    out_path = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "mtp-smoke.json" if args.smoke else
        ROOT / "bench" / "results" / ("mtp.json" if device.type == "cuda" else "mtp-cpu.json"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"bench": "mtp", "env": env_info(device), "args": vars(args), "rows": [], "errors": [],
              "targets": {"first_token_acceptance": 0.85, "speedup": 1.8}}

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out_path)

    t_start = time.perf_counter()
    if args.smoke:
        model, tok, train_prompts, eval_prompts, stop = tiny_setup()
    else:
        model, tok, train_prompts, eval_prompts, stop = tune_default(args, device)
    model.to(device).eval()
    pad_id = tok.pad_token_id if tok is not None else 0
    if args.reuse:
        mtp = MTPModules.load(Path(args.save_dir) / "mtp", model)
        result["mtp_training"] = {"loaded": str(Path(args.save_dir) / "mtp")}
    else:
        t0 = time.perf_counter()
        data = self_distill(model, tok, train_prompts, stop, device, dtype, args.max_new_tokens)
        result["self_distill"] = {"examples": len(data), "seconds": round(time.perf_counter() - t0, 1)}
        log(f"self-distilled {len(data)} answers")
        mtp, result["mtp_training"] = train_mtp(model, data, args, device, pad_id)
    try:
        medusa, result["medusa_training"] = get_medusa(model, tok, args, device)
    except Exception as exc:  # keep the MTP rows even if Medusa cannot be trained here
        medusa = None
        result["errors"].append({"where": "medusa training", "error": repr(exc), "trace": traceback.format_exc()})
    save()

    ks = [int(k) for k in args.ks.split(",")]
    args.max_seq = max(len(p) for p in eval_prompts) + args.max_new_tokens + 80
    for bsz in [int(b) for b in args.batches.split(",")]:
        groups = groups_for(eval_prompts, bsz, len(eval_prompts) // bsz)
        engine = Engine(model, tok, max_batch_size=bsz, max_seq_len=args.max_seq, device=device, dtype=dtype,
                        invariant=args.invariant)
        plain, t_plain, _ = timed(engine, groups, None, args, stop, device)
        n_tok = sum(len(t) for t in plain)
        result["rows"].append({"method": "plain", "batch": bsz, "seconds": t_plain, "tokens": n_tok,
                               "tokens_per_s": n_tok / t_plain, "speedup": 1.0})
        log(f"batch {bsz} plain: {n_tok / t_plain:.0f} tok/s")
        t_fast = rate_fast = None
        if args.invariant:  # the fastest plain engine (default kernels) in the same run: what invariance costs
            fast = Engine(model, tok, max_batch_size=bsz, max_seq_len=args.max_seq, device=device, dtype=dtype)
            toks_fast, t_fast, _ = timed(fast, groups, None, args, stop, device)
            del fast
            rate_fast = sum(len(t) for t in toks_fast) / t_fast  # bf16: its tokens may differ near ties
            result["rows"].append({"method": "plain-default-kernels", "batch": bsz, "seconds": t_fast,
                                   "tokens_per_s": rate_fast, "speedup": rate_fast / (n_tok / t_plain)})
            log(f"batch {bsz} plain with the default kernels: {rate_fast:.0f} tok/s")
        specs = [("mtp", k, 1) for k in ks] + [("mtp", max(ks), 2)]  # the last: a tree, top-2 per depth
        specs += [("medusa", None, None)] if medusa is not None else []
        for method, k, width in specs:
            row = {"method": method, "batch": bsz, "k": k, "tree_width": width}
            if args.budget and time.perf_counter() - t_start > args.budget:
                row["skipped"] = f"time budget of {args.budget:.0f} s spent"
                result["rows"].append(row)
                continue
            try:
                spec = MTPDrafter(mtp, k=k, tree_width=width) if method == "mtp" else medusa
                with warnings.catch_warnings(record=True) as caught:  # e.g. a CUDA-graph capture fallback
                    warnings.simplefilter("always")
                    toks, t, per_step = timed(engine, groups, spec, args, stop, device)
                if caught:
                    row["warnings"] = sorted({str(w.message)[:300] for w in caught})
                if t_fast is not None:
                    row["speedup_vs_default_plain"] = (n_tok / t) / rate_fast
                row.update(seconds=t, tokens_per_s=n_tok / t, speedup=t_plain / t, tokens_per_step=per_step,
                           identical_to_plain=toks == plain,
                           identical_sequences=sum(a == b for a, b in zip(toks, plain)) / len(plain))
                if method == "mtp" and width == 1:
                    row.update(acceptance(model, tok, mtp, k, groups, args, stop, device, dtype))
            except Exception as exc:
                row["error"] = repr(exc)
                result["errors"].append({"where": f"{method} k={k} batch={bsz}", "error": repr(exc),
                                         "trace": traceback.format_exc()})
            result["rows"].append(row)
            log(json.dumps({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}))
            save()
        del engine

    # Lossless greedy in fp32 (bf16 verification of k+1 tokens may round differently from one-token steps).
    save()
    check_k = max(ks)
    engine = Engine(model, tok, max_batch_size=8, max_seq_len=args.max_seq, device=device, dtype=torch.float32)
    ref = decode(engine, [eval_prompts[:8]], None, args, stop)[0]
    got = decode(engine, [eval_prompts[:8]], MTPDrafter(mtp, k=check_k), args, stop)[0]
    result["lossless_fp32"] = {"k": check_k, "identical": got == ref}
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    save()
    log(f"fp32 lossless check (k={check_k}): {got == ref}; wrote {out_path} in {result['seconds_total']} s")
    assert got == ref, "MTP greedy output differs from plain greedy in fp32"
    return 0


if __name__ == "__main__":
    sys.exit(main())
