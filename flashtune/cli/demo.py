"""`flashtune demo`: LoRA-tune SmolLM2-135M-Instruct on generated E2E-style data, on a CPU, in minutes.

It prints BLEU / ROUGE-L on held-out generated inputs before and after training, a few samples, and writes
the report folder (metrics.json, samples.jsonl, loss.png, lr.png, summary.md). The base model has never seen
the input format, so "before" is low; "after" shows what a few minutes of LoRA buy.
"""

from __future__ import annotations

from flashtune.cli.finetune import add_common_flags, add_device_flag, count, quiet_libraries
from flashtune.recipes.demo import DEMO_CONFIG, run_demo
from flashtune.recipes.finetune import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="LoRA-tune the default model on generated E2E-style data and show BLEU before/after",
        description="LoRA-tune SmolLM2-135M-Instruct on built-in E2E-style data (CPU, a few minutes), print "
                    "BLEU and ROUGE-L on held-out inputs before and after, and write a report.")
    p.add_argument("--out", default=DEMO_CONFIG["out_dir"], help="report folder (default: %(default)s)")
    p.add_argument("--model", help="base model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=count(), help=f"optimizer steps (default: {DEMO_CONFIG['train']['max_steps']})")
    p.add_argument("--train-inputs", type=count(), help="distinct generated MRs for training "
                   f"(default: {DEMO_CONFIG['data']['num_examples'] - DEMO_CONFIG['data']['val_size']})")
    p.add_argument("--eval-inputs", type=count(), help=f"held-out MRs (default: {DEMO_CONFIG['data']['val_size']})")
    p.add_argument("--max-new-tokens", type=count(), help="generation length cap "
                   f"(default: {DEMO_CONFIG['eval']['max_new_tokens']})")
    p.add_argument("--top-layers", type=count(0), default=None,
                   help="LoRA on the linear layers of the top K blocks only (default: a third; 0: all blocks)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any field of the demo's config (as in `flashtune finetune`)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    add_device_flag(p)
    add_common_flags(p)
    p.set_defaults(func=main)


def main(args) -> int:
    over = [(["out_dir"], args.out)]
    n_val = args.eval_inputs if args.eval_inputs is not None else DEMO_CONFIG["data"]["val_size"]
    n_train = (args.train_inputs if args.train_inputs is not None else
               DEMO_CONFIG["data"]["num_examples"] - DEMO_CONFIG["data"]["val_size"])
    over += [(["data", "val_size"], n_val), (["data", "num_examples"], n_train + n_val)]
    if args.model:
        over.append((["model", "name"], args.model))
    if args.steps is not None:
        over.append((["train", "max_steps"], args.steps))
    if args.max_new_tokens is not None:
        over.append((["eval", "max_new_tokens"], args.max_new_tokens))
    cfg = load_config(None, [*over, *args.overrides], base=DEMO_CONFIG)
    quiet_libraries(args.quiet)
    log = (lambda *a, **k: None) if args.quiet else print
    log("flashtune demo: LoRA on generated E2E-style restaurant descriptions")
    targets_set = any(o.startswith("method.target_modules") for o in args.overrides)
    res = run_demo(cfg, device=args.device, overwrite=args.overwrite, top_layers=0 if targets_set else args.top_layers,
                   log=log, say=print, progress=not args.quiet)
    for s in res["samples"][:res["n_samples"]]:
        print(f"\ninput:  {s['mr']}\nbefore: {_short(s['output_before'])}\nafter:  {s['output']}\n"
              f"ref:    {s['refs'][0]}")
    print(f"\nreport: {res['summary']}  (demo took {res['total_s']:.0f} s)")
    return 0


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."
