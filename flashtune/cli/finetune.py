"""`flashtune finetune`: a TOML config (plus `--set section.key=value` overrides) -> adapter + report.

    flashtune finetune --config flashtune/configs/e2e_lora.toml --set train.lr=1e-3 --out runs/e2e

The recipe (`FinetuneConfig`, `run_finetune`) lives in flashtune.recipes.finetune; this module parses the
arguments and prints. See docs/finetune.md for the sections, the device defaults and run folders.
"""

from __future__ import annotations

import argparse

from flashtune.data.formats import check_source
from flashtune.recipes.finetune import (FORMATS, METHODS, TASKS, check_run_folder, load_config, resolve_runtime,
                                       run_finetune)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info lines, only results")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where the model runs: cuda, cuda:N, cpu (default: cuda when available, else cpu)")


def count(low: int = 1):
    """An argparse type: an integer of at least `low` (argparse prints the option's name with the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def quiet_libraries(quiet: bool) -> None:
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune an adapter from a TOML config",
        description="Fine-tune a LoRA / prefix / Houlsby / Pfeiffer adapter on your data (chat messages, "
                    "prompt/completion, text or E2E, from JSONL / JSON / CSV / Parquet / text files), then evaluate "
                    "it and write a report. On a GPU it trains "
                    "in bf16 with fused LoRA and chunked cross-entropy unless told otherwise.",
        epilog="Examples: flashtune finetune --data chats.jsonl --out runs/chat;  "
               "flashtune finetune --config flashtune/configs/e2e_lora.toml --set train.lr=1e-3")
    p.add_argument("--config", "-c", help="TOML config file (sections model, data, method, train, eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--out", help="run folder (config: out_dir)")
    p.add_argument("--model", help="base model: a local path or HF id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=METHODS,
                   help="tuner (config: method.name); a change of tuner drops the config's other method fields")
    p.add_argument("--task", choices=TASKS, help="data task (config: data.task)")
    p.add_argument("--data", help="data file: .jsonl / .json / .csv / .parquet / .txt, or a Hub dataset name "
                                  "(config: data.path)")
    p.add_argument("--format", choices=[f for f in FORMATS if f],
                   help="the data's format (config: data.format; default: detected from the columns)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack short examples into full rows, attention kept inside each (config: data.pack)")
    p.add_argument("--lr", type=float, help="learning rate (config: train.lr)")
    p.add_argument("--epochs", type=float, help="epochs (config: train.epochs)")
    p.add_argument("--max-steps", type=int, help="optimizer steps, overrides epochs (config: train.max_steps)")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch (config: train.batch_size)")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (config: train.precision; default: bf16 on a GPU, "
                                       "fp32 on the CPU)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast path: fused LoRA and chunked cross-entropy (default: on); --no-fast trains "
                        "through the plain reference path")
    p.add_argument("--seed", type=int, help="training seed (config: train.seed)")
    p.add_argument("--num-beams", type=int, help="beam size for the evaluation (config: eval.num_beams)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder (its hyper-parameters must not change)")
    p.add_argument("--overwrite", action="store_true", help="start over even if the run folder holds a run")
    p.add_argument("--nproc-per-node", type=int,
                   help="processes (GPUs) on this node: re-runs the command under torchrun")
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp"],
                   help="under torchrun: ddp, fsdp (FSDP2) or auto (ddp when the model fits on one device; "
                        "config: train.strategy)")
    add_device_flag(p)
    add_common_flags(p)
    p.set_defaults(func=main)


def _flag_overrides(args) -> list:
    pairs = [(["out_dir"], args.out), (["model", "name"], args.model), (["method", "name"], args.method),
             (["data", "task"], args.task), (["data", "path"], args.data),
             (["data", "format"], args.format), (["data", "pack"], args.pack), (["train", "lr"], args.lr),
             (["train", "epochs"], args.epochs), (["train", "max_steps"], args.max_steps),
             (["train", "batch_size"], args.batch_size), (["train", "precision"], args.precision),
             (["train", "seed"], args.seed), (["train", "strategy"], args.strategy), (["eval", "num_beams"], args.num_beams)]
    return [(k, v) for k, v in pairs if v is not None]


def main(args) -> int:
    from flashtune.models import resolve_device

    cfg = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    device = resolve_device(args.device)
    if args.nproc_per_node is not None:
        from flashtune.training.launch import relaunch

        if args.nproc_per_node > 1:  # checked once, not by every rank (one process: run_finetune checks)
            if cfg.data.path and cfg.data.task in ("file", "text", "e2e"):
                check_source(cfg.data.path)
            # as run_finetune will: its finetune.json holds the config with the device's choices filled in
            check_run_folder(resolve_runtime(cfg, device, args.fast), args.resume or cfg.train.get("resume", False),
                             args.overwrite or cfg.train.get("overwrite", False))
        relaunch(args.nproc_per_node, args.argv, args.strategy or "auto")   # torchrun; returns if nproc == 1
    quiet_libraries(args.quiet)
    log = (lambda *a, **k: None) if args.quiet else print
    res = run_finetune(cfg, log=log, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite,
                       device=device, fast=args.fast)
    from flashtune.training import distributed

    if not distributed.is_main():
        return 0
    m = res["metrics"]
    scores = ", ".join(f"{k} {m[k]:.2f}" for k in ("bleu", "rouge_l", "nist", "slot_error_rate", "eval_loss") if k in m)
    print(f"done: {m['steps']} steps in {m['train_time_s']:.0f} s; {scores}")
    print(f"adapter: {res['adapter_dir']}" + (f"  report: {res['report']}" if res["report"] else ""))
    return 0
