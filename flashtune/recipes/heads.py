"""Head-training recipes for speculative decoding: Medusa heads, DeepSeek-V3 MTP modules and parallel heads.

Medusa: Cai et al., arXiv 2401.10774 (Medusa-1 / Medusa-2, self-distillation); MTP: DeepSeek-V3, arXiv
2412.19437 §2.2; parallel heads: Gloeckle et al., arXiv 2404.19737.

Each method is a typed config and one function (`train_medusa_heads`, `train_mtp_heads`,
`train_parallel_heads`); all three run the same loop (`_train`): load the model; prompts from generated E2E-style
MRs, a text file of prompts (each asked as a one-turn chat), or the .jsonl of Magpie prompts and answers that
the EAGLE-3 recipe writes (its data.jsonl, so that every drafter can learn from the same data); with
self-distillation (the default) the model answers them itself through the engine, so the heads learn what they
will have to draft; build the heads (before LoRA: blocks copy the base's last layer); with joint training attach
LoRA too; `flashtune.training.fit`; measure teacher-forced accuracy per offset on held out answers; save the heads (and the adapter) and a report, atomically. `cli/heads.py` and `bench/` call these.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import torch

from flashtune.errors import ConfigError, check_choice, check_range
from flashtune.fileio import atomic_write_json

IGNORE = -100


@dataclasses.dataclass
class HeadsTraining:
    """What every head-training recipe shares."""

    out_dir: str = "runs/heads"
    model: str = ""  # "" = default SmolLM2-135M-Instruct
    dtype: str = "float32"  # the base model's dtype
    device: str = ""  # "" = cuda when available
    self_distill: bool = True  # train on the model's own answers (else on the data's references)
    data: str = "synthetic"  # "synthetic" (E2E-style MRs) | a text file, one prompt per line | a synth .jsonl
    num_prompts: int = 512
    max_new_tokens: int = 96  # length of the self-distilled answers
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    lora_r: int = 8  # joint training only
    seed: int = 0

    def __post_init__(self):
        check_choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        for name, low in (("num_prompts", 4), ("max_new_tokens", 2), ("steps", 1), ("batch_size", 1),
                          ("lora_r", 1), ("seed", 0)):
            check_range(name, getattr(self, name), low, integer=True)
        check_range("lr", self.lr, 0, 10.0, low_open=True)
        for name in ("out_dir", "model", "dtype", "device", "data"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, not {getattr(self, name)!r}")
        if not self.out_dir:
            raise ConfigError("out_dir is empty; name a folder for the heads")

    @property
    def joint(self) -> bool:  # overridden by recipes that train LoRA with the heads
        return False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


@dataclasses.dataclass
class MedusaRecipe(HeadsTraining):
    out_dir: str = "runs/medusa"
    stage: int = 1  # 1: Medusa-1 (frozen base); 2: Medusa-2 (LoRA + heads)
    num_heads: int = 4
    num_layers: int = 1  # ResBlocks per head
    tree_nodes: int = 63  # node budget of the tree built from the measured accuracies (0: the default tree; <= 512)
    topk: int = 10

    def __post_init__(self):
        super().__post_init__()
        check_choice("stage", self.stage, (1, 2))
        from flashtune.decoding.tree import MAX_TREE_NODES

        for name, low, high in (("num_heads", 1, 16), ("num_layers", 0, 8), ("tree_nodes", 0, MAX_TREE_NODES),
                                ("topk", 1, None)):
            check_range(name, getattr(self, name), low, high, integer=True)

    @property
    def joint(self) -> bool:
        return self.stage == 2


@dataclasses.dataclass
class MTPRecipe(HeadsTraining):
    out_dir: str = "runs/mtp"
    depth: int = 1  # MTP modules
    joint_lora: bool = False  # also train LoRA on the base (MTP loss added to the LM loss)
    lambda_initial: float = 0.3
    lambda_final: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_range("depth", self.depth, 1, 16, integer=True)
        check_range("lambda_initial", self.lambda_initial, 0.0, 100.0)
        check_range("lambda_final", self.lambda_final, 0.0, 100.0)

    @property
    def joint(self) -> bool:
        return self.joint_lora


@dataclasses.dataclass
class ParallelRecipe(HeadsTraining):
    out_dir: str = "runs/parallel"
    n_heads: int = 4  # heads in all (head 1 = the base's last layer)
    joint_lora: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_range("n_heads", self.n_heads, 2, 16, integer=True)

    @property
    def joint(self) -> bool:
        return self.joint_lora


@torch.no_grad()
def self_distill_examples(engine, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8,
                          temperature: float = 0.0, seed: int = 0, stop_tokens=None) -> list[dict]:
    """Let the model answer `prompts` itself (with the engine) and return training examples:
    {"input_ids": prompt + answer, "labels": -100 on the prompt, the answer after it}."""
    from flashtune.decoding.drafters.eagle.synth import answers

    got = answers(engine, prompts, max_new_tokens, batch_size, stop_tokens, temperature, seed)
    return [{"input_ids": list(p) + ans, "labels": [IGNORE] * len(p) + ans} for p, ans in zip(prompts, got)]


def _synthesised_examples(recipe: HeadsTraining) -> list[dict]:
    """Training examples from a file that the EAGLE-3 recipe wrote (its data.jsonl): the chat-templated prompt
    and the target's greedy answer, so every drafter can learn from the same self-distilled data."""
    from flashtune.decoding.drafters.eagle.synth import read_records

    _, records = read_records(recipe.data)
    out = [{"input_ids": r["prompt_ids"] + r["answer_ids"], "labels": [IGNORE] * len(r["prompt_ids"]) + r["answer_ids"]}
           for r in records[: recipe.num_prompts] if r.get("answer_ids")]
    if len(out) < 4:
        raise ConfigError(f"{recipe.data} gives {len(out)} answered prompts; heads need at least 4")
    return out


def _examples(recipe: HeadsTraining, model, tokenizer, device) -> list[dict]:
    from flashtune.data import head_training_prompts, make_lm_dataset, stop_token_ids
    from flashtune.decoding import Engine
    from flashtune.decoding.drafters.eagle.synth import is_synthesised

    if is_synthesised(recipe.data):  # Magpie prompts with the target's own answers (eagle/synth.py)
        return _synthesised_examples(recipe)
    prompts, examples = head_training_prompts(recipe.data, recipe.num_prompts, recipe.seed, tokenizer)
    if len(prompts) < 4:
        raise ConfigError(f"{recipe.data} gives {len(prompts)} prompts; heads need at least 4")
    if not recipe.self_distill and examples is not None:
        return make_lm_dataset(examples, tokenizer, refs="all")
    batch = min(32, len(prompts))
    engine = Engine(model, tokenizer, max_batch_size=batch, device=device,
                    max_seq_len=max(len(p) for p in prompts) + recipe.max_new_tokens + 8)
    data = self_distill_examples(engine, prompts, recipe.max_new_tokens, batch_size=batch,
                                 stop_tokens=stop_token_ids(tokenizer))
    del engine
    gc.collect()  # the engine's CUDA graphs hold memory until its reference cycle is collected
    return data


def _train(recipe: HeadsTraining, build, loss_fn, model=None, tokenizer=None, examples=None,
           progress: bool = True, topk: int = 1):
    """The one training loop of every head recipe. build(model) -> (heads, wrapper) is called after the base is
    frozen and before LoRA is attached; loss_fn(wrapper) -> the loss. Returns (wrapper, accuracy [K, topk],
    report dict without the method's own entries); nothing is written yet (see `_finish`)."""
    from flashtune.data import Collator
    from flashtune.models import load_base_model, resolve_device
    from flashtune.training import TrainConfig, fit

    t0 = time.time()
    device = resolve_device(recipe.device)
    if model is None:
        model, tokenizer = load_base_model(recipe.model or None, dtype=recipe.dtype)
    model.to(device).eval()
    data = examples if examples is not None else _examples(recipe, model, tokenizer, device)
    held = max(2, len(data) // 10)
    if len(data) - held < 1:
        raise ConfigError(f"{len(data)} examples leave nothing to train on after {held} held out; use more prompts")
    train, val = data[held:], data[:held]
    t_data = time.time() - t0

    for p in model.parameters():
        p.requires_grad_(False)
    wrapper = build(model)
    if recipe.joint:
        from flashtune.tuners import LoraConfig, attach

        attach(model, LoraConfig(r=recipe.lora_r, target_modules="all-linear"))
    wrapper.to(device)
    cfg = TrainConfig(out_dir=str(Path(recipe.out_dir) / "train"), precision=recipe.precision, lr=recipe.lr,
                      max_steps=recipe.steps, batch_size=recipe.batch_size, warmup_steps=max(1, recipe.steps // 10),
                      schedule="cosine", weight_decay=0.0, seed=recipe.seed, overwrite=True, save_every=0,
                      log_every=max(1, recipe.steps // 10))
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    collate = Collator(pad)
    result = fit(wrapper, train, cfg, collate_fn=collate, loss_fn=loss_fn(wrapper), progress=progress)
    if hasattr(wrapper, "finish"):
        wrapper.finish()
    wrapper.eval()
    t_train = time.time() - t0 - t_data
    from flashtune.decoding.drafters.base import offset_accuracy

    batches = [collate(val[i: i + recipe.batch_size]) for i in range(0, len(val), recipe.batch_size)]
    acc = offset_accuracy(wrapper, batches, topk=topk)
    report = {"recipe": recipe.to_dict(), "examples": len(train), "held_out": len(val),
              "final_loss": result.history[-1]["loss"] if result.history else None,
              "seconds_data": round(t_data, 1), "seconds_train": round(t_train, 1)}
    return wrapper, acc, report


def _finish(recipe: HeadsTraining, wrapper, report: dict) -> dict:
    """Save the heads (and the LoRA adapter of a joint run) and the report, each file atomically."""
    out = Path(recipe.out_dir)
    wrapper.heads.save(out)
    if recipe.joint:
        from flashtune.tuners import save_adapter

        save_adapter(wrapper.model, out / "adapter")
    atomic_write_json(out / "heads_report.json", report)
    return report


def train_medusa_heads(recipe: MedusaRecipe, model=None, tokenizer=None, examples=None,
                       progress: bool = True) -> dict:
    """Medusa-1 / Medusa-2 heads, a tree built from their measured accuracies; returns the report (also in
    out_dir/heads_report.json; the accuracy table in out_dir/head_accuracy.json for later trees).
    `model`/`tokenizer` may be passed loaded; `examples` (input_ids/labels dicts) replaces the recipe's data."""
    from flashtune.decoding.drafters.medusa import HeadsLM, MedusaHeads, MedusaLoss
    from flashtune.decoding.tree import build_tree, expected_accept_length

    def build(model):
        heads = MedusaHeads.for_model(model.get_output_embeddings().weight, recipe.num_heads, recipe.num_layers,
                                      topk=recipe.topk, base_model=recipe.model or "smollm2-135m-instruct")
        heads.float()
        return HeadsLM(model, heads, head_lr_scale=4.0 if recipe.stage == 2 else 1.0)

    def loss(wrapper):
        return MedusaLoss(mode="medusa1" if recipe.stage == 1 else "medusa2",
                          distill=recipe.self_distill and recipe.stage == 2, ramp_steps=recipe.steps // 10)

    wrapper, acc, report = _train(recipe, build, loss, model, tokenizer, examples, progress, topk=recipe.topk)
    heads = wrapper.heads
    heads.set_tree(build_tree(acc, recipe.tree_nodes, topk=recipe.topk) if recipe.tree_nodes else None)
    report.update({"head_top1": acc[:, 0].tolist(), "head_top5": acc[:, :5].sum(1).tolist(),
                   "tree_nodes": heads.tree.num_nodes - 1,
                   "expected_tokens_per_step": expected_accept_length(heads.tree.paths, acc)})
    _finish(recipe, wrapper, report)
    atomic_write_json(Path(recipe.out_dir) / "head_accuracy.json", acc.tolist())  # [K, topk]
    return report


def train_mtp_heads(recipe: MTPRecipe, model=None, tokenizer=None, examples=None, progress: bool = True) -> dict:
    """DeepSeek-V3 MTP modules (optionally with LoRA on the base); returns the report with per-depth top-1."""
    from flashtune.decoding.drafters.mtp import MTPLoss, MTPModules, WithMTP

    def build(model):
        mtp = MTPModules.build(model, depth=recipe.depth, lambda_initial=recipe.lambda_initial,
                               lambda_final=recipe.lambda_final)
        return WithMTP(model, mtp.float())  # trained in fp32 whatever the base's dtype; cast again for drafting

    wrapper, acc, report = _train(recipe, build, lambda w: MTPLoss(w.heads.config), model, tokenizer, examples,
                                  progress)
    report["depth_top1"] = acc[:, 0].tolist()
    return _finish(recipe, wrapper, report)


def train_parallel_heads(recipe: ParallelRecipe, model=None, tokenizer=None, examples=None,
                         progress: bool = True) -> dict:
    """Gloeckle et al. parallel heads (optionally with LoRA); returns the report with per-head top-1."""
    from flashtune.decoding.drafters.parallel import ParallelHeads, ParallelHeadsLoss, WithParallelHeads

    def build(model):
        return WithParallelHeads(model, ParallelHeads.build(model, n_heads=recipe.n_heads).float())

    wrapper, acc, report = _train(recipe, build, lambda w: ParallelHeadsLoss(), model, tokenizer, examples,
                                  progress)
    report["depth_top1"] = acc[:, 0].tolist()
    return _finish(recipe, wrapper, report)
