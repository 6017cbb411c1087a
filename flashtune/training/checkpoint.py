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
Old checkpoints are pruned by step number (not by name: names grow a digit past step 999,999), and the
temporary `.step-*` folders of a crashed writer are removed at the next start (`remove_stale`).

Reading is checked at the edge: latest.json must name a checkpoint inside the run's checkpoints/, and a corrupt
pointer, state.json or tensor file is a one-line FlashtuneError naming the file; everything is read and
checked before any parameter or optimizer state is changed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flashtune.errors import FlashtuneError
from flashtune.fileio import dir_mode, file_mode

FORMAT_VERSION = 1


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, file_mode())      # mkstemp makes 0600; a checkpoint file gets the umask's usual mode
    os.replace(tmp, path)


_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out_dir) -> list[Path]:
    """out_dir's checkpoint folders, oldest first by step number."""
    root = Path(out_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_stale(out_dir) -> None:
    """Remove the temporary `.step-*` folders a crashed checkpoint writer left behind."""
    for stale in (Path(out_dir) / "checkpoints").glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


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


# One device-to-host copy holds at most this many bytes: the packing buffer is extra device memory for a moment.
HOST_COPY_BYTES = 1 << 30
_ALIGN = 64                       # every tensor starts at a multiple of this in the packed buffer


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def to_host(tensors: list[torch.Tensor], max_bytes: int = HOST_COPY_BYTES) -> list[torch.Tensor]:
    """Contiguous CPU tensors holding the bytes of `.contiguous().cpu()` of each, with one device-to-host
    copy (one wait for the device) per `max_bytes` of each device's tensors instead of one per tensor.

    The tensors of a device are copied as bytes into one buffer there (device-side copies, no wait), the buffer
    comes to the host in one transfer, and each tensor is a view of its own aligned, disjoint slice of it
    (safetensors writes views that do not overlap). A tensor of `max_bytes` or more is copied on its own.
    """
    out: list = [None] * len(tensors)
    buckets: dict = {}                 # device -> its transfers
    for i, t in enumerate(tensors):
        t = t.detach()
        if _on_host(t):
            out[i] = t.contiguous()
            continue
        nbytes = t.numel() * t.element_size()
        if nbytes >= max_bytes:
            out[i] = t.contiguous().cpu()
            continue
        bins = buckets.setdefault(t.device, [[0, []]])      # [padded bytes, tensor indices] per transfer
        if bins[-1][0] + nbytes > max_bytes:
            bins.append([0, []])
        bins[-1][0] += -(-nbytes // _ALIGN) * _ALIGN
        bins[-1][1].append(i)
    for dev, bins in buckets.items():
        for size, members in bins:
            buf = torch.empty(size, dtype=torch.uint8, device=dev)
            spans, off = [], 0
            for i in members:
                t = tensors[i].detach()
                n = t.numel() * t.element_size()
                buf[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
                spans.append((i, off, n))
                off += -(-n // _ALIGN) * _ALIGN
            host = buf.cpu()
            for i, off, n in spans:
                out[i] = host[off:off + n].view(tensors[i].dtype).view(tensors[i].shape)
    return out


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
    final = root / f"step-{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root))
    except OSError as exc:
        raise FlashtuneError(f"cannot write the checkpoint of step {step} to {root}: {exc.strerror or exc}; "
                             f"free disk space or fix the folder's permissions, then resume") from None
    tmp.chmod(dir_mode())          # mkdtemp makes 0700; the checkpoint folder gets the umask's usual mode
    try:
        opt_tensors, groups = _optimizer_to_flat(optimizer, _optimizer_indices(optimizer, trainable))
        # the weights and the optimizer state come to the host together: one transfer, not one per tensor
        host = to_host([p for _, p in trainable] + list(opt_tensors.values()))
        save_file(dict(zip([n for n, _ in trainable], host)), str(tmp / "trainable.safetensors"))
        save_file(dict(zip(opt_tensors, host[len(trainable):])), str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        sched = scheduler.state_dict()   # LambdaLR over a plain function: lr_lambdas is [None], JSON-able
        state = {"format": FORMAT_VERSION, "step": step, "param_groups": groups, "scheduler": sched,
                 "scaler": scaler.state_dict(), "rng": rng_meta, **extra}
        _write_json(tmp / "state.json", state)
        for f in tmp.iterdir():        # safetensors writes 0600 files; give them the umask's usual mode
            f.chmod(file_mode())
        if final.exists():            # a re-save of the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:             # disk full, folder made read-only: one line; the last checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise FlashtuneError(f"cannot write the checkpoint of step {step} to {root}: {exc.strerror or exc}; "
                             f"free disk space or fix the folder's permissions, then resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json(out_dir / "latest.json", {"checkpoint": str(final.relative_to(out_dir)), "step": step})
    kept = checkpoint_dirs(out_dir)
    for old in kept[:-keep] if keep > 0 else []:
        if old != final:               # never the one latest.json names
            shutil.rmtree(old, ignore_errors=True)
    remove_stale(out_dir)              # temp dirs of a crashed writer
    return final


def latest_checkpoint(out_dir) -> Path | None:
    """The directory latest.json names, or None when out_dir has no checkpoint.

    FlashtuneError (one line, naming the file and the fix) when latest.json is corrupt, names a folder
    outside the run's checkpoints/ (e.g. an absolute path to another run's checkpoint), or names one that is
    missing.
    """
    pointer = Path(out_dir) / "latest.json"
    if not pointer.is_file():
        return None
    fix = f"delete {pointer} to start over, or restore it"
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        name = data["checkpoint"]
        if not isinstance(name, str) or not name:
            raise ValueError("'checkpoint' is not a path")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlashtuneError(f"{pointer} is corrupt ({type(exc).__name__}: {exc}); {fix}") from None
    root = (Path(out_dir) / "checkpoints").resolve()
    path = (Path(out_dir) / name)
    if os.path.isabs(name) or root not in path.resolve().parents:
        raise FlashtuneError(f"{pointer} points outside this run: {name!r} is outside the run folder's "
                             f"checkpoints/, and a run resumes only from its own; {fix}")
    if not (path / "state.json").is_file():
        raise FlashtuneError(f"{pointer} names {path}, which is missing or incomplete; delete {pointer} to "
                             f"start over, or restore the checkpoint directory")
    return path


def read_state(path) -> dict:
    """A checkpoint's state.json, checked to be a JSON object of this format; one-line FlashtuneError if not."""
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        # A sharded (torch.distributed.checkpoint) checkpoint keeps each rank's RNG state in files of its own.
        sharded = state.get("storage") == "dcp-safetensors"
        missing = [k for k in ("step", "param_groups", "scheduler", "scaler", "rng", "position", "log_acc")
                   if k not in state and not (sharded and k == "rng")]
        if missing:
            raise ValueError(f"no {missing[0]!r}")
    except (OSError, ValueError) as exc:
        raise FlashtuneError(f"{file} is corrupt ({type(exc).__name__}: {exc}); resume from an earlier "
                             f"checkpoint (point latest.json at it) or start over with overwrite") from None
    if state.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise FlashtuneError(f"{file} has checkpoint format {state.get('format')!r}; this flashtune reads "
                             f"format {FORMAT_VERSION}; start over with overwrite")
    return state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own types for missing, truncated or garbled files
        raise FlashtuneError(f"{file} is corrupt or missing ({type(exc).__name__}: {exc}); resume from an "
                             f"earlier checkpoint (point latest.json at it) or start over with overwrite") from None


def load_checkpoint(path, trainable: list, optimizer, scheduler, scaler, state: dict | None = None) -> dict:
    """Restore trainables, optimizer, scheduler, scaler and RNG states from `path`; return state.json.

    state: state.json as `read_state` returned it (None: read here). Every file is read and checked before
    anything is changed, so a refused checkpoint leaves the model and the optimizer as they were.
    """
    path = Path(path)
    state = read_state(path) if state is None else state
    weights = _load_tensors(path / "trainable.safetensors")
    opt_flat = _load_tensors(path / "optimizer.safetensors")
    rng = _load_tensors(path / "rng.safetensors")
    names = [n for n, _ in trainable]
    if set(weights) != set(names):
        missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise FlashtuneError(f"checkpoint {path} does not match the model's trainable parameters "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
                             f"model and adapter config, or use a new out_dir")
    for n, p in trainable:
        if weights[n].shape != p.shape:
            raise FlashtuneError(f"checkpoint {path}: {n} has shape {tuple(weights[n].shape)}, the model "
                                 f"{tuple(p.shape)}; resume with the same adapter config")
        if not weights[n].is_floating_point() or not bool(torch.isfinite(weights[n]).all()):
            raise FlashtuneError(f"checkpoint {path}: {n} is not finite floating point ({weights[n].dtype}); "
                                 f"resume from an earlier checkpoint or start over with overwrite")
    order = {n: i for i, n in _optimizer_indices(optimizer, trainable).items()}
    device = trainable[0][1].device
    try:
        opt_tensors = {k: v.to(device) if not k.endswith("/step") else v for k, v in opt_flat.items()}
        opt_state = _optimizer_from_flat(opt_tensors, state["param_groups"], order)
        old_opt = optimizer.state_dict()
        optimizer.load_state_dict(opt_state)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise FlashtuneError(f"checkpoint {path}: the optimizer state does not fit this model's trainable "
                             f"parameters ({type(exc).__name__}: {exc}); resume with the same adapter config, "
                             f"or start over with overwrite") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
        set_rng_state(rng, state["rng"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        optimizer.load_state_dict(old_opt)
        raise FlashtuneError(f"{path / 'state.json'} is corrupt ({type(exc).__name__}: {exc}); resume from an "
                             f"earlier checkpoint or start over with overwrite") from None
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(weights[n])
    return state
