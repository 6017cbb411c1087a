"""Training on several processes: torchrun ranks, DDP or FSDP2, sharded checkpoints (torch.distributed.checkpoint).

PyTorch Distributed: Experiences on Accelerating Data Parallel Training (DDP; Li et al., arXiv:2006.15704);
PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel (Zhao et al., arXiv:2304.11277), here in its
per-parameter-sharding form, FSDP2's `fully_shard` (each decoder block a unit, then the root).

`fit` asks `runtime(model)` for the process layout. Without torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) it is one process and nothing here runs. Under torchrun the process group is created (NCCL on CUDA,
gloo on CPU, with a timeout so a dead peer ends the job instead of hanging it), and:

- data: every rank walks the same seeded sequence of micro-batches; optimizer step s consumes micro-batches
  [s*k*W, (s+1)*k*W) of it (k = grad_accum, W = world size), rank r taking those with index = r (mod W). The
  global batch is micro batch x k x W, and a checkpoint's position is a micro-batch index, so a run resumed on
  another world size keeps the global batch (k is recomputed) and the order of examples.
- loss: the default loss is the sum of token cross-entropies over the whole global batch divided by its
  number of target tokens (counted with one all-reduce), so a step on W ranks equals a step on one process.
  DDP and FSDP2 average gradients over ranks; the loss is multiplied by W to turn that mean into the sum.
- ddp: the model is replicated, trainable gradients all-reduced (DistributedDataParallel over a small module
  that computes the loss, so forward runs through the wrapper). fsdp: `fully_shard` on every decoder block,
  then on that loss module as the root: frozen and trainable weights are sharded, gathered per block;
  `MixedPrecisionPolicy(param_dtype=autocast dtype, reduce_dtype=fp32)` follows the precision policy;
  optional `CPUOffloadPolicy`. auto: ddp when the model and its training state fit on one device, else fsdp.
- checkpoints: sharded through `torch.distributed.checkpoint` (sharded_checkpoint.py); they load on any world
  size, and in one process without torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
from pathlib import Path

import torch
from flashtune.errors import ConfigError, FlashtuneError
from flashtune.training import checkpoint as ckpt

log = logging.getLogger("flashtune.training")
STRATEGIES = ("auto", "ddp", "fsdp")
TIMEOUT_ENV = "FLASHTUNE_DIST_TIMEOUT"        # seconds a collective may wait for a peer (default 600)


def launched() -> bool:
    """True inside a process that torchrun started (its environment names RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str | None = None) -> tuple[int, int, int]:
    """Create the default process group from torchrun's environment (once); return (rank, world, local_rank).

    NCCL when CUDA is available (and the process's CUDA device becomes cuda:LOCAL_RANK), gloo otherwise.
    Outside torchrun: (0, 1, 0) and nothing is created. Call it before loading the model on a GPU.
    """
    if not launched():
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
        kwargs = {}
        if device_type == "cuda":
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout, **kwargs)
        if dist.get_rank() != 0:                 # rank 0 alone logs: the others' flashtune.* loggers keep errors
            logging.getLogger("flashtune").setLevel(logging.ERROR)
    return dist.get_rank(), dist.get_world_size(), local


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that prints, saves adapters and writes reports."""
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def name_rank_errors(fn):
    """Decorator: under torchrun, a FlashtuneError says which rank raised it, and a lost peer becomes one."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not launched():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except FlashtuneError as exc:
            who = f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
            if exc.args and not str(exc.args[0]).startswith("rank "):
                exc.args = (f"{who}: {exc.args[0]}", *exc.args[1:])
            raise
        except RuntimeError as exc:
            if not _is_peer_failure(exc):
                raise
            who = f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}"
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise FlashtuneError(f"{who}: lost contact with another rank ({first}); it failed or was killed: "
                                 f"see its error above; resume from the last checkpoint with --resume") from exc

    return wrapper


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    names = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(dist, n))
    text = str(exc)
    return isinstance(exc, names) or any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                              "Timed out", "timed out", "NCCL", "Gloo"))


# --- strategy -------------------------------------------------------------------------------------------------


def training_bytes(model: torch.nn.Module, precision: str) -> int:
    """Bytes of weights + gradients + AdamW moments (+ fp32 masters under 16-bit) that one replica holds."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * (4 + 8 + (4 if p.dtype != torch.float32 else 0))
    return total


def device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_strategy(strategy: str, model: torch.nn.Module, device: torch.device, precision: str,
                     world: int, headroom: float = 0.7, under_torchrun: bool = True) -> str:
    """'single' outside torchrun and for 'auto' on one rank; 'ddp' or 'fsdp' as asked (also on one rank,
    which checks the code path on one GPU); for 'auto', ddp when one replica's training state takes at most
    `headroom` of the device's memory (the rest is for activations), else fsdp."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is not allowed; choose one of {', '.join(map(repr, STRATEGIES))}")
    if not under_torchrun or (world == 1 and strategy == "auto"):
        return "single"
    if strategy != "auto":
        return strategy
    need, have = training_bytes(model, precision), device_bytes(device)
    chosen = "ddp" if need <= headroom * have else "fsdp"
    log.info("strategy auto -> %s: weights + gradients + AdamW state take %.2f GiB, %s %.0f%% of %.1f GiB on %s",
             chosen, need / 2**30, "within" if chosen == "ddp" else "more than", headroom * 100, have / 2**30,
             device)
    return chosen


class LossModule(torch.nn.Module):
    """The module DDP / FSDP2 wrap: forward(batch) = the training loss, so every forward runs through them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, chunk: int | None, loss_fn=None) -> torch.Tensor:
        return training_loss(self.model, batch, chunk, loss_fn)


def training_loss(model, batch: dict, chunk: int | None, loss_fn=None) -> torch.Tensor:
    """loss_fn(model, batch), or by default the summed next-token cross-entropy of the batch."""
    from flashtune.training.loss import causal_lm_loss_sum

    return causal_lm_loss_sum(model, batch, chunk) if loss_fn is None else loss_fn(model, batch)


def shard_fsdp(model: torch.nn.Module, device: torch.device, precision: str, cpu_offload: bool = False):
    """fully_shard each decoder block, then a LossModule root around `model`; return the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from flashtune.training.precision import _AUTOCAST_DTYPE
    from flashtune.training.speed import decoder_blocks

    import torch.distributed as dist

    if cpu_offload and device.type != "cuda":
        raise ConfigError("cpu_offload=True needs GPUs (FSDP2 keeps the shards in pinned CPU memory and computes "
                          "on the GPU); without one everything is in CPU memory already: set cpu_offload=false")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    half = _AUTOCAST_DTYPE[precision]
    kwargs = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again first in backward: keep them gathered after forward.
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    return fully_shard(LossModule(model), **kwargs)


# --- the per-run object `fit` talks to ---------------------------------------------------------------------------


@dataclasses.dataclass
class Runtime:
    """Rank layout and strategy of one `fit` call; single-process methods are pass-throughs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False                   # under torchrun: sharded (DCP) checkpoints
    strategy: str = "single"
    wrapped: torch.nn.Module | None = None   # the DDP / FSDP2 root around a LossModule
    model: torch.nn.Module | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    # setup -----------------------------------------------------------------------------------------------------
    def adapt_config(self, config, state: dict | None):
        """On resume, keep the checkpoint's global batch: grad_accum = global batch / (batch_size x world).
        state: the checkpoint's state.json (None: no checkpoint to resume)."""
        if not (config.resume and state is not None):
            return config
        saved = state.get("distributed")
        if not saved:
            return config
        global_batch = saved["global_batch"]
        if saved["batch_size"] != config.batch_size:
            raise ConfigError(f"batch_size={config.batch_size} but the checkpoint was trained with batch_size="
                              f"{saved['batch_size']}; resume with the same batch_size (the data position "
                              f"counts micro-batches)")
        per_step = config.batch_size * self.world
        if global_batch % per_step:
            raise ConfigError(f"the checkpoint's global batch is {global_batch} examples = {config.batch_size} x "
                              f"{global_batch // config.batch_size} micro-batches, which {self.world} ranks cannot "
                              f"share evenly; resume on a world size that divides "
                              f"{global_batch // config.batch_size}")
        accum = global_batch // per_step
        if accum != config.grad_accum:
            log.info("resuming %d-rank checkpoint on %d rank(s): grad_accum %d -> %d keeps the global batch of %d",
                     saved["world"], self.world, config.grad_accum, accum, global_batch)
            config = dataclasses.replace(config, grad_accum=accum)
        return config

    def wrap(self, model: torch.nn.Module, trainable: list, config, device: torch.device):
        """Wrap `model` for the strategy; return the (re-fetched) trainable (name, param) list."""
        self.model = model
        strategy = getattr(config, "strategy", "auto")
        self.strategy = resolve_strategy(strategy, model, device, config.precision, self.world,
                                         under_torchrun=self.launched)
        if self.strategy == "single":
            return trainable
        import torch.distributed as dist

        log.info("%s on %d ranks (%s)", self.strategy, self.world, dist.get_backend())
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            cuda = [torch.cuda.current_device()] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(LossModule(model), device_ids=cuda)
            return trainable
        if config.precision == "fp16":
            raise ConfigError("precision='fp16' with strategy='fsdp' is not supported (its loss scaler would need "
                              "sharded inf checks); use precision='bf16', or strategy='ddp'")
        comm = self.compute_device()
        with torch.no_grad():                    # every rank shards the same values: take rank 0's trainables
            for _, p in trainable:
                t = p.data.to(comm)
                dist.broadcast(t, 0)
                p.data.copy_(t)
        # The mesh lives where the backend computes (a model built on the CPU moves to cuda:LOCAL_RANK).
        self.wrapped = shard_fsdp(model, comm, config.precision, getattr(config, "cpu_offload", False))
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # the step ------------------------------------------------------------------------------------------------
    def take(self, batches, position):
        """This rank's micro-batch at `position` and the position after the whole world's micro-batches."""
        return batches.take_shard(position, self.rank, self.world)

    def total_steps(self, config, n_batches: int) -> int:
        import math

        return config.max_steps or max(1, math.ceil(config.epochs * n_batches / (config.grad_accum * self.world)))

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.compute_device())
        dist.all_reduce(t)
        return t.tolist()

    def compute_device(self) -> torch.device:
        """Where the backend computes: cuda:LOCAL_RANK under NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def forward(self, model, batch: dict, chunk, loss_fn=None) -> torch.Tensor:
        if self.wrapped is not None:
            return self.wrapped(batch, chunk, loss_fn)
        return training_loss(model, batch, chunk, loss_fn)

    def grad_sync(self, last: bool) -> None:
        """Before a micro-batch's forward: its backward reduces gradients over ranks only if it is the last.

        DDP's `no_sync()` context does exactly this with the flag set here; a call instead of a context keeps
        backward outside autocast in the loop.
        """
        if self.strategy == "ddp":
            self.wrapped.require_backward_grad_sync = last
        elif self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)

    def backward_scale(self, loss: torch.Tensor, summed: bool) -> torch.Tensor:
        """DDP and FSDP2 average gradients over ranks; a loss already normalized globally wants their sum."""
        return loss * self.world if summed and self.world > 1 else loss

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        if self.strategy != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @contextlib.contextmanager
    def gathered(self):
        """Inside: the root's own weights (embeddings, head, final norm) are whole, for an eval_fn(model)."""
        if self.strategy != "fsdp":
            yield
            return
        self.wrapped.unshard()
        try:
            yield
        finally:
            self.wrapped.reshard()

    # checkpoints --------------------------------------------------------------------------------------------
    def save(self, out_dir, step: int, trainable: list, optimizer, scheduler, scaler, extra: dict, keep: int,
             config) -> Path:
        extra = {**extra, "distributed": {"world": self.world, "strategy": self.strategy,
                                          "batch_size": config.batch_size,
                                          "global_batch": config.batch_size * config.grad_accum * self.world}}
        if not self.launched:
            return ckpt.save_checkpoint(out_dir, step, trainable, optimizer, scheduler, scaler, extra, keep=keep)
        from flashtune.training import sharded_checkpoint

        return sharded_checkpoint.save(out_dir, step, trainable, optimizer, scheduler, scaler, extra, keep, self)

    def load(self, path: Path, trainable: list, optimizer, scheduler, scaler, state: dict) -> dict:
        """Restore the checkpoint at `path` whose state.json is `state` (checkpoint.read_state); return it."""
        from flashtune.training import sharded_checkpoint

        if state.get("storage") == sharded_checkpoint.DCP_FORMAT or self.strategy == "fsdp":
            return sharded_checkpoint.load(path, trainable, optimizer, scheduler, scaler, self, state)
        return ckpt.load_checkpoint(path, trainable, optimizer, scheduler, scaler, state)


def runtime(model: torch.nn.Module) -> Runtime:
    """The layout `fit` trains `model` in: a process group (NCCL for a model on a GPU, gloo for one on the
    CPU) under torchrun, else one process."""
    if not launched():
        return Runtime()
    r, w, local = init(next(model.parameters()).device.type)
    return Runtime(rank=r, world=w, local_rank=local, launched=True)


# --- after fit ---------------------------------------------------------------------------------------------------


def is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 holds the model's weights in shards (a forward then needs every rank)."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def save_adapter(model: torch.nn.Module, directory, adapter_name: str | None = None):
    """`flashtune.save_adapter` from rank 0 alone (PEFT format); under FSDP2 the full weights are gathered first.

    Every rank must call it (FSDP2 gathers with a collective); returns the directory on every rank.
    """
    from flashtune.tuners import save_adapter as _save

    directory = Path(directory)
    sharded = [(n, p) for n, p in model.named_parameters() if p.requires_grad and hasattr(p, "full_tensor")]
    if not sharded:
        if is_main():
            _save(model, directory, adapter_name)
        barrier()
        return directory
    full = [(n, p, p.full_tensor().detach()) for n, p in sharded]      # collective: every rank
    if is_main():
        modules = dict(model.named_modules())
        try:
            for n, p, t in full:
                mod, _, leaf = n.rpartition(".")
                modules[mod]._parameters[leaf] = torch.nn.Parameter(t, requires_grad=True)
            _save(model, directory, adapter_name)
        finally:
            for n, p, _ in full:
                mod, _, leaf = n.rpartition(".")
                modules[mod]._parameters[leaf] = p
    barrier()
    return directory
