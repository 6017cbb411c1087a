"""`flashtune eval`: load a base model and an adapter, evaluate on a split, write the report.

    flashtune eval runs/e2e                      # a finetune run folder: its model, data and split
    flashtune eval path/to/adapter --task e2e --split all --num-beams 4 --out reports/e2e

With a run folder (it holds finetune.json and adapter/), the validation split is the one the run held out.
With a bare adapter folder, data and model come from the flags (defaults: generated data, default model).
The work is `flashtune.recipes.evaluate.run_eval`; this module parses the arguments and prints.
"""

from __future__ import annotations

from flashtune.cli.finetune import add_common_flags, add_device_flag, quiet_libraries
from flashtune.recipes.evaluate import run_eval
from flashtune.recipes.finetune import TASKS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a fine-tuned adapter on a split and write a report",
        description="Load the base model and an adapter (a finetune run folder or an adapter folder), generate "
                    "for a split (greedy or beam search), score BLEU / ROUGE-L / NIST and write a report.")
    p.add_argument("path", help="a `flashtune finetune` run folder, or an adapter folder (PEFT format)")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="'val': the held-out MRs (default); 'all': every input of the data")
    p.add_argument("--model", help="base model (default: the run's, else SmolLM2-135M-Instruct)")
    p.add_argument("--task", choices=TASKS, help="data task (default: the run's, else synthetic)")
    p.add_argument("--data", help="data file (e2e csv or text file)")
    p.add_argument("--num-beams", type=int, help="beam size (1 = greedy)")
    p.add_argument("--max-inputs", type=int, help="evaluate the first N inputs of the split")
    p.add_argument("--base-only", action="store_true", help="evaluate the base model without the adapter")
    p.add_argument("--out", help="report folder (default: <path>/eval-<split>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a field of the run's config, e.g. --set eval.max_new_tokens=80")
    add_device_flag(p)
    add_common_flags(p)
    p.set_defaults(func=main)


def main(args) -> int:
    over = [(keys, value) for keys, value in (
        (["model", "name"], args.model), (["data", "task"], args.task), (["data", "path"], args.data),
        (["eval", "num_beams"], args.num_beams), (["eval", "max_inputs"], args.max_inputs)) if value is not None]
    quiet_libraries(args.quiet)
    log = (lambda *a, **k: None) if args.quiet else print
    res = run_eval(args.path, split=args.split, overrides=[*over, *args.overrides], base_only=args.base_only,
                   out=args.out, device=args.device, log=log, progress=not args.quiet)
    metrics = res["metrics"]
    scores = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("bleu", "rouge_l", "nist", "slot_error_rate", "loss", "perplexity")
                       if k in metrics)
    print(f"{args.split}: {scores}")
    print(f"report: {res['summary']}")
    return 0
