"""Sharded checkpoints of a torchrun job (DDP or FSDP2), through torch.distributed.checkpoint (DCP).

The trainable weights and AdamW state are written by every rank with DCP's safetensors storage (the layout
lives in the safetensors headers: nothing pickled), RNG states per rank, `state.json` from rank 0, into a
temporary folder that rank 0 renames after a barrier, as the one-process checkpoints (checkpoint.py) are. They
load on any world size (DCP reshards), and in one process without torchrun; a one-process checkpoint loads
into FSDP2's shards. `rt` is the job's distributed.Runtime (its rank and whether it is rank 0).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flashtune.errors import FlashtuneError
from flashtune.training import checkpoint as ckpt
from flashtune.training.distributed import barrier

DCP_FORMAT = "dcp-safetensors"


def _init_optimizer_state(optimizer) -> None:
    """Give every parameter its AdamW state (a zero-gradient step at lr 0 changes no weight), to load into."""
    if all(p in optimizer.state for g in optimizer.param_groups for p in g["params"]):
        return
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, saved):
        g["lr"] = lr


def _tensors(trainable: list, optimizer) -> dict[str, torch.Tensor]:
    """{"param/<name>": weight, "optim/<name>/<key>": AdamW state}: DTensors under FSDP2, plain under DDP."""
    out = {f"param/{n}": p for n, p in trainable}
    for n, p in trainable:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"optim/{n}/{key}"] = value
    return out


def _groups(optimizer, trainable) -> list[dict]:
    names = {id(p): n for n, p in trainable}
    return [{**{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"},
             "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]


def save(out_dir, step: int, trainable: list, optimizer, scheduler, scaler, extra: dict, keep: int, rt) -> Path:
    """Every rank writes its shard with DCP into a temporary folder; rank 0 renames it after a barrier."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}-partial"
    if rt.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        tensors = {k: v.detach() for k, v in _tensors(trainable, optimizer).items()}
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "shards"), save_distributed=True))
        rng_tensors, rng_meta = ckpt.rng_state()
        save_file(rng_tensors, str(tmp / f"rng-rank{rt.rank}.safetensors"))
        ckpt._write_json(tmp / f"rng-rank{rt.rank}.json", rng_meta)
        barrier()
        if rt.main:
            state = {"format": ckpt.FORMAT_VERSION, "storage": DCP_FORMAT, "step": step,
                     "param_groups": _groups(optimizer, trainable), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), **extra}
            ckpt._write_json(tmp / "state.json", state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpt._write_json(out_dir / "latest.json", {"checkpoint": str(final.relative_to(out_dir)), "step": step})
            for old in ckpt.checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:   # by step number
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if rt.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def load(path, trainable: list, optimizer, scheduler, scaler, rt, state: dict) -> dict:
    """Restore a DCP checkpoint on any world size (resharded by DCP), or in one process without torchrun; or a
    one-process checkpoint (full tensors) into FSDP2's shards. state: the checkpoint's state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = Path(path)
    saved_names = {n for g in state["param_groups"] for n in g["params"]}
    names = {n for n, _ in trainable}
    if saved_names != names:
        missing, unexpected = sorted(names - saved_names), sorted(saved_names - names)
        raise FlashtuneError(f"checkpoint {path} does not match the model's trainable parameters (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); resume with the same model and "
                             f"adapter config, or use a new out_dir")
    _init_optimizer_state(optimizer)
    tensors = _tensors(trainable, optimizer)
    one_process = state.get("storage") != DCP_FORMAT
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        if one_process:
            _load_full(tensors, path)
        else:
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "shards")))
    by_name = {n: i for i, (n, _) in enumerate(trainable)}
    by_id = {id(p): i for i, (_, p) in enumerate(trainable)}
    for g, saved in zip(optimizer.param_groups, state["param_groups"]):
        if [by_name[n] for n in saved["params"]] != [by_id[id(p)] for p in g["params"]]:
            raise FlashtuneError(f"checkpoint {path}: optimizer groups differ from the model's; resume with the "
                                 f"same weight_decay and adapter config")
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
    if one_process:
        ckpt.set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
        return state
    mine = path / f"rng-rank{rt.rank}.safetensors"
    if not mine.is_file():                   # another world size: rank 0's generators
        mine = path / "rng-rank0.safetensors"
    ckpt.set_rng_state(load_file(str(mine)), json.loads(mine.with_suffix(".json").read_text()))
    return state


def _load_full(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy a one-process checkpoint's full tensors into `tensors`; a DTensor keeps only this rank's shard."""
    full = {f"param/{k}": v for k, v in load_file(str(path / "trainable.safetensors")).items()}
    full.update({f"optim/{k}": v for k, v in load_file(str(path / "optimizer.safetensors")).items()})
    if set(full) != set(tensors):
        raise FlashtuneError(f"checkpoint {path} holds other tensors than the model's trainables and AdamW state "
                             f"(e.g. {sorted(set(full) ^ set(tensors))[:2]}); resume with the same adapter config")
    for key, dst in tensors.items():
        src = full[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise FlashtuneError(f"checkpoint {path}: {key} has shape {tuple(src.shape)}, the model "
                                 f"{tuple(dst.shape)}; resume with the same adapter config")
        if hasattr(dst, "device_mesh"):      # FSDP2: cut this rank's shard out locally, no communication
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.copy_(src)
