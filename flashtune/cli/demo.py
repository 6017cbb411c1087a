"""`flashtune demo`: LoRA-tune SmolLM2-135M-Instruct on generated E2E-style data, on a CPU, in minutes.

It prints BLEU / ROUGE-L on held-out generated inputs before and after training, a few samples, and writes
the report folder (metrics.json, samples.jsonl, loss.png, lr.png, summary.md). The base model has never seen
the input format, so "before" is low; "after" shows what a few minutes of LoRA buy.
"""

from __future__ import annotations

import time

from flashtune.cli.finetune import add_common_flags, add_device_flag, quiet_libraries
from flashtune.recipes.finetune import check_run_folder, load_config, load_examples, run_finetune

# What `make demo` runs: sized to finish in about 5 minutes on 2 CPU cores (model conversion included).
DEMO_CONFIG = {
    "out_dir": "runs/demo",
    "data": {"task": "synthetic", "num_examples": 416, "val_size": 16, "seed": 0, "refs": "all"},
    "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "train": {"lr": 3e-3, "max_steps": 56, "batch_size": 8, "warmup_steps": 3, "schedule": "cosine",
              "log_every": 2, "save_every": 0, "seed": 0},
    "eval": {"num_beams": 1, "max_new_tokens": 40, "batch_size": 16, "samples": 3},
}
# LoRA goes on the linear layers of the top third of the blocks only: backward then stops there, which makes
# a CPU step about twice as cheap as adapting every block, and the output format is learned just as well.
TOP_FRACTION = 1 / 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="LoRA-tune the default model on generated E2E-style data and show BLEU before/after",
        description="LoRA-tune SmolLM2-135M-Instruct on built-in E2E-style data (CPU, a few minutes), print "
                    "BLEU and ROUGE-L on held-out inputs before and after, and write a report.")
    p.add_argument("--out", default=DEMO_CONFIG["out_dir"], help="report folder (default: %(default)s)")
    p.add_argument("--model", help="base model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default: {DEMO_CONFIG['train']['max_steps']})")
    p.add_argument("--train-inputs", type=int, help="distinct generated MRs for training "
                   f"(default: {DEMO_CONFIG['data']['num_examples'] - DEMO_CONFIG['data']['val_size']})")
    p.add_argument("--eval-inputs", type=int, help=f"held-out MRs (default: {DEMO_CONFIG['data']['val_size']})")
    p.add_argument("--max-new-tokens", type=int, help="generation length cap "
                   f"(default: {DEMO_CONFIG['eval']['max_new_tokens']})")
    p.add_argument("--top-layers", type=int, default=None,
                   help="LoRA on the linear layers of the top K blocks only (default: a third; 0: all blocks)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any field of the demo's config (as in `flashtune finetune`)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    add_device_flag(p)
    add_common_flags(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from flashtune.evaluation import evaluate_generation, write_report
    from flashtune.models import load_base_model, resolve_device
    from flashtune.recipes.finetune import resolve_runtime

    t0 = time.perf_counter()
    over = [(["out_dir"], args.out)]
    n_val = args.eval_inputs or DEMO_CONFIG["data"]["val_size"]
    n_train = args.train_inputs or DEMO_CONFIG["data"]["num_examples"] - DEMO_CONFIG["data"]["val_size"]
    over += [(["data", "val_size"], n_val), (["data", "num_examples"], n_train + n_val)]
    if args.model:
        over.append((["model", "name"], args.model))
    if args.steps is not None:
        over.append((["train", "max_steps"], args.steps))
    if args.max_new_tokens is not None:
        over.append((["eval", "max_new_tokens"], args.max_new_tokens))
    cfg = load_config(None, [*over, *args.overrides], base=DEMO_CONFIG)
    device = resolve_device(args.device)
    cfg = resolve_runtime(cfg, device)
    check_run_folder(cfg, overwrite=args.overwrite)     # refuse before the minutes of work, not after
    quiet_libraries(args.quiet)
    log = (lambda *a, **k: None) if args.quiet else print
    say = print

    log("flashtune demo: LoRA on generated E2E-style restaurant descriptions")
    log(f"loading {cfg.model.name or 'SmolLM2-135M-Instruct'} (the first run converts the GGUF file: ~40 s) ...")
    extra = {"attn_implementation": "sdpa"} if device.type == "cuda" else {}
    model, tok = load_base_model(cfg.model.name or None, dtype=cfg.model.dtype, device=device, **extra)
    if args.top_layers != 0 and not any(o.startswith("method.target_modules") for o in args.overrides):
        cfg.method["target_modules"] = top_layers_regex(model, args.top_layers)
    _, held_out = load_examples(cfg.data)
    gen = dict(batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
               progress=not args.quiet)
    log(f"scoring the base model on {len(held_out)} held-out inputs ...")
    before = evaluate_generation(model, tok, held_out, **gen)
    say(f"before: BLEU {before['metrics']['bleu']:.2f}  ROUGE-L {before['metrics']['rouge_l']:.2f}")
    res = run_finetune(cfg, log=log, progress=not args.quiet, overwrite=args.overwrite, model=model, tokenizer=tok,
                       device=device)
    after = res["metrics"]
    say(f"after:  BLEU {after['bleu']:.2f}  ROUGE-L {after['rouge_l']:.2f}  "
        f"({res['trainable_params']:,} LoRA parameters, {after['steps']} steps in {after['train_time_s']:.0f} s)")

    samples = [dict(s, output_before=b["output"]) for s, b in zip(_samples(res), before["samples"])]
    keys = ("bleu", "rouge_l", "nist")
    metrics = {"before": {k: before["metrics"][k] for k in keys if k in before["metrics"]},
               "after": {k: after[k] for k in keys if k in after}}
    total = time.perf_counter() - t0
    metrics["after"].update(trainable_params=res["trainable_params"], train_time_s=after["train_time_s"],
                            steps=after["steps"])
    summary = write_report(f"{cfg.out_dir}/report", metrics, samples, res["history"],
                           title="flashtune demo: LoRA on E2E-style data",
                           config={**cfg.to_dict(), "demo_wall_time_s": round(total, 1)},
                           n_samples=cfg.eval.samples)
    for s in samples[:cfg.eval.samples]:
        say(f"\ninput:  {s['mr']}\nbefore: {_short(s['output_before'])}\nafter:  {s['output']}\nref:    {s['refs'][0]}")
    say(f"\nreport: {summary}  (demo took {total:.0f} s)")
    return 0


def top_layers_regex(model, k: int | None) -> str:
    """A target_modules regex for the linear layers of the top `k` decoder blocks (None: the top third)."""
    n = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if n == 0:
        return "all-linear"
    k = max(1, round(n * TOP_FRACTION)) if k is None else min(max(k, 1), n)
    layers = "|".join(str(i) for i in range(n - k, n))
    return rf".*\.layers\.({layers})\..*(proj|fc\d?)"


def _samples(res) -> list[dict]:
    import json
    from pathlib import Path

    path = Path(res["report"]).parent / "samples.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."
