"""The training loop: AdamW, gradient accumulation, clipping, warmup + decay, evaluation, exact resume.

Decoupled Weight Decay Regularization (AdamW; Loshchilov & Hutter, arXiv:1711.05101); SGDR's cosine decay
(Loshchilov & Hutter, arXiv:1608.03983) after a linear warmup.

    result = fit(model, dataset, TrainConfig(out_dir="runs/x", precision="bf16", max_steps=200),
                 collate_fn=collate)
    result.history[-1]   # {"step": 200, "loss": ..., "lr": ..., "tokens_per_s": ..., ...}

Loss normalization: the default loss is the mean next-token cross-entropy over all labelled tokens of the
optimizer step (all `grad_accum` micro-batches together), so accumulating k micro-batches equals one batch k
times larger. A custom `loss_fn` returns a per-micro-batch scalar, which is averaged over the micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from flashtune.errors import ConfigError, FlashtuneError, check_bool, check_choice, check_path, check_range
from flashtune.training import checkpoint as ckpt
from flashtune.training import distributed
from flashtune.training.fused_lora import fuse_lora, unfuse_lora
from flashtune.training.loss import count_targets
from flashtune.training.precision import PRECISIONS, PrecisionPolicy
from flashtune.training.sampler import make_batches
from flashtune.training.speed import compile_blocks, enable_checkpointing

log = logging.getLogger("flashtune.training")
SCHEDULES = ("cosine", "linear", "constant")
MAX_LR = 1e3


@dataclasses.dataclass
class TrainConfig:
    """Everything `fit` needs besides the model and data. Steps count optimizer updates."""

    out_dir: str = "runs/flashtune"          # checkpoints/, latest.json and metrics.jsonl go here
    precision: str = "fp32"                  # "fp32" | "bf16" | "fp16" (fp16 adds a GradScaler)
    lr: float = 2e-4
    weight_decay: float = 0.0                # applied to matrices only, never to biases / norms (1-d)
    max_steps: int = 0                       # optimizer steps; 0: derived from `epochs`
    epochs: float = 1.0
    batch_size: int = 8                      # examples per micro-batch
    grad_accum: int = 1                      # micro-batches per optimizer step
    max_grad_norm: float = 1.0               # 0: no clipping
    warmup_steps: int = 0
    schedule: str = "cosine"                 # decay after warmup: "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.0                # the decay ends at lr * min_lr_ratio
    eval_every: int = 0                      # 0: evaluate only at the end
    save_every: int = 500                    # 0: checkpoint only at the end and on SIGINT/SIGTERM
    log_every: int = 10
    seed: int = 0
    resume: bool = False                     # continue from out_dir's latest checkpoint
    overwrite: bool = False                  # start over even if out_dir holds a checkpoint
    keep_checkpoints: int = 2
    drop_last: bool = False
    ce_chunk_size: int = 4096                # rows per block of the chunked head + cross-entropy; 0: plain
    gradient_checkpointing: float = 0.0      # fraction of blocks recomputed in backward (False 0 .. True 1)
    compile: bool = False                    # torch.compile each transformer block
    fused_lora: bool = True                  # LoRA layers as one fused autograd node while training
    fused_norm_mlp: bool = False             # RMSNorm and SwiGLU as one Triton kernel each way (fused_ops.py)
    # [distributed] used only under torchrun (flashtune.training.distributed)
    strategy: str = "auto"                   # "ddp" | "fsdp" | "auto" (ddp when one replica fits a device)
    cpu_offload: bool = False                # fsdp: sharded weights, gradients and AdamW state live on the CPU

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("strategy", self.strategy, distributed.STRATEGIES)      # [distributed]
        # AdamW divides lr by (1 - beta1^t) in float32: past ~1e37 that overflows inside torch; 1e3 is far
        # above any useful learning rate and far below the overflow.
        check_range("lr", self.lr, 0, MAX_LR, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("max_steps", self.max_steps, 0, integer=True)
        check_range("epochs", self.epochs, 0)
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError("max_steps=0 and epochs=0: set one of them to say how long to train")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            check_range(name, getattr(self, name), 1, integer=True)
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "ce_chunk_size"):
            check_range(name, getattr(self, name), 0, integer=True)
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = float(self.gradient_checkpointing)
        check_range("gradient_checkpointing", self.gradient_checkpointing, 0, 1)
        for name in ("compile", "fused_lora", "fused_norm_mlp", "resume", "overwrite", "drop_last", "cpu_offload"):
            check_bool(name, getattr(self, name))
        check_range("max_grad_norm", self.max_grad_norm, 0)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        self.out_dir = check_path("out_dir", self.out_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a table of fields, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training field {unknown[0]!r}; allowed fields: {', '.join(sorted(known))}")
        return cls(**data)


@dataclasses.dataclass
class TrainResult:
    history: list[dict]                      # the rows of metrics.jsonl
    step: int                                # optimizer steps done
    checkpoint: str                          # the final checkpoint directory
    eval: dict | None = None                 # the last evaluation's metrics
    skipped_steps: int = 0                   # fp16 steps skipped for inf/NaN gradients
    train_time_s: float = 0.0                # wall time of this call's training loop


class NonFiniteTraining(FlashtuneError):
    """The loss or the gradients stopped being finite numbers; training stopped before applying them."""

    def __init__(self, step: int, what: str, checkpoint, config: TrainConfig):
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(f"training stopped at step {step}: {what}; {kept}; lower train.lr (now {config.lr:g}), "
                         f"check the data, or use precision='fp32'")
        self.step, self.checkpoint = step, None if checkpoint is None else str(checkpoint)


# fp16's GradScaler skips a step whose gradients overflowed and halves its scale; a few skips in a row are its
# normal search for a scale. More than this many in a row means the loss itself is not finite any more.
MAX_FP16_SKIPS_IN_A_ROW = 24


def _finite_row(row: dict) -> dict:
    """metrics.jsonl is strict JSON: a non-finite float is written as null, never NaN / Infinity."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _all_finite(tensors: list) -> bool:
    """Whether every element of every tensor is finite, read with one wait for the device, not one per tensor.

    Sharded parameters (FSDP2's DTensors, whose flags are collectives of their own) are read one by one."""
    flags = [torch.isfinite(t).all() for t in tensors]
    if flags and all(type(f) is torch.Tensor for f in flags) and len({f.device for f in flags}) == 1:
        return bool(torch.stack(flags).all())
    return all(bool(f) for f in flags)


class TrainingInterrupted(FlashtuneError):
    """SIGINT/SIGTERM arrived; the current step finished and a checkpoint was saved."""

    def __init__(self, signum: int, step: int, path):
        name = signal.Signals(signum).name
        super().__init__(f"training stopped by {name} after step {step}; checkpoint saved to {path}; "
                         f"run again with resume=True (--resume) to continue")
        self.exit_code = 128 + signum
        self.step, self.checkpoint = step, str(path)


# issue 13: what a resumed run must share with its checkpoint. These shape the steps already taken and the
# data order (a changed batch size would be applied to the old data position); a resume that changes one is
# refused, naming each difference, rather than applied silently: the run would be neither the old one nor the
# new one. Extending a run (max_steps, epochs), bookkeeping (logging, saving, evaluation, speed switches) and
# the distributed layout may change. recipes/finetune.py checks these same fields against finetune.json.
RESUME_MUST_MATCH = ("lr", "weight_decay", "batch_size", "grad_accum", "max_grad_norm", "warmup_steps",
                     "schedule", "min_lr_ratio", "seed", "drop_last", "precision")


def check_resume_config(saved: dict | None, config: TrainConfig, checkpoint, world_changed: bool = False) -> None:
    """ConfigError naming every field of RESUME_MUST_MATCH whose value differs from the checkpoint's.

    world_changed: the checkpoint was written by another number of ranks; then grad_accum is not compared,
    since the distributed runtime recomputes it to keep the checkpoint's global batch. `saved` is the config
    the caller passed to `fit` (not the recomputed one), so a run resumes any number of times on any world size
    with the same values."""
    if not isinstance(saved, dict):
        return                                        # a checkpoint written without its config: nothing to compare
    diffs = [f"{k}={getattr(config, k)!r} (the checkpoint has {saved[k]!r})" for k in RESUME_MUST_MATCH
             if k in saved and saved[k] != getattr(config, k) and not (world_changed and k == "grad_accum")]
    if diffs:
        raise ConfigError(f"resume=True with hyper-parameters that differ from {checkpoint}: {'; '.join(diffs)}; "
                          f"resume with the checkpoint's values, or start a new run (overwrite=True or another "
                          f"out_dir)")


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """The factor on the base lr for 0-indexed optimizer step `step`: linear warmup to 1, then the decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _n_tokens(batch: dict) -> int:
    if torch.is_tensor(batch.get("attention_mask")):
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if torch.is_tensor(ids) else 0


def _make_optimizer(trainable, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # Keep each group's parameters in model order so checkpoint indices map back to names.
    order = {id(p): i for i, (_, p) in enumerate(trainable)}
    for g in groups:
        g["params"].sort(key=lambda p: order[id(p)])
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda" or None)


class _SignalGuard:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _read_history(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:                             # issue 13: a line cut short by a kill, or garbage, is dropped
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append(row)
    return [r for r in rows if r.get("step", 0) <= upto]


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(_finite_row(r), allow_nan=False) + "\n" for r in rows))
    os.replace(tmp, path)


@distributed.name_rank_errors
def fit(model: torch.nn.Module, train_dataset: Sequence, config: TrainConfig,
        collate_fn: Callable[[list], dict] | None = None, eval_fn: Callable | None = None,
        loss_fn: Callable | None = None, progress: bool = True,
        length_fn: Callable | None = None) -> TrainResult:
    """Train the parameters of `model` that have requires_grad on `train_dataset`; see the module docstring.

    train_dataset: indexable examples; collate_fn(list of examples) -> dict of tensors [B, T] (`input_ids`,
    `attention_mask`, `labels` with -100 = no loss); when None, examples must already be such dicts of 1-d
    tensors of one length. eval_fn(model) -> dict[str, float], run every `eval_every` steps and at the end
    (no grad, eval mode, RNG untouched). loss_fn(model, batch) -> scalar; default causal-LM cross-entropy.
    length_fn(example) -> int turns on length bucketing. Raises TrainingInterrupted after SIGINT/SIGTERM.

    resume=True refuses (ConfigError naming each) hyper-parameters in RESUME_MUST_MATCH that differ from the
    checkpoint's. A non-finite loss or gradient raises NonFiniteTraining naming the step, at the latest one
    step later (the check never stalls the GPU, so the model in memory may hold that step's update; fp16:
    after more than MAX_FP16_SKIPS_IN_A_ROW scaler skips in a row); no checkpoint, metrics row or evaluation
    is made past it, the last good checkpoint stays the one latest.json names, and metrics.jsonl holds strict
    JSON (null for a non-finite value).
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, not {type(config).__name__}")
    if len(train_dataset) == 0:
        raise ConfigError("train_dataset is empty; give fit at least one example")
    if config.drop_last and len(train_dataset) < config.batch_size:
        raise ConfigError(f"drop_last=True with {len(train_dataset)} examples < batch_size={config.batch_size} "
                          f"leaves no batch; lower batch_size or set drop_last=False")
    collate_fn = collate_fn or _stack
    rt = distributed.runtime(model)      # [distributed] torchrun's ranks; one process: a pass-through
    device = next(model.parameters()).device
    out_dir = Path(config.out_dir)
    try:                                                 # issue 13: one line, not an OSError traceback
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlashtuneError(f"cannot use out_dir={str(out_dir)!r}: {exc.strerror or exc} ({exc.filename}); "
                             f"choose a folder you can write to") from None
    metrics_path = out_dir / "metrics.jsonl"
    existing = ckpt.latest_checkpoint(out_dir)
    if existing is not None and not config.resume and not config.overwrite:
        raise ConfigError(f"out_dir={str(out_dir)!r} already holds a checkpoint ({existing.name}); pass "
                          f"resume=True to continue it, overwrite=True to start over, or another out_dir")
    distributed.barrier()                               # [distributed] every rank saw the old checkpoint
    if existing is not None and not config.resume:     # overwrite: drop our own files of the old run
        if rt.main:
            (out_dir / "latest.json").unlink()
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        distributed.barrier()
        existing = None
    saved = None                                        # the checkpoint's state.json, read once
    if config.resume and existing is not None:          # issue 13: refuse changed hyper-parameters
        saved = ckpt.read_state(existing)
        saved_world = (saved.get("distributed") or {}).get("world", 1)
        check_resume_config(saved.get("config"), config, existing, world_changed=saved_world != rt.world)
    if rt.main:
        ckpt.remove_stale(out_dir)                       # issue 13: temp folders of a crashed writer
    # The checkpoints store the caller's config, not the adapted one: a later resume compares the user's values
    # (a stored recomputed grad_accum would refuse the user's own on the next resume at this world size).
    requested = config
    config = rt.adapt_config(config, saved)           # [distributed] keep the global batch across world sizes

    seed_everything(config.seed)
    policy = PrecisionPolicy(config.precision, device)
    trainable = policy.prepare(model)
    if config.gradient_checkpointing:
        enable_checkpointing(model, config.gradient_checkpointing)
    if config.compile:
        compile_blocks(model)
    trainable = rt.wrap(model, trainable, config, device)   # [distributed] DDP / FSDP2 under torchrun
    if rt.strategy == "fsdp" and rt.compute_device() != device:   # [distributed] FSDP2 computes on its mesh
        device = rt.compute_device()
        policy = PrecisionPolicy(config.precision, device)
    params = [p for _, p in trainable]
    optimizer = _make_optimizer(trainable, config, device)
    batches = make_batches(train_dataset, config.batch_size, config.seed, length_fn, config.drop_last)
    total = rt.total_steps(config, len(batches))       # [distributed] a step takes grad_accum x world batches
    schedule = (config.warmup_steps, total, config.schedule, config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, *schedule))

    step, position, history = 0, (0, 0), []
    acc = {"loss": 0.0, "steps": 0, "skipped": 0, "skipped_total": 0}
    if saved is not None:
        state = rt.load(existing, trainable, optimizer, scheduler, policy.scaler, saved)   # [distributed] any format
        step, position, acc = state["step"], tuple(state["position"]), state["log_acc"]
        if not rt.main:                                 # [distributed] the logged partial loss is rank 0's
            acc = {**acc, "loss": 0.0}
        history = _read_history(metrics_path, step)
        log.info("resumed from %s at step %d", existing, step)
    if rt.main:                                         # [distributed] rank 0 writes files
        _write_history(metrics_path, history)

    loss_acc = torch.tensor(acc["loss"], dtype=torch.float32, device=device)
    chunk = config.ce_chunk_size or None
    last_eval, last_eval_step = None, -1
    tokens, t_log = 0, time.perf_counter()
    t_start = t_log
    path = existing

    pending = []      # issue 13: (step, finite flag, loss, grad norm) of steps whose flag is not read yet

    def settle():
        """Raise NonFiniteTraining for the first pending step whose loss or gradient norm was not finite."""
        while pending:
            bad_step, finite, loss_t, norm_t = pending.pop(0)
            if not bool(finite):
                what = (f"the loss is {float(loss_t)}" if not math.isfinite(float(loss_t))
                        else f"the gradient norm is {float(norm_t)}")
                raise NonFiniteTraining(bad_step, what, path, config)

    def checkpoint_now():
        settle()
        # issue 13: never save non-finite weights over a good checkpoint (e.g. the last step of lr=inf).
        if not _all_finite(params):
            raise NonFiniteTraining(step, "the trainable weights are not finite (NaN or inf)", path, config)
        extra = {"position": list(position), "config": requested.to_dict(),
                 "log_acc": {**acc, "loss": float(loss_acc)}}
        return rt.save(out_dir, step, trainable, optimizer, scheduler, policy.scaler, extra,   # [distributed]
                       keep=config.keep_checkpoints, config=config)

    def run_eval():
        settle()
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                rt.gathered():                          # [distributed] FSDP2: the root's weights whole
            metrics = eval_fn(model)
        model.train(was_training)
        return {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in metrics.items()}

    skips_in_a_row = 0
    bar = _progress_bar(total, step, progress and rt.main)
    if config.fused_lora:
        fuse_lora(model)
    unfuse_norm_mlp = None
    if config.fused_norm_mlp:  # Triton is an optional extra: imported only when asked for
        from flashtune.training.fused_ops import fuse_norm_mlp, unfuse_norm_mlp

        fuse_norm_mlp(model)
    was_training = model.training
    model.train()
    try:
        with _SignalGuard() as guard, (metrics_path if rt.main else Path(os.devnull)).open("a") as metrics_file:
            while step < total:
                micro = []
                for _ in range(config.grad_accum):
                    idx, position = rt.take(batches, position)   # [distributed] this rank's share
                    micro.append(collate_fn([train_dataset[i] for i in idx]))
                n_targets = None
                if loss_fn is None:     # [distributed] targets of the global batch: one all-reduce
                    n_targets = max(1, int(rt.all_sum([sum(count_targets(b) for b in micro)])[0]))
                lr = optimizer.param_groups[0]["lr"]
                step_loss = torch.zeros((), dtype=torch.float32, device=device)   # issue 13: finiteness check
                for k, batch in enumerate(micro):
                    tokens += _n_tokens(batch)
                    batch = _to_device(batch, device)
                    rt.grad_sync(k == len(micro) - 1)       # [distributed] reduce after the last micro-batch
                    with policy.autocast():
                        if loss_fn is None:
                            loss = rt.forward(model, batch, chunk) / n_targets
                        else:
                            loss = rt.forward(model, batch, chunk, loss_fn) / config.grad_accum
                    policy.scaler.scale(rt.backward_scale(loss, loss_fn is None)).backward()   # [distributed]
                    loss_acc += loss.detach().float()
                    step_loss += loss.detach().float()
                grad_norm = None
                if config.max_grad_norm > 0:
                    policy.scaler.unscale_(optimizer)
                    grad_norm = rt.clip(params, config.max_grad_norm)     # [distributed] FSDP2: sharded norm
                # issue 13: without a loss scaler, a non-finite loss or gradient stops training. The flag
                # is read one step later (settle), when the GPU is long past it, so it never stalls the
                # pipeline; fp16 counts the scaler's skips below. With clipping off the norm is computed for this
                # check alone (one fused pass over the gradients): a NaN gradient can come with a finite loss.
                if not policy.scaler.is_enabled():
                    norm = grad_norm if grad_norm is not None else torch.nn.utils.get_total_norm(
                        [p.grad for p in params if p.grad is not None])
                    settle()
                    pending.append((step + 1, torch.isfinite(step_loss + norm), step_loss, norm))
                scale = policy.scaler.get_scale() if policy.scaler.is_enabled() else None
                policy.scaler.step(optimizer)
                policy.scaler.update()
                if scale is not None and policy.scaler.get_scale() < scale:
                    acc["skipped"] += 1
                    acc["skipped_total"] += 1
                    log.warning("step %d skipped: inf/NaN gradients in fp16; loss scale %g -> %g",
                                step + 1, scale, policy.scaler.get_scale())
                    skips_in_a_row += 1
                    if skips_in_a_row > MAX_FP16_SKIPS_IN_A_ROW:      # issue 13
                        raise NonFiniteTraining(step + 1, f"{skips_in_a_row} fp16 steps in a row had inf/NaN "
                                                f"gradients (loss {float(step_loss)})", path, config)
                else:
                    skips_in_a_row = 0
                optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():   # a skipped fp16 step makes torch warn about the order
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                step += 1
                acc["steps"] += 1

                row = None
                if step % config.log_every == 0 or step == total:
                    settle()                         # issue 13: no row for a step that was not finite
                    now = time.perf_counter()
                    # [distributed] the global loss and token count: sums over ranks (a custom loss: mean)
                    loss_sum, tokens = rt.all_sum([float(loss_acc), tokens])
                    loss_sum /= 1 if loss_fn is None else rt.world
                    row = {"step": step, "epoch": round(position[0] + position[1] / len(batches), 4),
                           "loss": loss_sum / acc["steps"], "lr": lr,
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_s": tokens / max(now - t_log, 1e-9),
                           "step_time_s": (now - t_log) / acc["steps"]}
                    if policy.scaler.is_enabled():
                        row["skipped"] = acc["skipped"]
                        row["loss_scale"] = policy.scaler.get_scale()
                    loss_acc.zero_()
                    acc.update(loss=0.0, steps=0, skipped=0)
                    tokens, t_log = 0, now
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
                    last_eval, last_eval_step = run_eval(), step
                    row = {**(row or {"step": step}), **last_eval}
                    t_log = time.perf_counter()
                if row is not None:
                    row = _finite_row(row)           # once: the same strict row for history and the file
                    history.append(row)
                    metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
                    metrics_file.flush()
                bar.update(1)
                if config.save_every and step % config.save_every == 0:
                    path = checkpoint_now()
                if guard.signum is not None:
                    if not (config.save_every and step % config.save_every == 0):
                        path = checkpoint_now()
                    raise TrainingInterrupted(guard.signum, step, path)
            train_time = time.perf_counter() - t_start
            if eval_fn is not None and last_eval_step != step:
                last_eval = run_eval()
                row = _finite_row({"step": step, **last_eval})
                history.append(row)
                metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
            if path is None or not str(path).endswith(f"step-{step:06d}"):
                path = checkpoint_now()
    finally:
        bar.close()
        unfuse_lora(model)
        if unfuse_norm_mlp is not None:
            unfuse_norm_mlp(model)
        model.train(was_training)
    return TrainResult(history=history, step=step, checkpoint=str(path), eval=last_eval,
                       skipped_steps=acc["skipped_total"], train_time_s=train_time)


def _stack(examples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
