"""`flashtune train-heads`: train Medusa heads for a model and save them (with a tree built for them).

    flashtune train-heads --method medusa --out runs/heads                       # Medusa-1, self-distilled
    flashtune train-heads --method medusa --stage 2 --out runs/heads2            # Medusa-2 (LoRA + heads)
    flashtune generate --speculative medusa --heads runs/heads --prompt "..."

The recipe is `train_medusa_heads(HeadsRecipe(...))`, which bench/decode.py reuses. Steps: load the model;
build prompts from generated E2E-style MRs (or a text file); with self-distillation (the default) let the
model answer them itself with the engine; train with `flashtune.training.fit` and the Medusa loss; measure
each head's top-k accuracy on held-out answers; build a tree for `--tree-nodes` nodes; save.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from flashtune.errors import check_choice, check_range


@dataclasses.dataclass
class HeadsRecipe:
    out_dir: str = "runs/medusa"
    model: str = ""  # "" = default SmolLM2-135M-Instruct
    dtype: str = "float32"  # the base model's dtype
    device: str = ""  # "" = cuda if available
    stage: int = 1  # 1: Medusa-1 (frozen base); 2: Medusa-2 (LoRA + heads)
    num_heads: int = 4
    num_layers: int = 1
    self_distill: bool = True  # train on the model's own answers (else on the data's references)
    data: str = "synthetic"  # "synthetic" (E2E-style MRs) | a text file (one prompt per line)
    num_prompts: int = 512
    max_new_tokens: int = 96  # length of the self-distilled answers
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    precision: str = "fp32"  # "fp32" | "bf16"
    tree_nodes: int = 63  # node budget of the tree built from the measured accuracies (0: the default tree)
    topk: int = 10
    lora_r: int = 8  # Medusa-2
    seed: int = 0

    def __post_init__(self):
        check_choice("stage", self.stage, (1, 2))
        check_choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        for name, low in (("num_heads", 1), ("num_layers", 0), ("num_prompts", 4), ("max_new_tokens", 2),
                          ("steps", 1), ("batch_size", 1), ("tree_nodes", 0), ("topk", 1), ("lora_r", 1)):
            check_range(name, getattr(self, name), low, integer=True)
        check_range("lr", self.lr, 0, low_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadsRecipe":
        return cls(**d)



def train_medusa_heads(recipe: HeadsRecipe, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the recipe; returns a report dict (also written to out_dir/heads_report.json). `model`/`tokenizer`
    may be given already loaded (the bench does)."""
    import torch

    from flashtune.data import Collator, make_lm_dataset, stop_token_ids
    from flashtune.decoding import Engine, MedusaHeads
    from flashtune.decoding.medusa_train import HeadsLM, MedusaLoss, head_accuracy, self_distill_examples
    from flashtune.decoding.tree import build_tree, expected_accept_length
    from flashtune.models import load_base_model
    from flashtune.training import TrainConfig, fit

    t0 = time.time()
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(recipe.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, tokenizer = load_base_model(recipe.model or None, dtype=recipe.dtype)
    model.to(device).eval()
    from flashtune.data import head_training_prompts

    prompts, examples = head_training_prompts(recipe.data, recipe.num_prompts, recipe.seed, tokenizer)
    stop = stop_token_ids(tokenizer)
    if recipe.self_distill or examples is None:
        longest = max(len(p) for p in prompts)
        engine = Engine(model, tokenizer, max_batch_size=min(32, len(prompts)),
                        max_seq_len=longest + recipe.max_new_tokens + 8, device=device)
        data = self_distill_examples(engine, prompts, recipe.max_new_tokens, batch_size=min(32, len(prompts)),
                                     stop_tokens=stop)
        del engine
        import gc

        gc.collect()  # the engine's CUDA graphs hold memory until its reference cycle is collected
    else:
        data = make_lm_dataset(examples, tokenizer, refs="all")
    held = max(2, len(data) // 10)
    train, val = data[held:], data[:held]
    t_data = time.time() - t0

    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.stage == 2:
        from flashtune.tuners import LoraConfig, attach

        attach(model, LoraConfig(r=recipe.lora_r, target_modules="all-linear"))
    heads = MedusaHeads.for_model(model.get_output_embeddings().weight, recipe.num_heads, recipe.num_layers,
                                  topk=recipe.topk, base_model=recipe.model or "smollm2-135m-instruct")
    heads.to(device=device, dtype=torch.float32)
    wrapper = HeadsLM(model, heads, head_lr_scale=4.0 if recipe.stage == 2 else 1.0)
    loss = MedusaLoss(mode="medusa1" if recipe.stage == 1 else "medusa2",
                      distill=recipe.self_distill and recipe.stage == 2, ramp_steps=recipe.steps // 10)
    cfg = TrainConfig(out_dir=str(out / "train"), precision=recipe.precision, lr=recipe.lr,
                      max_steps=recipe.steps, batch_size=recipe.batch_size, warmup_steps=max(1, recipe.steps // 10),
                      schedule="cosine", weight_decay=0.0, seed=recipe.seed, overwrite=True,
                      save_every=0, log_every=max(1, recipe.steps // 10))
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    result = fit(wrapper, train, cfg, collate_fn=collate, loss_fn=loss, progress=progress)
    heads = wrapper.finish()
    wrapper.eval()
    t_train = time.time() - t0 - t_data

    val_batches = [{k: v for k, v in collate(val[i: i + recipe.batch_size]).items()}
                   for i in range(0, len(val), recipe.batch_size)]
    acc = head_accuracy(wrapper, val_batches, topk=recipe.topk)
    paths = build_tree(acc, recipe.tree_nodes, topk=recipe.topk) if recipe.tree_nodes else None
    heads.set_tree(paths)
    heads.save(out)
    (out / "head_accuracy.json").write_text(json.dumps(acc.tolist()))  # [K, topk]: rebuild trees later
    if recipe.stage == 2:
        from flashtune.tuners import save_adapter

        save_adapter(model, out / "adapter")
    report = {
        "recipe": recipe.to_dict(),
        "examples": len(train), "held_out": len(val),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "head_top1": acc[:, 0].tolist(), "head_top5": acc[:, :5].sum(1).tolist(),
        "tree_nodes": heads.tree.num_nodes - 1,
        "expected_tokens_per_step": expected_accept_length(heads.tree.paths, acc),
        "seconds_data": round(t_data, 1), "seconds_train": round(t_train, 1),
    }
    (out / "heads_report.json").write_text(json.dumps(report, indent=2))
    return report


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-heads", help="train Medusa heads for speculative decoding",
        description="Train Medusa heads (Medusa-1: frozen model; Medusa-2: with LoRA) on the model's own answers "
                    "to E2E-style prompts, then build a candidate tree from their measured accuracies.",
        epilog="Then: flashtune generate --speculative medusa --heads OUT --prompt '...'")
    p.add_argument("--method", choices=["medusa", "mtp", "parallel"], default="medusa",
                   help="medusa heads, DeepSeek-V3 MTP modules (docs/mtp.md) or Gloeckle et al. parallel heads")
    p.add_argument("--depth", type=int, default=1, help="MTP modules (--method mtp)")
    p.add_argument("--out", required=True, help="folder for the heads (medusa_heads.safetensors + config)")
    p.add_argument("--model", default="", help="base model: local path or HF id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2], help="1: Medusa-1 (frozen base), 2: Medusa-2")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--no-self-distill", action="store_true", help="train on the data's references instead")
    p.add_argument("--data", default="synthetic", help="'synthetic' (E2E-style MRs) or a text file of prompts")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of self-distilled answers")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tree-nodes", type=int, default=63, help="tree size built from head accuracies (0: default tree)")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", choices=["medusa", "vllm"], help="also export for the Medusa code or vLLM into OUT/export")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.method in ("mtp", "parallel"):  # recipe in flashtune/decoding/mtp_train.py
        from flashtune.decoding.mtp_train import MTPRecipe, train_mtp_heads

        report = train_mtp_heads(MTPRecipe(
            out_dir=args.out, method=args.method, model=args.model, device=args.device, depth=args.depth,
            n_heads=args.num_heads, joint=args.stage == 2, self_distill=not args.no_self_distill, data=args.data,
            num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, precision=args.precision, seed=args.seed))
        acc = ", ".join(f"{a:.2f}" for a in report["depth_top1"])
        print(f"{args.method} saved to {args.out}: held-out top-1 accuracy per depth [{acc}]")
        return 0
    recipe = HeadsRecipe(out_dir=args.out, model=args.model, device=args.device, stage=args.stage,
                         num_heads=args.num_heads, num_layers=args.num_layers,
                         self_distill=not args.no_self_distill, data=args.data, num_prompts=args.num_prompts,
                         max_new_tokens=args.max_new_tokens, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, precision=args.precision, tree_nodes=args.tree_nodes, seed=args.seed)
    report = train_medusa_heads(recipe)
    if args.export:
        from flashtune.decoding import MedusaHeads

        MedusaHeads.load(args.out).export(Path(args.out) / "export", layout=args.export)
    top1 = ", ".join(f"{a:.2f}" for a in report["head_top1"])
    print(f"heads saved to {args.out}: top-1 accuracy per head [{top1}], tree of {report['tree_nodes']} nodes, "
          f"expected {report['expected_tokens_per_step']:.2f} tokens/step")
    return 0
