"""What every tuner shares: configs, target matching, layer wrapping, the registry and adapter bookkeeping.

A tuner never forks model code. It either replaces a submodule by a wrapper that keeps the original as
`base_layer` (LoRA, bottleneck adapters, `modules_to_save`) or registers hooks on the model (prefix-tuning).
Several adapters can live on one model: each wrapper keeps one entry per adapter name in `nn.ModuleDict`s,
and one shared `TunerState` (a plain object, not a module, so it never shows up in `state_dict`) says which
adapter is active and whether adapters are disabled.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn

from flashtune.errors import ConfigError, FlashtuneError

try:  # GPT-2's fused projection: a linear layer whose weight is stored transposed, [in, out].
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D)
_STATE_ATTR = "_flashtune_tuners"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass
class TunerConfig:
    """Fields every tuner config has. Subclasses validate their own fields in `__post_init__`."""

    peft_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (plus `peft_type`), which `from_dict` reads back."""
        out = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build a config from `to_dict()` output; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a table of fields, not {type(data).__name__}")
        data = dict(data)
        kind = data.pop("peft_type", cls.peft_type)
        if kind != cls.peft_type:
            raise ConfigError(f"peft_type={kind!r} does not match {cls.__name__} (expects {cls.peft_type!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    def to_peft_dict(self, model: nn.Module) -> dict[str, Any]:
        """The `adapter_config.json` content, with the fields Hugging Face PEFT needs to load the file."""
        out = self.to_dict()
        out.update(base_model_name_or_path=base_model_name(model), task_type=task_type(model),
                   inference_mode=True, revision=None)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]):
        """Read an `adapter_config.json` (ours or PEFT's); PEFT-only fields at neutral values are ignored."""
        raise NotImplementedError


def check_targets(field: str, value) -> None:
    """Validate a target_modules-like field: None, "all-linear", a regex string, or a list of names."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{field}={value!r} is not a valid regular expression ({exc})") from None
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{field}={value!r} must be a list of module-name suffixes, a regex string, "
                          f"or 'all-linear'")


def base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def task_type(model: nn.Module) -> str:
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


# ---------------------------------------------------------------------------------------------- registry
class Tuner:
    """One method's operations on a model. Subclasses are stateless; the model holds everything."""

    config_cls: ClassVar[type[TunerConfig]]
    mergeable: ClassVar[bool] = False
    cannot_merge_reason: ClassVar[str] = ""

    def inject(self, model: nn.Module, config: TunerConfig, name: str, state: "TunerState") -> None:
        raise NotImplementedError

    def remove(self, model: nn.Module, name: str, state: "TunerState") -> None:
        """Take adapter `name` off the model (the default handles wrappers; prefix overrides it)."""
        remove_from_wrappers(model, name)

    def adapter_state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter `name` (modules_to_save included), keyed as Hugging Face PEFT writes them."""
        out = dict(self.adapter_parameters(model, name))
        out.update(modules_to_save_state(model, name))
        return out

    def load_adapter_state_dict(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` (keys as `adapter_state_dict` gives them, already checked) into adapter `name`."""
        own = dict(self.adapter_parameters(model, name))
        own.update(modules_to_save_state(model, name))
        with torch.no_grad():
            for key, tensor in tensors.items():
                own[key].copy_(tensor.to(own[key].dtype))

    def adapter_parameters(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The live tensors behind `adapter_state_dict` (same keys), for loading into."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        return list(self.adapter_parameters(model, name).values())


_REGISTRY: dict[str, Tuner] = {}
_BY_CONFIG: dict[type, Tuner] = {}


def register_method(peft_type: str, tuner: Tuner, aliases: tuple[str, ...] = ()) -> None:
    """Register a tuner under the `peft_type` it writes into adapter_config.json (unique), plus other type
    names its files may carry (`aliases`)."""
    names = (peft_type, *aliases)
    if any(n in _REGISTRY for n in names) or tuner.config_cls in _BY_CONFIG:
        raise ValueError(f"tuner {peft_type!r} (or its config class) is already registered")
    for n in names:
        _REGISTRY[n] = tuner
    _BY_CONFIG[tuner.config_cls] = tuner


def tuner_for_config(config) -> Tuner:
    tuner = _BY_CONFIG.get(type(config))
    if tuner is None:
        known = ", ".join(t.config_cls.__name__ for t in _REGISTRY.values())
        raise ConfigError(f"{type(config).__name__} is not a tuner config; use one of {known}")
    return tuner


def tuner_for_type(peft_type: str) -> Tuner | None:
    return _REGISTRY.get(peft_type)


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


# ------------------------------------------------------------------------------------------------- state
class TunerState:
    """Which adapters a model carries, which one is active, and whether adapters are disabled."""

    def __init__(self) -> None:
        self.configs: dict[str, TunerConfig] = {}
        self.active: str | None = None
        self.disabled = False

    @property
    def live(self) -> str | None:
        """The adapter that forward passes use now (None when disabled or when none is attached)."""
        return None if self.disabled else self.active


def get_state(model: nn.Module, create: bool = False) -> TunerState | None:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None and create:
        state = TunerState()
        model.__dict__[_STATE_ATTR] = state
    return state


def require_state(model: nn.Module) -> TunerState:
    state = get_state(model)
    if state is None or not state.configs:
        raise FlashtuneError("this model has no adapters; attach one first with flashtune.attach(model, config)")
    return state


def resolve_name(model: nn.Module, adapter_name: str | None) -> str:
    state = require_state(model)
    name = adapter_name if adapter_name is not None else state.active
    if name is None:
        name = next(iter(state.configs))
    if name not in state.configs:
        raise FlashtuneError(f"no adapter named {name!r}; this model has {', '.join(map(repr, state.configs))}")
    return name


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"adapter_name={name!r} must be a Python identifier (letters, digits, underscores)")


# ---------------------------------------------------------------------------------------------- wrapping
class TunerLayer(nn.Module):
    """A wrapper around `base_layer` that holds per-adapter modules; subclasses define `forward`."""

    adapter_dicts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, state: TunerState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["_ft_state"] = state  # shared, not a submodule

    def live_adapter(self) -> str | None:
        name = self._ft_state.live
        return name if name is not None and self.has_adapter(name) else None

    def has_adapter(self, name: str) -> bool:
        return bool(self.adapter_dicts) and name in getattr(self, self.adapter_dicts[0])

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_dicts[0]).keys()) if self.adapter_dicts else []

    def delete_adapter(self, name: str) -> None:
        for attr in self.adapter_dicts:
            container = getattr(self, attr)
            if name in container:
                del container[name]

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}"


def hf_path(name: str) -> str:
    """The Hugging Face module path of a (possibly wrapped) module name: wrappers' `base_layer` dropped."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs that targets may match: wrappers count, their insides and tuner modules do not."""
    out, skip = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if name.split(".")[0] == "flashtune_prefix":
            continue
        out.append((name, module))
        if isinstance(module, TunerLayer):
            skip.append(name)
    return out


def unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, TunerLayer):
        module = module.base_layer
    return module


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if getter else None
    except (NotImplementedError, AttributeError):
        head = None
    return unwrap(head) if head is not None else None


def match_targets(model: nn.Module, targets, field: str = "target_modules") -> list[str]:
    """Names of modules that `targets` selects, in model order; raises ConfigError when none match.

    targets: a list of names (a module matches when its name equals one or ends with "." + it, as in PEFT),
    a regex string (full match on the module name), or "all-linear" (every nn.Linear / Conv1D except the
    output head).
    """
    candidates = candidate_modules(model)
    if targets == "all-linear":
        head = output_head(model)
        names = [n for n, m in candidates if isinstance(unwrap(m), LINEAR_TYPES) and unwrap(m) is not head]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        names = [n for n, _ in candidates if pattern.fullmatch(hf_path(n))]
    else:
        wanted = list(targets)
        names = [n for n, _ in candidates if any(hf_path(n) == t or hf_path(n).endswith("." + t) for t in wanted)]
    if not names:
        leaves = [hf_path(n) for n, m in candidates if isinstance(unwrap(m), LINEAR_TYPES)]
        leaves = leaves or [n for n, _ in candidates]
        shown = sorted({n.split(".")[-1] for n in leaves})[:8]
        example = ", ".join(leaves[:3])
        raise ConfigError(f"{field}={targets!r} matches no module of this model; module names end in "
                          f"{', '.join(shown)} (for example {example})")
    return names


def wrapper_layers(model: nn.Module) -> list[tuple[str, TunerLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TunerLayer)]


def remove_from_wrappers(model: nn.Module, adapter_name: str) -> None:
    """Delete `adapter_name` from every wrapper; wrappers left without adapters give back their base layer."""
    # Innermost first, so that an outer wrapper's `base_layer` is already final when it is unwrapped.
    for name, layer in sorted(wrapper_layers(model), key=lambda item: -item[0].count(".")):
        if adapter_name not in layer.adapter_names():
            continue
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names():
            set_submodule(model, name, layer.base_layer)


# ------------------------------------------------------------------------------------ modules_to_save
class ModulesToSave(TunerLayer):
    """Wraps a module (e.g. the LM head) that an adapter trains in full: one trainable copy per adapter."""

    adapter_dicts = ("copies",)

    def __init__(self, base_layer: nn.Module, state: TunerState) -> None:
        super().__init__(base_layer, state)
        self.copies = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        import copy

        original = unwrap(self.base_layer)
        clone = copy.deepcopy(original)
        # A deep copy of a tied head would still share nothing with the input embedding: that is the point.
        self.copies[name] = clone

    def forward(self, *args, **kwargs):
        name = self.live_adapter()
        return self.copies[name](*args, **kwargs) if name else self.base_layer(*args, **kwargs)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:  # e.g. `lm_head.weight` read by tied-weight code: the original's attribute
            return getattr(super().__getattr__("base_layer"), item)


def add_modules_to_save(model: nn.Module, names, adapter_name: str, state: TunerState) -> None:
    if not names:
        return
    for name in match_targets(model, list(names), field="modules_to_save"):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, state)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name)


def modules_to_save_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Live tensors of `adapter_name`'s full-module copies, keyed as PEFT saves them."""
    out = {}
    for name, layer in wrapper_layers(model):
        if isinstance(layer, ModulesToSave) and adapter_name in layer.copies:
            for pname, tensor in layer.copies[adapter_name].state_dict(keep_vars=True).items():
                out[f"base_model.model.{hf_path(name)}.{pname}"] = tensor
    return out


# ---------------------------------------------------------------------------------------- public verbs
def attach(model: nn.Module, config: TunerConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` described by `config` to `model` in place, make it active, and freeze
    everything else: afterwards exactly the adapter's parameters have `requires_grad=True`. Returns model."""
    check_adapter_name(adapter_name)
    tuner = tuner_for_config(config)
    state = get_state(model, create=True)
    if adapter_name in state.configs:
        raise ConfigError(f"adapter_name={adapter_name!r} is already attached; pick another name or "
                          f"delete_adapter(model, {adapter_name!r}) first")
    _check_not_merged(model, "attach another adapter")
    config = dataclasses.replace(config)  # the model keeps its own copy
    try:
        tuner.inject(model, config, adapter_name, state)
        add_modules_to_save(model, getattr(config, "modules_to_save", None), adapter_name, state)
    except Exception:
        tuner.remove(model, adapter_name, state)
        remove_from_wrappers(model, adapter_name)
        if not state.configs:
            model.__dict__.pop(_STATE_ATTR, None)
        raise
    state.configs[adapter_name] = config
    set_active_adapter(model, adapter_name)
    return model


def set_active_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the adapter that forward passes use, and the only one with trainable parameters."""
    name = resolve_name(model, adapter_name)
    state = require_state(model)
    if state.active != name:
        _check_not_merged(model, "switch adapters")
    state.active = name
    _set_trainable(model, name)


def _set_trainable(model: nn.Module, name: str) -> None:
    state = require_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    tuner = tuner_for_config(state.configs[name])
    for p in tuner.trainable_parameters(model, name):
        p.requires_grad_(True)
    for tensor in modules_to_save_state(model, name).values():
        tensor.requires_grad_(True)


class disable_adapters:
    """Context manager: inside it the model computes exactly what its base model computes."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.previous = False

    def __enter__(self):
        state = require_state(self.model)
        _check_not_merged(self.model, "disable adapters")
        self.previous = state.disabled
        state.disabled = True
        return self.model

    def __exit__(self, *exc) -> None:
        require_state(self.model).disabled = self.previous


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` (its layers and parameters); another adapter becomes active, if any."""
    name = resolve_name(model, adapter_name)
    state = require_state(model)
    if name in merged_adapters(model):
        raise FlashtuneError(f"adapter {name!r} is merged into the weights; unmerge_adapter(model) first")
    tuner_for_config(state.configs[name]).remove(model, name, state)
    remove_from_wrappers(model, name)
    del state.configs[name]
    if state.active == name:
        state.active = None
        if state.configs:
            set_active_adapter(model, next(iter(state.configs)))
    if not state.configs:
        model.__dict__.pop(_STATE_ATTR, None)


def merged_adapters(model: nn.Module) -> set[str]:
    out = set()
    for _, layer in wrapper_layers(model):
        out.update(getattr(layer, "merged", ()))
    return out


def _check_not_merged(model: nn.Module, action: str) -> None:
    merged = merged_adapters(model)
    if merged:
        raise FlashtuneError(f"cannot {action} while adapter(s) {sorted(merged)} are merged into the weights; "
                             f"call unmerge_adapter(model) first")


def _mergeable_tuner(model: nn.Module, name: str) -> Tuner:
    tuner = tuner_for_config(require_state(model).configs[name])
    if not tuner.mergeable:
        raise FlashtuneError(f"adapter {name!r} ({tuner.config_cls.__name__}) cannot be merged into the base "
                             f"weights: {tuner.cannot_merge_reason}")
    return tuner


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> None:
    """Add the active (or named) LoRA adapter's delta into the base weights; forward then skips the branch."""
    name = resolve_name(model, adapter_name)
    _mergeable_tuner(model, name)
    if require_state(model).active != name:
        raise FlashtuneError(f"adapter {name!r} is not active; set_active_adapter(model, {name!r}) first")
    if name in merged_adapters(model):
        return
    for _, layer in wrapper_layers(model):
        if hasattr(layer, "merge") and layer.has_adapter(name):
            layer.merge(name)


def unmerge_adapter(model: nn.Module) -> None:
    """Subtract every merged LoRA delta from the base weights again."""
    for _, layer in wrapper_layers(model):
        if hasattr(layer, "unmerge"):
            layer.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its Hugging Face names, with the active LoRA adapter's deltas (and
    `modules_to_save` copies) merged in; the model is untouched. Raises FlashtuneError for an active adapter
    that cannot merge (bottleneck adapters, prefixes)."""
    state = get_state(model)
    name = state.live if state is not None and state.configs else None
    if name is not None:
        _mergeable_tuner(model, name)
    out: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    for wname, layer in wrapper_layers(model):
        if name is not None and layer.has_adapter(name):
            if isinstance(layer, ModulesToSave):
                for pname, t in layer.copies[name].state_dict().items():
                    replaced[f"{hf_path(wname)}.{pname}"] = t.detach().clone()
            elif hasattr(layer, "merged_weight") and name not in layer.merged:
                base = unwrap(layer)
                replaced[f"{hf_path(wname)}.weight"] = layer.merged_weight(name, base.weight)
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if "flashtune_prefix" == parts[0] or any(p in _ADAPTER_KEY_PARTS for p in parts):
            continue
        hf_key = hf_path(key)
        out[hf_key] = replaced.get(hf_key, tensor.detach().clone())
    return out


_ADAPTER_KEY_PARTS = {"lora_A", "lora_B", "copies", "adapter_down", "adapter_up"}


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter and return the plain Hugging Face model. With merge=True the active LoRA adapter is
    merged into the weights first and its `modules_to_save` copies replace the originals (an active bottleneck
    or prefix adapter raises: it cannot merge). With merge=False the base model comes back as it was."""
    state = get_state(model)
    if state is None or not state.configs:
        return model
    active = state.active if merge else None
    if active is not None:
        merge_adapter(model, active)
    replacements = {hf_path(n): layer.copies[active] for n, layer in wrapper_layers(model)
                    if active is not None and isinstance(layer, ModulesToSave) and active in layer.copies}
    for _, layer in wrapper_layers(model):  # merged deltas stay in the weights; forget the bookkeeping
        if hasattr(layer, "merged"):
            layer.merged.clear()
    for adapter in list(state.configs):
        tuner_for_config(state.configs[adapter]).remove(model, adapter, state)
        remove_from_wrappers(model, adapter)
    for path, module in replacements.items():
        set_submodule(model, path, module)
    model.__dict__.pop(_STATE_ATTR, None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
