"""E2E NLG table-to-text with SmolLM2-135M-Instruct: LoRA vs prefix-tuning vs Houlsby adapters.

Trains each method on the cleaned E2E development split minus a validation slice of distinct MRs, generates
for the slice with beam search and reports multi-reference BLEU (sacrebleu), ROUGE-L, NIST, trainable
parameters and wall time, to bench/results/e2e.json, with a Markdown table for the README.

    python3 bench/e2e.py --device cuda                 # the H200 run (bf16), all three methods, ~4 min
    python3 bench/e2e.py --smoke                       # seconds on a CPU: tiny random model, every code path

Data: $FLASHTUNE_E2E_DATA, else ../shared/data/e2e/devel-fixed.no-ol.csv (CC BY-SA 4.0; never copied here).
Only the validation slice is used to choose settings; the project does not hold the E2E test split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashtune.cli.finetune import build_tuner_config, make_loss_eval, trainable_parameters  # noqa: E402
from flashtune.data import Collator, example_length, load_e2e_csv, make_lm_dataset, split_by_mr  # noqa: E402
from flashtune.evaluation import evaluate_generation, write_json  # noqa: E402

# One recipe per method (chosen on the validation slice; see bench/notes/e2e.md).
METHODS = {
    "lora": {"method": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
             "lr": 1e-3},
    "prefix": {"method": {"num_virtual_tokens": 16, "prefix_projection": True, "encoder_hidden_size": 512},
               "lr": 3e-3},
    "houlsby": {"method": {"bottleneck_size": 64}, "lr": 1e-3},
}


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return out


def load_model(args):
    from flashtune.models import load_base_model

    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    if not args.smoke:
        return load_base_model(None, dtype=dtype, device=args.device)
    # Smoke: a tiny random Llama with the default model's tokenizer (its chat template, its vocabulary).
    import transformers as tf

    from flashtune.models import default_model_dir

    tok = tf.AutoTokenizer.from_pretrained(str(default_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return tf.LlamaForCausalLM(cfg).to(args.device).eval(), tok


def run_method(name: str, args, train_ex, val_ex, log) -> dict:
    from flashtune.training import TrainConfig, fit
    from flashtune.tuners import attach

    recipe = METHODS[name]
    model, tok = load_model(args)
    attach(model, build_tuner_config(name, recipe["method"]))
    n_params = trainable_parameters(model)
    train_ds = make_lm_dataset(train_ex, tok, max_length=160)
    val_ds = make_lm_dataset(val_ex, tok, max_length=160, refs="first")
    collate = Collator(tok.pad_token_id)
    lr = args.lr or recipe["lr"]
    cfg = TrainConfig(out_dir=tempfile.mkdtemp(prefix=f"e2e-{name}-"), precision=args.precision, lr=lr,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      warmup_steps=args.warmup, schedule="cosine", weight_decay=0.0, log_every=10,
                      save_every=0, seed=args.seed, eval_every=0)
    log(f"[{name}] {n_params:,} trainable parameters, {len(train_ds)} training examples, lr {lr:g}")
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fit(model, train_ds, cfg, collate_fn=collate, length_fn=example_length,
                 eval_fn=make_loss_eval(model, val_ds, collate, batch_size=64, limit=256), progress=not args.quiet)
    if args.device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" and args.precision == "bf16"
           else contextlib.nullcontext())
    with amp:
        res = evaluate_generation(model, tok, val_ex, batch_size=args.eval_batch_size, num_beams=args.num_beams,
                                  max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    m = res["metrics"]
    row = {"method": name, "trainable_params": n_params, "bleu": round(m["bleu"], 2),
           "rouge_l": round(m["rouge_l"], 2), "nist": round(m["nist"], 3) if "nist" in m else None,
           "val_loss": round(result.eval["eval_loss"], 4) if result.eval else None,
           "final_train_loss": next((r["loss"] for r in reversed(result.history) if "loss" in r), None),
           "steps": result.step, "train_time_s": round(train_s, 1), "eval_time_s": m["seconds"],
           "lr": lr, "config": recipe["method"], "samples": res["samples"][:5]}
    log(f"[{name}] BLEU {row['bleu']:.2f}  ROUGE-L {row['rouge_l']:.2f}  NIST {row['nist']}  "
        f"train {train_s:.0f} s  eval {m['seconds']:.0f} s")
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows, meta) -> str:
    lines = ["| method | trainable params | BLEU | ROUGE-L | NIST | train time (s) | eval time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['bleu']:.2f} | {r['rouge_l']:.2f} | "
                     f"{'-' if r['nist'] is None else format(r['nist'], '.2f')} | {r['train_time_s']:.0f} | {r['eval_time_s']:.0f} |")
    lines.append("")
    model = "tiny random Llama (--smoke)" if meta["smoke"] else "SmolLM2-135M-Instruct"
    lines.append(f"{model}, cleaned E2E development split minus {meta['val_inputs']} held-out MRs "
                 f"({meta['train_inputs']} MRs / {meta['train_refs']} references for training), "
                 f"{meta['epochs']} epochs, {meta['precision']}, beam {meta['num_beams']}; "
                 f"multi-reference sacrebleu on the held-out MRs; {meta['device']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="lora,prefix,houlsby")
    ap.add_argument("--data", default=None, help="E2E csv (default: $FLASHTUNE_E2E_DATA or ../shared/data/e2e/)")
    ap.add_argument("--val-size", type=int, default=100, help="distinct MRs held out for validation")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--eval-batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a few steps, a few inputs (CPU)")
    ap.add_argument("--out", default=None, help="result file (default: bench/results/e2e.json; smoke: a temp file)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.smoke:
        args.device = "cpu" if not torch.cuda.is_available() else args.device
        args.val_size, args.max_steps, args.num_beams, args.max_new_tokens = 6, 2, 2, 6
        args.batch_size, args.warmup = 4, 1
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="e2e-smoke-")) / "e2e.json" if args.smoke
        else Path(__file__).resolve().parent / "results" / "e2e.json")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    examples = load_e2e_csv(args.data, limit=40 if args.smoke else None)
    train_ex, val_ex = split_by_mr(examples, args.val_size, seed=args.seed)
    meta = {"train_inputs": len(train_ex), "train_refs": sum(len(e.refs) for e in train_ex),
            "val_inputs": len(val_ex), "val_refs": sum(len(e.refs) for e in val_ex), "epochs": args.epochs,
            "precision": args.precision, "num_beams": args.num_beams, "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "smoke": args.smoke,
            "data": str(args.data or os.environ.get("FLASHTUNE_E2E_DATA") or "../shared/data/e2e/devel-fixed.no-ol.csv"),
            **versions()}
    log(f"E2E: {meta['train_inputs']} training MRs ({meta['train_refs']} refs), {meta['val_inputs']} validation MRs "
        f"({meta['val_refs']} refs); device {meta['device']}")
    rows = []
    t0 = time.perf_counter()
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in METHODS:
            ap.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        try:
            rows.append(run_method(name, args, train_ex, val_ex, log))
        except Exception as exc:  # keep the other methods' rows in an unattended run; the error is recorded
            log(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
            meta.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        meta["total_time_s"] = round(time.perf_counter() - t0, 1)
        write_json(out, {"meta": meta, "rows": rows, "markdown": markdown(rows, meta)})   # after every method
    print(markdown(rows, meta))
    print(f"wrote {out} (total {meta['total_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
