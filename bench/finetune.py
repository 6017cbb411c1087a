"""`flashtune finetune` end to end against Hugging Face TRL's SFTTrainer + PEFT: the same LoRA training.

Both train SmolLM2-135M-Instruct with LoRA (r=16, alpha 32, dropout 0.05, all linear layers) on the same
tokenized E2E examples (the recipe's `load_datasets`: the same prompt tokens, loss on the reference tokens
only), with the same hyper-parameters: AdamW (fused on a GPU), lr 1e-3, cosine decay after 20 warmup steps,
clipping at 1.0, batch 16, the same number of steps, bf16 autocast over a bf16 base with fp32 adapters on a GPU.
Rows:

- flashtune finetune: `run_finetune` as the CLI calls it, device defaults (the fast path: fused LoRA,
  chunked cross-entropy, torch.compile of the blocks, SDPA attention); then without compile; then --no-fast;
- TRL SFTTrainer + PEFT with gradient checkpointing off (the same training), and at TRL's own default
  (gradient checkpointing on), which is what a TRL user gets.

Measured per row: training wall time, tokens/s (examples seen x their mean length / training time, the same
basis for every row), peak GPU memory (from model load to the end), wall time of the whole run (load, data,
training, save; flashtune's also generates for 8 validation inputs), and the final validation loss: mean
target-token cross-entropy over the held-out MRs, computed for every row by the same function
(`make_loss_eval`) after training.

    python3 bench/finetune.py                       # the H200: writes bench/results/finetune-h200.json
    python3 bench/finetune.py --smoke               # CPU, tiny random model, every row, a temp file

TRL and `datasets` (with pyarrow, pandas, dill, multiprocess, xxhash) are not on the GPU machine: carry their
wheels and install them with `pip install --no-index --find-links wheels/ trl datasets` first (see
docs/finetune.md). TRL is a benchmark peer only, not a dependency of flashtune.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import environment, peak_gib, reset_memory, smoke_model, sync  # noqa: E402
from flashtune.data import Collator  # noqa: E402
from flashtune.fileio import atomic_write_json  # noqa: E402
from flashtune.recipes.finetune import load_config, load_datasets, make_loss_eval, run_finetune  # noqa: E402

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
ROWS = ("flashtune", "flashtune-no-compile", "flashtune-no-fast", "trl", "trl-defaults")



def bench_config(args, out_dir: str):
    """The FinetuneConfig every row shares (TRL rows read its data and hyper-parameters from it too)."""
    data = {"task": "e2e", "val_size": args.val_size, "seed": 0, "max_length": 256}
    if args.data:
        data["path"] = args.data
    if args.smoke:
        data["max_inputs"] = 40
    train = {"lr": args.lr, "max_steps": args.steps, "batch_size": args.batch_size, "warmup_steps": args.warmup,
             "schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "log_every": 10, "save_every": 0,
             "eval_every": 0, "seed": 0}
    return load_config(None, [(["out_dir"], out_dir), (["data"], data), (["method"], {"name": "lora", **LORA}),
                              (["train"], train),
                              (["eval"], {"num_beams": 1, "max_new_tokens": 40, "max_inputs": 8, "batch_size": 8})])


def val_loss(model, tok, val_ds, device, precision) -> float:
    """Mean target-token cross-entropy over every validation example: one function for every row."""
    eval_fn = make_loss_eval(model, val_ds, Collator(tok.pad_token_id), batch_size=64, limit=len(val_ds))
    model.eval()
    amp = precision == "bf16" and device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return round(eval_fn(model)["loss"], 5)


def flashtune_row(args, device, name, tokens_per_example) -> dict:
    work = tempfile.mkdtemp(prefix=f"bench-{name}-")
    cfg = bench_config(args, work)
    if name == "flashtune-no-compile":
        cfg.train["compile"] = False
    model = tok = None
    if args.smoke:
        model, tok = smoke_model()
    reset_memory(device)
    sync(device)
    t0 = time.perf_counter()
    res = run_finetune(cfg, log=lambda *a: None, progress=False, overwrite=True, model=model, tokenizer=tok,
                       device=device, fast=False if name == "flashtune-no-fast" else None)
    sync(device)
    wall = time.perf_counter() - t0
    model, tok = res["model"], res["tokenizer"]
    _, val_ds, _ = load_datasets(res["config"].data, tok)
    train_s = res["train_time_s"]
    resolved = res["config"].train_config()      # the effective training settings, defaults included
    row = {"name": name, "train_s": round(train_s, 2), "wall_s": round(wall, 2), "peak_gib": peak_gib(device),
           "tokens_per_s": round(args.steps * args.batch_size * tokens_per_example / train_s),
           "steps": res["metrics"]["steps"], "trainable_params": res["trainable_params"],
           "final_train_loss": next((r["loss"] for r in reversed(res["history"]) if "loss" in r), None),
           "val_loss": val_loss(model, tok, val_ds, device, resolved.precision),
           "settings": {k: getattr(resolved, k) for k in ("precision", "compile", "fused_lora", "ce_chunk_size")},
           "base_dtype": res["config"].model.dtype}
    del model, res
    return row


def trl_row(args, device, name, tokens_per_example) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from flashtune.models import load_base_model

    cfg = bench_config(args, tempfile.mkdtemp(prefix=f"bench-{name}-"))
    precision = "bf16" if device.type == "cuda" else "fp32"
    reset_memory(device)
    sync(device)
    t0 = time.perf_counter()
    if args.smoke:
        model, tok = smoke_model()
        model.to(device)
    else:
        model, tok = load_base_model(None, dtype="bfloat16" if precision == "bf16" else "float32", device=device,
                                     attn_implementation="sdpa")
    train_ds, val_ds, _ = load_datasets(cfg.data, tok)
    # The very same tokens; the loss covers the reference tokens only (completion_mask = labelled positions).
    rows = [{"input_ids": ex["input_ids"], "completion_mask": [int(x != -100) for x in ex["labels"]]}
            for ex in train_ds]
    hf_ds = datasets.Dataset.from_list(rows)
    sft = SFTConfig(output_dir=cfg.out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0,
                    max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=device.type == "cpu",
                    gradient_checkpointing=name == "trl-defaults", completion_only_loss=True, max_length=1024,
                    logging_steps=10, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
                    disable_tqdm=True)
    peft_cfg = LoraConfig(task_type="CAUSAL_LM", **LORA)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=hf_ds, processing_class=tok, peft_config=peft_cfg)
    sync(device)
    t1 = time.perf_counter()
    out = trainer.train()
    sync(device)
    train_s = time.perf_counter() - t1
    trainer.model.save_pretrained(os.path.join(cfg.out_dir, "adapter"))
    sync(device)
    wall = time.perf_counter() - t0
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    row = {"name": name, "train_s": round(train_s, 2), "wall_s": round(wall, 2), "peak_gib": peak_gib(device),
           "tokens_per_s": round(args.steps * args.batch_size * tokens_per_example / train_s),
           "steps": out.global_step, "trainable_params": sum(p.numel() for p in trainer.model.parameters()
                                                              if p.requires_grad),
           "final_train_loss": logged[-1] if logged else None,
           "val_loss": val_loss(trainer.model, tok, val_ds, device, precision),
           "settings": {"precision": precision, "gradient_checkpointing": sft.gradient_checkpointing,
                        "optim": str(sft.optim), "padding_free": sft.padding_free},
           "base_dtype": str(next(trainer.model.parameters()).dtype)}
    del trainer, model
    return row


def markdown(result) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md)."""
    lines = ["| run | tokens/s | vs TRL | peak GiB | train s | total s | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,} | {r.get('speed_vs_trl', '-')} | {peak} | "
                     f"{r['train_s']:.1f} | {r['wall_s']:.1f} | {r['val_loss']:.4f} |")
    s = result["setup"]
    lines.append("")
    lines.append(f"{s['model']}, LoRA r={LORA['r']} on all linear layers, E2E: {s['train_examples']} training "
                 f"examples, {s['steps']} steps of {s['batch_size']}, lr {s['lr']:g}; validation loss over "
                 f"{s['val_examples']} held-out MRs; {result['env'].get('gpu', result['env']['device'])}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="E2E csv (default: $FLASHTUNE_E2E_DATA or ../shared/data/e2e/)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--val-size", type=int, default=100, help="distinct MRs held out")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, a few steps")
    ap.add_argument("--out", default=None, help="result file (default: bench/results/finetune-h200.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.steps, args.batch_size, args.warmup, args.val_size = 3, 4, 1, 6
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="finetune-smoke-")) / "finetune.json"
                                           if args.smoke else ROOT / "bench" / "results" / "finetune-h200.json")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown row {bad[0]!r}; choose from {', '.join(ROWS)}")

    # The mean example length, from the data every row trains on (the default model's tokenizer).
    tok = smoke_model()[1] if args.smoke else None
    if tok is None:
        from transformers import AutoTokenizer

        from flashtune.models import default_model_dir

        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    train_ds, val_ds, _ = load_datasets(bench_config(args, "unused").data, tok)
    tokens_per_example = sum(len(ex["input_ids"]) for ex in train_ds) / len(train_ds)
    result = {"bench": "finetune", "smoke": args.smoke, "env": environment(device, ("peft", "trl", "datasets", "triton")),
              "setup": {"model": "tiny random Llama" if args.smoke else "SmolLM2-135M-Instruct",
                        "data": "E2E (cleaned development split) minus held-out MRs", "lora": LORA,
                        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                        "train_examples": len(train_ds), "val_examples": len(val_ds),
                        "mean_tokens_per_example": round(tokens_per_example, 2)},
              "rows": [], "errors": {}}
    for name in rows:
        print(f"[{name}] ...", flush=True)
        try:
            fn = trl_row if name.startswith("trl") else flashtune_row
            row = fn(args, device, name, tokens_per_example)
            result["rows"].append(row)
            print(f"[{name}] {json.dumps(row)}", flush=True)
        except Exception as exc:   # keep the other rows of an unattended run; the error is recorded
            traceback.print_exc()
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
        reset_memory(device)
        base = next((r for r in result["rows"] if r["name"] == "trl"), None)
        for r in result["rows"]:
            if base is not None:
                r["speed_vs_trl"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                if r["peak_gib"] and base["peak_gib"]:
                    r["memory_vs_trl"] = round(r["peak_gib"] / base["peak_gib"], 3)
        result["markdown"] = markdown(result)
        atomic_write_json(out, result)
    print(result.get("markdown", ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
