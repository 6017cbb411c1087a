"""The `train-heads --method mtp|parallel` recipe: data, `flashtune.training.fit`, held-out accuracy, files.

MTP modules: DeepSeek-V3 (arXiv 2412.19437); parallel heads: Gloeckle et al. (arXiv 2404.19737). The losses
and modules live in mtp.py and parallel_heads.py; this file only composes them with the data and training
areas (imported lazily, so `flashtune.decoding` itself never needs `flashtune.training`).

Steps: load the model; prompts from generated E2E-style MRs (or a text file); with self-distillation (the
default) the model answers them itself through the engine, so the modules learn exactly what they will have
to draft; build the modules (before LoRA, since their block copies the base's last layer); with `joint`,
attach LoRA and train it too (MTP loss added to the LM loss); measure per-depth top-1 accuracy on held-out
answers; save.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from flashtune.errors import check_choice, check_range


@dataclasses.dataclass
class MTPRecipe:
    out_dir: str = "runs/mtp"
    method: str = "mtp"  # "mtp" (DeepSeek-V3 modules) | "parallel" (Gloeckle et al. heads)
    model: str = ""  # "" = default SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = ""  # "" = cuda when available
    depth: int = 1  # MTP modules
    n_heads: int = 4  # parallel heads in all (head 1 = the base's last layer)
    joint: bool = False  # also train LoRA on the base (MTP loss added to the LM loss)
    lora_r: int = 8
    self_distill: bool = True
    data: str = "synthetic"  # "synthetic" (E2E-style MRs) | a text file, one prompt per line
    num_prompts: int = 512
    max_new_tokens: int = 96
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    precision: str = "fp32"
    lambda_initial: float = 0.3
    lambda_final: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_choice("method", self.method, ("mtp", "parallel"))
        check_choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        for name, low in (("depth", 1), ("n_heads", 2), ("lora_r", 1), ("num_prompts", 4),
                          ("max_new_tokens", 2), ("steps", 1), ("batch_size", 1)):
            check_range(name, getattr(self, name), low, integer=True)
        check_range("lr", self.lr, 0, low_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MTPRecipe":
        return cls(**d)



@torch.no_grad()
def depth_accuracy(wrapper, batches) -> list[float]:
    """Teacher-forced top-1 accuracy of each depth (module k / head k+1) on labelled batches."""
    from flashtune.decoding.mtp import IGNORE_INDEX, WithMTP, trunk

    wrapper.eval()
    hits, counts = None, None
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        if isinstance(wrapper, WithMTP):
            hidden = trunk(wrapper.model)(input_ids=ids, attention_mask=mask).last_hidden_state
            outs, logits_of = wrapper.mtp(hidden, ids, mask), wrapper.mtp.logits
        else:
            z = trunk(wrapper.model)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            outs, logits_of = wrapper.heads(z, mask), wrapper.heads.logits
        if hits is None:
            hits, counts = [0] * len(outs), [0] * len(outs)
        for m, out in enumerate(outs):
            shift = m + 2
            pred = logits_of(m, out[:, : ids.shape[1] - shift]).argmax(-1)
            target = labels[:, shift:]
            ok = target != IGNORE_INDEX
            hits[m] += int(((pred == target) & ok).sum())
            counts[m] += int(ok.sum())
    return [h / max(c, 1) for h, c in zip(hits, counts)]


def train_mtp_heads(recipe: MTPRecipe, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the recipe; returns a report (also written to out_dir/heads_report.json). `model`/`tokenizer` may
    be passed already loaded (the benchmark does); the model is left in eval mode with the modules bound."""
    from flashtune.data import Collator, make_lm_dataset, stop_token_ids
    from flashtune.decoding import Engine
    from flashtune.decoding.medusa_train import self_distill_examples
    from flashtune.decoding.mtp import MTPLoss, MTPModules, WithMTP
    from flashtune.decoding.parallel_heads import ParallelHeads, ParallelHeadsLoss, WithParallelHeads
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
    if recipe.self_distill or examples is None:
        longest = max(len(p) for p in prompts)
        engine = Engine(model, tokenizer, max_batch_size=min(32, len(prompts)),
                        max_seq_len=longest + recipe.max_new_tokens + 8, device=device)
        data = self_distill_examples(engine, prompts, recipe.max_new_tokens, batch_size=min(32, len(prompts)),
                                     stop_tokens=stop_token_ids(tokenizer))
        del engine
    else:
        data = make_lm_dataset(examples, tokenizer, refs="all")
    held = max(2, len(data) // 10)
    train, val = data[held:], data[:held]
    t_data = time.time() - t0

    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.method == "mtp":
        heads = MTPModules.build(model, depth=recipe.depth, lambda_initial=recipe.lambda_initial,
                                 lambda_final=recipe.lambda_final)
    else:
        heads = ParallelHeads.build(model, n_heads=recipe.n_heads)
    heads.float()  # trained in fp32 whatever the base's dtype; cast again for drafting
    if recipe.joint:
        from flashtune.tuners import LoraConfig, attach

        attach(model, LoraConfig(r=recipe.lora_r, target_modules="all-linear"))
    if recipe.method == "mtp":
        wrapper, loss = WithMTP(model, heads), MTPLoss(heads.config)
    else:
        wrapper, loss = WithParallelHeads(model, heads), ParallelHeadsLoss()
    cfg = TrainConfig(out_dir=str(out / "train"), precision=recipe.precision, lr=recipe.lr,
                      max_steps=recipe.steps, batch_size=recipe.batch_size, warmup_steps=max(1, recipe.steps // 10),
                      schedule="cosine", weight_decay=0.0, seed=recipe.seed, overwrite=True, save_every=0,
                      log_every=max(1, recipe.steps // 10))
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    result = fit(wrapper, train, cfg, collate_fn=collate, loss_fn=loss, progress=progress)
    t_train = time.time() - t0 - t_data
    val_batches = [{k: v.to(device) for k, v in collate(val[i: i + recipe.batch_size]).items()}
                   for i in range(0, len(val), recipe.batch_size)]
    acc = depth_accuracy(wrapper, val_batches)
    wrapper.eval()
    heads.save(out)
    if recipe.joint:
        from flashtune.tuners import save_adapter

        save_adapter(model, out / "adapter")
    report = {"recipe": recipe.to_dict(), "examples": len(train), "held_out": len(val),
              "final_loss": result.history[-1]["loss"] if result.history else None,
              "depth_top1": acc, "seconds_data": round(t_data, 1), "seconds_train": round(t_train, 1)}
    tmp = out / ".heads_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "heads_report.json")
    return report

