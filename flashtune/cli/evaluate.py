"""`flashtune eval`: load a base model and an adapter, evaluate on a split, write the report.

    flashtune eval runs/e2e                      # a finetune run folder: its model, data and split
    flashtune eval path/to/adapter --task e2e --split all --num-beams 4 --out reports/e2e

With a run folder (it holds finetune.json and adapter/), the validation split is the one the run held out.
With a bare adapter folder, data and model come from the flags (defaults: generated data, default model).
"""

from __future__ import annotations

from pathlib import Path

from flashtune.cli.finetune import add_common_flags, add_device_flag, quiet_libraries
from flashtune.errors import FlashtuneError
from flashtune.recipes.finetune import (TASKS, load_config, load_examples, load_texts, make_loss_eval, model_dtype,
                                        read_run_config)


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
    from flashtune.data import Collator, make_text_dataset
    from flashtune.evaluation import evaluate_generation, write_report
    from flashtune.models import load_base_model, resolve_device
    from flashtune.tuners import load_adapter

    root = Path(args.path)
    if not root.exists():
        raise FlashtuneError(f"{str(root)!r} does not exist; pass a finetune run folder or an adapter folder")
    base = read_run_config(root) or {}
    adapter_dir = root / "adapter" if (root / "adapter").is_dir() else root
    over = []
    for keys, value in ((["model", "name"], args.model), (["data", "task"], args.task),
                        (["data", "path"], args.data), (["eval", "num_beams"], args.num_beams),
                        (["eval", "max_inputs"], args.max_inputs)):
        if value is not None:
            over.append((keys, value))
    cfg = load_config(None, [*over, *args.overrides], base=base)
    device = resolve_device(args.device)
    quiet_libraries(args.quiet)
    log = (lambda *a, **k: None) if args.quiet else print

    log(f"loading {cfg.model.name or 'SmolLM2-135M-Instruct'} + adapter {adapter_dir} on {device} ...")
    model, tok = load_base_model(cfg.model.name or None, dtype=model_dtype(cfg, device), device=device)
    if not args.base_only:
        load_adapter(model, adapter_dir)
        model.to(device)
    out = Path(args.out) if args.out else root / f"eval-{args.split}{'-base' if args.base_only else ''}"
    config = {**cfg.to_dict(), "adapter": None if args.base_only else str(adapter_dir), "split": args.split}
    if cfg.data.task == "text":
        train_texts, val_texts = load_texts(cfg.data)
        texts = val_texts if args.split == "val" else train_texts + val_texts
        ds = make_text_dataset(texts, tok, cfg.data.block_size)
        if not ds:
            raise FlashtuneError("the split holds less than one block of text; lower data.block_size")
        loss = make_loss_eval(model, ds, Collator(tok.pad_token_id or 0), limit=len(ds))(model)["loss"]
        import math

        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "blocks": len(ds)}
        summary = write_report(out, metrics, None, None, title="flashtune eval (text)", config=config)
    else:
        train, val = load_examples(cfg.data)
        examples = val if args.split == "val" else train + val
        if cfg.eval.max_inputs:
            examples = examples[:cfg.eval.max_inputs]
        res = evaluate_generation(model, tok, examples, batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams,
                                  max_new_tokens=cfg.eval.max_new_tokens, progress=not args.quiet)
        metrics = res["metrics"]
        summary = write_report(out, metrics, res["samples"], None, title="flashtune eval", config=config,
                               n_samples=cfg.eval.samples)
    scores = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("bleu", "rouge_l", "nist", "loss", "perplexity")
                       if k in metrics)
    print(f"{args.split}: {scores}")
    print(f"report: {summary}")
    return 0
