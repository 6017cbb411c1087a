"""LoRA: low-rank adapters on linear layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685; rank-stabilized scaling
from Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.

    h = W0 x + b + s * B A dropout(x),   A: [r, in], B: [out, r],   s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts kaiming-uniform (a = sqrt(5), as Hugging Face PEFT does), B at zero, so a fresh adapter is the
identity. Merging adds s * B A (transposed for GPT-2's Conv1D, whose weight is [in, out]) to W0, computed in
fp32; unmerging subtracts the same delta.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from flashtune.errors import AdapterLoadError, ConfigError, check_range
from flashtune.tuners.base import (Conv1D, TunerConfig, TunerLayer, Tuner, check_targets, hf_path, match_targets,
                                   model_type, set_submodule, unwrap, wrapper_layers)

# Defaults when target_modules is None: the attention projections the LoRA paper adapted.
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "mistral": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"]}


# PEFT features flashtune lacks, by the adapter_config.json field that turns them on: refusals name them.
UNSUPPORTED_FEATURES = {"use_bdlora": "BD-LoRA (block-diagonal LoRA factors)", "use_dora": "DoRA",
                        "ensure_weight_tying": "LoRA on tied embeddings / lm_head (ensure_weight_tying)",
                        "lora_bias": "a trained LoRA bias", "layer_replication": "layer replication",
                        "trainable_token_indices": "trainable token embeddings",
                        "target_parameters": "LoRA on parameters (target_parameters)", "use_qalora": "QA-LoRA",
                        "alora_invocation_tokens": "activated LoRA (aLoRA)",
                        "rank_pattern": "per-layer ranks (rank_pattern)", "alpha_pattern": "per-layer alphas"}


@dataclasses.dataclass
class LoraConfig(TunerConfig):
    """LoRA settings (defaults as in Hugging Face PEFT).

    r: rank (>= 1). lora_alpha: scale numerator (> 0); the branch is multiplied by lora_alpha / r, or by
    lora_alpha / sqrt(r) with use_rslora. lora_dropout: dropout on the branch input, in [0, 1).
    target_modules: list of module-name suffixes, a regex (full match), "all-linear" (every linear layer but
    the output head), or None for the architecture's default (q_proj/v_proj; c_attn on GPT-2).
    fan_in_fan_out: the target stores its weight as [in, out]; set automatically for GPT-2's Conv1D.
    modules_to_save: modules trained in full and saved with the adapter (e.g. ["lm_head"]).
    init_lora_weights: True for B = 0 (identity at start); False makes B random too (for tests).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: Any = None
    init_lora_weights: bool = True

    def __post_init__(self) -> None:
        check_range("r", self.r, 1, integer=True)
        check_range("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        check_targets("target_modules", self.target_modules)
        check_targets("modules_to_save", self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            raise ConfigError(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        for flag in ("use_rslora", "fan_in_fan_out", "init_lora_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} must be True or False")
        for name in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, model: nn.Module) -> dict[str, Any]:
        out = super().to_peft_dict(model)
        out.update(bias="none", use_dora=False, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                   layers_pattern=None, exclude_modules=None, lora_bias=False)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        # Fields PEFT writes that change the computation; anything else it writes is bookkeeping.
        neutral = {"bias": "none", "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
                   "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                   "lora_bias": False, "layer_replication": None, "trainable_token_indices": None,
                   "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None}
        neutral.update(use_bdlora=None, ensure_weight_tying=False)
        for key, value in neutral.items():
            if key in data and data[key] not in (value, None) and data[key] != {}:
                feature = UNSUPPORTED_FEATURES.get(key, key)
                raise AdapterLoadError(f"this LoRA adapter uses {feature}, which flashtune does not support "
                                       f"({key}={data[key]!r}; flashtune reads {key}={value!r}); load it with "
                                       f"peft instead")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if kwargs.get("init_lora_weights") not in (True, False):
            kwargs["init_lora_weights"] = True
        if isinstance(kwargs.get("target_modules"), (set, tuple)):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs)


class LoraLayer(TunerLayer):
    """Wraps an nn.Linear or Conv1D; one (A, B, dropout, scaling) per adapter name."""

    adapter_dicts = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module, state) -> None:
        super().__init__(base_layer, state)
        base = unwrap(base_layer)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape  # Conv1D weight: [in, out]
        else:
            self.out_features, self.in_features = base.weight.shape  # Linear weight: [out, in]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        weight = unwrap(self.base_layer).weight
        kw = {"device": weight.device, "dtype": torch.float32 if weight.dtype in (torch.float16, torch.bfloat16)
              else weight.dtype}
        a = nn.Linear(self.in_features, config.r, bias=False, **kw)  # weight [r, in]
        b = nn.Linear(config.r, self.out_features, bias=False, **kw)  # weight [out, r]
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        if config.init_lora_weights:
            nn.init.zeros_(b.weight)
        else:
            nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in fp32, laid out like the base weight ([out, in], or [in, out] for Conv1D)."""
        delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float() * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return (weight.detach().float() + self.delta_weight(name).to(weight.device)).to(weight.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        weight = unwrap(self.base_layer).weight
        weight.copy_(self.merged_weight(name, weight))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = unwrap(self.base_layer).weight
        while self.merged:
            name = self.merged.pop()
            weight.copy_((weight.float() - self.delta_weight(name).to(weight.device)).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.live_adapter()
        if name is None or self.merged:
            return result
        a = self.lora_A[name]
        x = x.to(a.weight.dtype)
        branch = self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]
        return result + branch.to(result.dtype)


class LoraTuner(Tuner):
    config_cls = LoraConfig
    mergeable = True

    def inject(self, model: nn.Module, config: LoraConfig, name: str, state) -> None:
        targets = config.target_modules
        if targets is None:
            kind = model_type(model)
            if kind not in DEFAULT_TARGETS:
                raise ConfigError(f"target_modules is required for model_type {kind!r} (defaults exist for "
                                  f"{', '.join(DEFAULT_TARGETS)}); e.g. target_modules='all-linear'")
            targets = config.target_modules = list(DEFAULT_TARGETS[kind])
        names = match_targets(model, targets)
        layers = []
        for path in names:
            module = model.get_submodule(path)
            # Descend through other methods' wrappers to the linear layer (or our own wrapper) inside.
            while not isinstance(module, LoraLayer) and isinstance(module, TunerLayer):
                path, module = path + ".base_layer", module.base_layer
            if not isinstance(module, (LoraLayer, nn.Linear, Conv1D)):
                raise ConfigError(f"target_modules={targets!r} selects {hf_path(path)} ({type(module).__name__}); "
                                  f"LoRA wraps only nn.Linear and Conv1D layers")
            layers.append((path, module))
        for path, module in layers:
            if not isinstance(module, LoraLayer):
                module = LoraLayer(module, state)
                set_submodule(model, path, module)
            if module.fan_in_fan_out:
                config.fan_in_fan_out = True
            module.add_adapter(name, config)

    def adapter_parameters(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in wrapper_layers(model):
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                key = f"base_model.model.{hf_path(path)}"
                out[f"{key}.lora_A.weight"] = layer.lora_A[name].weight
                out[f"{key}.lora_B.weight"] = layer.lora_B[name].weight
        return out
