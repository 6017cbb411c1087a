"""Saving and loading adapters in Hugging Face PEFT's on-disk format.

A directory holds `adapter_config.json` (the config, with `peft_type` naming the method) and
`adapter_model.safetensors` (tensors keyed as PEFT writes them, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, or `prompt_embeddings` for a prefix).
Files are written atomically; nothing is unpickled. A load that fails leaves the model as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from flashtune.errors import AdapterLoadError, ConfigError, FlashtuneError
from flashtune.fileio import atomic_write
from flashtune.tuners.base import (TunerConfig, attach, delete_adapter, get_state, registered_types, resolve_name,
                                   tuner_for_config, tuner_for_type)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the active one) to `directory` in PEFT's format; returns the path.

    Refuses (FlashtuneError, nothing written) an adapter whose weights are not finite, and a directory that
    cannot be created or written (read-only, or a regular file on the way).
    """
    from safetensors.torch import save_file

    name = resolve_name(model, adapter_name)
    config = get_state(model).configs[name]
    tuner = tuner_for_config(config)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tuner.adapter_state_dict(model, name).items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FlashtuneError(f"adapter {name!r} has non-finite weights (NaN or inf) in {key}; it was not "
                                 f"saved; train again with a lower learning rate")
    text = json.dumps(config.to_peft_dict(model), indent=2, sort_keys=True) + "\n"
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    except (FileExistsError, NotADirectoryError) as exc:
        raise FlashtuneError(f"cannot save the adapter to {str(directory)!r}: {exc.filename or directory} is a "
                             f"file, not a folder; choose another folder") from None
    except PermissionError as exc:
        raise FlashtuneError(f"cannot save the adapter to {str(directory)!r}: no permission to write "
                             f"{exc.filename or directory}; choose a writable folder") from None
    except OSError as exc:
        raise FlashtuneError(f"cannot save the adapter to {str(directory)!r}: {exc.strerror or exc}; "
                             f"choose another folder") from None
    return directory


def read_adapter_config(directory: str | os.PathLike) -> TunerConfig:
    """The config stored in `directory`, as a flashtune config object; AdapterLoadError if absent or corrupt."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        where = "it does not exist" if not Path(directory).exists() else f"it has no {CONFIG_NAME}"
        raise AdapterLoadError(f"cannot load an adapter from {str(directory)!r}: {where}")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{path} is corrupt ({exc}); save the adapter again") from None
    kind = data.get("peft_type")
    tuner = tuner_for_type(kind)
    if tuner is None:
        raise AdapterLoadError(f"{path} has peft_type={kind!r}; flashtune reads {', '.join(registered_types())}")
    try:
        return tuner.config_cls.from_peft_dict(data)
    except (ConfigError, AdapterLoadError) as exc:
        raise AdapterLoadError(f"{path}: {exc}") from None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        hint = " (adapter_model.bin is not read: flashtune loads safetensors only)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise AdapterLoadError(f"{path} is corrupt ({type(exc).__name__}: {exc}); save the adapter again") from None


def _check_fits(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str, base: str | None):
    made_for = f" (it was made for {base})" if base else ""
    for key, tensor in expected.items():
        if key not in found:
            raise AdapterLoadError(f"{source} does not fit this model{made_for}: it lacks {key}")
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise AdapterLoadError(f"{source} was made for another base model{made_for}: {key} has shape "
                                   f"{tuple(found[key].shape)} in the file but {tuple(tensor.shape)} here")
    extra = [k for k in found if k not in expected]
    if extra:
        raise AdapterLoadError(f"{source} does not fit this model{made_for}: this model has no place for {extra[0]}")


def _check_contents(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse, naming the feature or the tensor, files flashtune cannot apply: PEFT features it lacks (found
    by their tensor names), non-float tensors and non-finite values."""
    for key in tensors:
        if "lora_embedding_" in key:
            raise AdapterLoadError(f"{source} holds a LoRA on an embedding layer ({key}), which flashtune does "
                                   f"not support; load it with peft, or train the LoRA on linear layers only")
    for key in tensors:
        if ".base_layer." in key:
            tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
            what = "a LoRA on a tied lm_head" if tied and "lm_head" in key else "a LoRA on an embedding layer"
            raise AdapterLoadError(f"{source} holds full base weights ({key}), which PEFT saves for {what}; "
                                   f"flashtune does not support that; load it with peft")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise AdapterLoadError(f"{source / WEIGHTS_NAME}: {key} has dtype {dtype}; adapter weights are "
                                   f"floating point; save the adapter again")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterLoadError(f"{source / WEIGHTS_NAME}: {key} holds NaN or inf values; the adapter is "
                                   f"broken (train it again with a lower learning rate)")


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in `directory` (by flashtune or by PEFT) as `adapter_name` and make it active.

    is_trainable=False (inference) leaves no parameter trainable; True makes the adapter's parameters
    trainable. Raises AdapterLoadError for missing, corrupt or mismatched files; the model is then unchanged.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = _read_tensors(directory)
    _check_contents(model, tensors, directory)       # before anything on the model changes
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ConfigError(f"adapter_name={adapter_name!r} is already attached; pick another name")
    saved = {
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": state.active if state else None,
        "disabled": state.disabled if state else False,
    }
    base = json.loads((directory / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    try:
        try:
            attach(model, config, adapter_name)
        except ConfigError as exc:
            raise AdapterLoadError(f"{directory} does not fit this model: {exc}") from None
        try:
            tuner = tuner_for_config(config)
            _check_fits(tuner.adapter_state_dict(model, adapter_name), tensors, str(directory), base)
            tuner.load_adapter_state_dict(model, adapter_name, tensors)
        except FlashtuneError:
            delete_adapter(model, adapter_name)
            raise
    except FlashtuneError:
        state = get_state(model)
        if state is not None:
            state.active, state.disabled = saved["active"], saved["disabled"]
        for n, p in model.named_parameters():
            p.requires_grad_(saved["grad"].get(n, False))
        raise
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()        # as PEFT's from_pretrained: the new dropout modules must not stay in train mode
    return model
