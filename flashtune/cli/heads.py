"""`flashtune train-heads`: train Medusa heads, MTP modules or parallel heads for a model and save them.

    flashtune train-heads --method medusa --out runs/heads                       # Medusa-1, self-distilled
    flashtune train-heads --method medusa --stage 2 --out runs/heads2            # Medusa-2 (LoRA + heads)
    flashtune generate --speculative medusa --heads runs/heads --prompt "..."

The recipes live in flashtune/recipes/heads.py; this file only parses the arguments and prints the result.
"""

from __future__ import annotations

import argparse
import contextlib

from flashtune.errors import ConfigError, FlashtuneError


# Options that only some methods read (the others would ignore them silently): option dest -> methods.
_ONLY_FOR = {"depth": ("mtp",), "num_heads": ("medusa", "parallel"), "num_layers": ("medusa",),
             "tree_nodes": ("medusa",), "stage": ("medusa", "mtp", "parallel")}
# Recipe fields as the command line names them, for the recipes' own range checks.
_OPTIONS = {"num_prompts": "--num-prompts", "max_new_tokens": "--max-new-tokens", "steps": "--steps",
            "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed", "depth": "--depth",
            "num_heads": "--num-heads", "n_heads": "--num-heads", "num_layers": "--num-layers",
            "tree_nodes": "--tree-nodes", "answer_tokens": "--max-new-tokens"}


def register(subparsers) -> None:
    from flashtune.cli.export import Given
    from flashtune.decoding.tree import MAX_TREE_NODES

    p = subparsers.add_parser(
        "train-heads", help="train Medusa heads, MTP modules or parallel heads for speculative decoding",
        description="Train Medusa heads (Medusa-1: frozen model; Medusa-2: with LoRA) on the model's own answers "
                    "to E2E-style prompts, then build a candidate tree from their measured accuracies.",
        epilog="Then: flashtune generate --speculative medusa --heads OUT --prompt '...'")
    p.add_argument("--method", choices=["medusa", "mtp", "parallel", "eagle3"], default="medusa",
                   help="medusa heads, DeepSeek-V3 MTP modules (docs/mtp.md), Gloeckle et al. parallel heads or "
                        "an EAGLE-3 draft layer (docs/eagle.md)")
    p.add_argument("--depth", type=int, default=1, action=Given, help="MTP modules (--method mtp only)")
    p.add_argument("--out", required=True,
                   help="folder for the heads (medusa_heads.safetensors + config); a folder that already holds "
                        "heads is refused: choose a new one")
    p.add_argument("--model", default="", help="base model: local path or HF id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2], action=Given,
                   help="1: heads only (Medusa-1, frozen base), 2: with LoRA on the base (Medusa-2, joint MTP); "
                        "not for eagle3")
    p.add_argument("--num-heads", type=int, default=4, action=Given, help="heads (--method medusa or parallel)")
    p.add_argument("--num-layers", type=int, default=1, action=Given, help="ResBlocks per head (--method medusa)")
    p.add_argument("--no-self-distill", action="store_true", help="train on the data's references instead "
                                                                  "(not for eagle3, which always self-distills)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (E2E-style MRs; eagle3: 'magpie', prompts the model writes itself), a .txt file "
                        "of prompts, a chat / prompt data file (.jsonl .json .csv .parquet: first user turns) or a "
                        "Hub dataset name, or the data.jsonl an eagle3 run wrote; the target answers every prompt")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of self-distilled answers")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="eagle3: fp32 or bf16")
    p.add_argument("--tree-nodes", type=int, default=63, action=Given,
                   help=f"tree size built from head accuracies, 1-{MAX_TREE_NODES} (0: default tree; --method "
                        "medusa)")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", choices=["vllm", "sglang", "speculators"],
                   help="also export the heads for a serving engine into OUT/export (see `flashtune export-heads`)")
    p.set_defaults(func=main)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, in the order a user would fix them: options the method does not read,
    sizes, the data, the output folder. Nothing is written."""
    from pathlib import Path

    from flashtune.cli.export import check_new_out, given
    from flashtune.decoding.drafters.export import saved_methods
    from flashtune.decoding.tree import MAX_TREE_NODES

    for dest, methods in _ONLY_FOR.items():
        if given(args, dest) and args.method not in methods:
            option = "--" + dest.replace("_", "-")
            raise ConfigError(f"{option} does not apply to --method {args.method} (only to "
                              f"{' and '.join(methods)}); drop {option}")
    if args.method == "eagle3" and args.no_self_distill:
        raise ConfigError("--no-self-distill does not apply to --method eagle3 (it always learns the target's own "
                          "answers); drop it")
    if args.method == "eagle3" and args.precision == "fp16":
        raise ConfigError("--precision fp16 does not apply to --method eagle3; choose fp32 or bf16")
    if not 0 <= args.tree_nodes <= MAX_TREE_NODES:
        raise ConfigError(f"--tree-nodes {args.tree_nodes} is out of range; give 1 to {MAX_TREE_NODES} nodes "
                          "(typical: 15-63), or 0 for the default 63-node tree")
    if args.export:  # refuse a format that does not serve the method before training, not after
        from flashtune.decoding.drafters.export import check_exportable

        check_exportable(args.method, args.export)
    if args.data not in ("synthetic", "magpie") or (args.data == "magpie" and args.method != "eagle3"):
        from flashtune.data.formats import check_source

        try:
            data = check_source(args.data)  # a path that is missing; anything else may be a Hub dataset name
        except FlashtuneError:
            raise ConfigError(f"--data {args.data!r} does not exist; check the path, or leave --data out for "
                              "synthetic prompts") from None
        if data.is_dir():
            raise ConfigError(f"--data {args.data!r} is a folder; give a prompts file (.txt, .jsonl, .json, .csv, "
                              ".parquet) or a Hub dataset name")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a file, not a folder; choose a new folder for the heads")
    found = saved_methods(out) if out.is_dir() else {}
    held = [f for files in found.values() for f in files]
    held += [f for f in ("heads_report.json", "head_accuracy.json", "eagle3_report.json", "adapter")
             if (out / f).exists()]
    if held:
        kinds = " and ".join(found) or "trained"
        hint = ""
        if args.method == "eagle3" and (out / "data.jsonl").is_file():
            hint = f" (to train on its data again, pass --data {str(out / 'data.jsonl')!r})"
        raise ConfigError(f"--out {args.out!r} already holds {kinds} heads ({', '.join(sorted(held))}); choose "
                          f"another --out, or remove the folder to train it again{hint}")
    if args.export:
        check_new_out(out / "export", option="--out's export folder", what="a new --out")


def main(args: argparse.Namespace) -> int:
    from flashtune.cli.export import output_folder
    from flashtune.recipes import heads as recipes

    check_args(args)
    with _option_names():  # the recipe checks its fields before anything loads
        if args.method == "eagle3":
            from flashtune.recipes.eagle import Eagle3TrainConfig, train_eagle3

            recipe, train = Eagle3TrainConfig(
                out_dir=args.out, model=args.model, device=args.device,
                data="magpie" if args.data == "synthetic" else args.data, num_prompts=args.num_prompts,
                answer_tokens=args.max_new_tokens, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                precision="bf16" if args.precision == "bf16" else "fp32", seed=args.seed), train_eagle3
        else:
            common = dict(out_dir=args.out, model=args.model, device=args.device,
                          self_distill=not args.no_self_distill, data=args.data, num_prompts=args.num_prompts,
                          max_new_tokens=args.max_new_tokens, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, precision=args.precision, seed=args.seed)
            if args.method == "mtp":
                recipe, train = recipes.MTPRecipe(depth=args.depth, joint_lora=args.stage == 2, **common), \
                    recipes.train_mtp_heads
            elif args.method == "parallel":
                recipe, train = recipes.ParallelRecipe(n_heads=args.num_heads, joint_lora=args.stage == 2,
                                                       **common), recipes.train_parallel_heads
            else:
                recipe, train = recipes.MedusaRecipe(stage=args.stage, num_heads=args.num_heads,
                                                     num_layers=args.num_layers, tree_nodes=args.tree_nodes,
                                                     **common), recipes.train_medusa_heads
        if args.device:
            from flashtune.models import resolve_device

            resolve_device(args.device)
    with output_folder(args.out):
        report = train(recipe)
        if args.export:
            from pathlib import Path

            from flashtune.decoding.drafters.export import export_heads, load_heads

            model = None
            if args.method != "medusa":  # MTP modules, parallel heads and EAGLE-3 drafts bind to their base model
                from flashtune.models import load_base_model

                model, _ = load_base_model(args.model or None, dtype="float32")
            export_heads(load_heads(args.out, model), Path(args.out) / "export", args.export, model)
    exported = f"exported for {args.export} to {args.out}/export"
    if args.method == "eagle3":
        if args.export:
            print(exported)
        acc = ", ".join(f"{a:.2f}" for a in report["heldout_step_accuracy"])
        print(f"eagle3 saved to {args.out}: held-out accuracy per unrolled step [{acc}]")
        return 0
    if args.method == "medusa":
        top1 = ", ".join(f"{a:.2f}" for a in report["head_top1"])
        print(f"heads saved to {args.out}: top-1 accuracy per head [{top1}], tree of {report['tree_nodes']} nodes, "
              f"expected {report['expected_tokens_per_step']:.2f} tokens/step")
    else:
        acc = ", ".join(f"{a:.2f}" for a in report["depth_top1"])
        print(f"{args.method} saved to {args.out}: held-out top-1 accuracy per depth [{acc}]")
    if args.export:
        print(exported)
    return 0


@contextlib.contextmanager
def _option_names():
    """A recipe's range error names its field (num_prompts=2 ...); say it as the option the user typed."""
    try:
        yield
    except ConfigError as exc:
        msg = str(exc)
        for field, option in _OPTIONS.items():
            if msg.startswith(f"{field}="):
                raise ConfigError(f"{option} {msg[len(field) + 1:]}") from None
        raise

