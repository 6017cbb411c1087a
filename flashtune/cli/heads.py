"""`flashtune train-heads`: train Medusa heads, MTP modules or parallel heads for a model and save them.

    flashtune train-heads --method medusa --out runs/heads                       # Medusa-1, self-distilled
    flashtune train-heads --method medusa --stage 2 --out runs/heads2            # Medusa-2 (LoRA + heads)
    flashtune generate --speculative medusa --heads runs/heads --prompt "..."

The recipes live in flashtune/recipes/heads.py; this file only parses the arguments and prints the result.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-heads", help="train Medusa heads, MTP modules or parallel heads for speculative decoding",
        description="Train Medusa heads (Medusa-1: frozen model; Medusa-2: with LoRA) on the model's own answers "
                    "to E2E-style prompts, then build a candidate tree from their measured accuracies.",
        epilog="Then: flashtune generate --speculative medusa --heads OUT --prompt '...'")
    p.add_argument("--method", choices=["medusa", "mtp", "parallel", "eagle3"], default="medusa",
                   help="medusa heads, DeepSeek-V3 MTP modules (docs/mtp.md), Gloeckle et al. parallel heads or "
                        "an EAGLE-3 draft layer (docs/eagle.md)")
    p.add_argument("--depth", type=int, default=1, help="MTP modules (--method mtp)")
    p.add_argument("--out", required=True, help="folder for the heads (medusa_heads.safetensors + config)")
    p.add_argument("--model", default="", help="base model: local path or HF id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2],
                   help="1: heads only (Medusa-1, frozen base), 2: with LoRA on the base (Medusa-2, joint MTP)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--no-self-distill", action="store_true", help="train on the data's references instead")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (E2E-style MRs; eagle3: 'magpie', prompts the model writes itself), a .txt file "
                        "of prompts, a chat / prompt data file (.jsonl .json .csv .parquet: first user turns) or a "
                        "Hub dataset name, or the data.jsonl an eagle3 run wrote; the target answers every prompt")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of self-distilled answers")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tree-nodes", type=int, default=63, help="tree size built from head accuracies (0: default tree)")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", choices=["vllm", "sglang", "speculators"],
                   help="also export the heads for a serving engine into OUT/export (see `flashtune export-heads`)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flashtune.recipes import heads as recipes

    if args.export:  # refuse a format that does not serve the method before training, not after
        from flashtune.decoding.drafters.export import check_exportable

        check_exportable(args.method, args.export)
    if args.method == "eagle3":
        return _train_eagle3(args)
    common = dict(out_dir=args.out, model=args.model, device=args.device, self_distill=not args.no_self_distill,
                  data=args.data, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                  seed=args.seed)
    if args.method == "mtp":
        report = recipes.train_mtp_heads(recipes.MTPRecipe(depth=args.depth, joint_lora=args.stage == 2, **common))
    elif args.method == "parallel":
        report = recipes.train_parallel_heads(recipes.ParallelRecipe(n_heads=args.num_heads,
                                                                     joint_lora=args.stage == 2, **common))
    else:
        report = recipes.train_medusa_heads(recipes.MedusaRecipe(
            stage=args.stage, num_heads=args.num_heads, num_layers=args.num_layers, tree_nodes=args.tree_nodes,
            **common))
    if args.export:
        from pathlib import Path

        from flashtune.decoding.drafters.export import export_heads, load_heads

        model = None
        if args.method != "medusa":  # MTP modules bind to their base model
            from flashtune.models import load_base_model

            model, _ = load_base_model(args.model or None, dtype="float32")
        export_heads(load_heads(args.out, model), Path(args.out) / "export", args.export, model)
    if args.method == "medusa":
        top1 = ", ".join(f"{a:.2f}" for a in report["head_top1"])
        print(f"heads saved to {args.out}: top-1 accuracy per head [{top1}], tree of {report['tree_nodes']} nodes, "
              f"expected {report['expected_tokens_per_step']:.2f} tokens/step")
    else:
        acc = ", ".join(f"{a:.2f}" for a in report["depth_top1"])
        print(f"{args.method} saved to {args.out}: held-out top-1 accuracy per depth [{acc}]")
    if args.export:
        print(f"exported for {args.export} to {args.out}/export")
    return 0


def _train_eagle3(args: argparse.Namespace) -> int:
    from flashtune.recipes.eagle import Eagle3TrainConfig, train_eagle3

    cfg = Eagle3TrainConfig(out_dir=args.out, model=args.model, device=args.device,
                            data="magpie" if args.data == "synthetic" else args.data, num_prompts=args.num_prompts,
                            answer_tokens=args.max_new_tokens, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, precision="bf16" if args.precision == "bf16" else "fp32", seed=args.seed)
    report = train_eagle3(cfg)
    if args.export:
        from pathlib import Path

        from flashtune.decoding.drafters.export import export_heads, load_heads
        from flashtune.models import load_base_model

        model, _ = load_base_model(args.model or None, dtype="float32")
        export_heads(load_heads(args.out, model), Path(args.out) / "export", args.export, model)
        print(f"exported for {args.export} to {args.out}/export")
    acc = ", ".join(f"{a:.2f}" for a in report["heldout_step_accuracy"])
    print(f"eagle3 saved to {args.out}: held-out accuracy per unrolled step [{acc}]")
    return 0
