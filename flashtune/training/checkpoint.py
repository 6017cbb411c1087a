"""Atomic, resumable training checkpoints, safetensors + JSON only (nothing is unpickled).

Layout of `out_dir`:

    checkpoints/step-000120/  trainable.safetensors   the parameters with requires_grad, by name (fp32)
                              optimizer.safetensors    AdamW moments and step counts, keyed "<param name>/<key>"
                              rng.safetensors          torch CPU and CUDA generator states, numpy's key array
                              state.json               step, data position, optimizer hyper-parameters,
                                                       scheduler and GradScaler state, python/numpy RNG scalars
    latest.json               {"checkpoint": "checkpoints/step-000120"}

A checkpoint is written into a temporary sibling directory and renamed into place, then `latest.json` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact and named by latest.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flashtune.errors import FlashtuneError

FORMAT_VERSION = 1


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) capturing python, numpy, torch and CUDA random generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))


def _optimizer_indices(optimizer: torch.optim.Optimizer, trainable: list) -> dict[int, str]:
    """state_dict index -> parameter name (state_dict numbers parameters group after group)."""
    by_id = {id(p): n for n, p in trainable}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: by_id[id(p)] for i, p in enumerate(flat)}


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, names: dict[int, str]):
    """AdamW state_dict -> ({"<name>/<key>": tensor}, json-able param_groups with parameter names)."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{names[idx]}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["params"] = [names[i] for i in g["params"]]
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


def _optimizer_from_flat(tensors: dict, groups: list[dict], order: dict[str, int]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(order[name], {})[field] = value
    param_groups = []
    for g in groups:
        g = dict(g)
        g["params"] = [order[n] for n in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        param_groups.append(g)
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(out_dir, step: int, trainable: list, optimizer, scheduler, scaler, extra: dict,
                    keep: int = 2) -> Path:
    """Write the checkpoint for `step` atomically and point latest.json at it; keep the newest `keep`."""
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root))
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable}, str(tmp / "trainable.safetensors"))
        opt_tensors, groups = _optimizer_to_flat(optimizer, _optimizer_indices(optimizer, trainable))
        save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        sched = scheduler.state_dict()   # LambdaLR over a plain function: lr_lambdas is [None], JSON-able
        state = {"format": FORMAT_VERSION, "step": step, "param_groups": groups, "scheduler": sched,
                 "scaler": scaler.state_dict(), "rng": rng_meta, **extra}
        _write_json(tmp / "state.json", state)
        if final.exists():            # a re-save of the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json(out_dir / "latest.json", {"checkpoint": str(final.relative_to(out_dir)), "step": step})
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):   # temp dirs of a crashed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    """The directory latest.json names, or None when out_dir has no checkpoint."""
    pointer = Path(out_dir) / "latest.json"
    if not pointer.is_file():
        return None
    path = Path(out_dir) / json.loads(pointer.read_text())["checkpoint"]
    if not (path / "state.json").is_file():
        raise FlashtuneError(f"{pointer} names {path}, which is missing or incomplete; delete {pointer} to "
                             f"start over, or restore the checkpoint directory")
    return path


def load_checkpoint(path, trainable: list, optimizer, scheduler, scaler) -> dict:
    """Restore trainables, optimizer, scheduler, scaler and RNG states from `path`; return state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    names = [n for n, _ in trainable]
    if set(weights) != set(names):
        missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise FlashtuneError(f"checkpoint {path} does not match the model's trainable parameters "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
                             f"model and adapter config, or use a new out_dir")
    with torch.no_grad():
        for n, p in trainable:
            if weights[n].shape != p.shape:
                raise FlashtuneError(f"checkpoint {path}: {n} has shape {tuple(weights[n].shape)}, the model "
                                     f"{tuple(p.shape)}; resume with the same adapter config")
            p.copy_(weights[n])
    order = {n: i for i, n in _optimizer_indices(optimizer, trainable).items()}
    device = trainable[0][1].device
    opt_tensors = {k: v.to(device) if not k.endswith("/step") else v
                   for k, v in load_file(str(path / "optimizer.safetensors")).items()}
    optimizer.load_state_dict(_optimizer_from_flat(opt_tensors, state["param_groups"], order))
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
