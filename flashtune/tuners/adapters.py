"""Bottleneck adapters: Houlsby (after attention and after the FFN) and Pfeiffer (after the FFN only).

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751;
Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv:2005.00247.

Each adapter wraps a sublayer's output projection (the attention output projection, the FFN's second
linear) and adds a bottleneck to its output before the residual add:

    y = f(x);   y + W_up act(W_down y + b_down) + b_up,   W_down: [m, d], W_up: [d, m]

Weights start N(0, 1e-2) truncated at 2 sigma with zero biases (near identity), or with W_up = 0
(`init="identity"`, exactly the base model). A nonlinearity sits inside the branch, so adapters cannot be
merged into the base weights. Files use PEFT's layout under peft_type "BOTTLENECK" (see docs/tuners.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from flashtune.errors import ConfigError, check_choice, check_range
from flashtune.tuners.base import (TunerConfig, TunerLayer, Tuner, check_targets, hf_path, match_targets,
                                   model_type, set_submodule, unwrap, wrapper_layers)

# Per architecture: the attention-output and FFN-output submodules (name suffixes) the adapters wrap.
SITES = {
    "gpt2": (["attn.c_proj"], ["mlp.c_proj"]),
    "llama": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "qwen2": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "mistral": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "bart": (["self_attn.out_proj"], ["fc2"]),
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU}


@dataclasses.dataclass
class AdapterConfig(TunerConfig):
    """Bottleneck-adapter settings.

    adapter_type: "houlsby" (two per layer: attention output and FFN output) or "pfeiffer" (FFN output only).
    bottleneck_size: m, the width of the bottleneck (>= 1); Houlsby et al. used 8, 64 and 256.
    non_linearity: "relu", "gelu", "tanh" or "swish". init: "near_identity" (N(0, 1e-2) truncated at 2 sigma)
    or "identity" (W_up = 0). attn_modules / ffn_modules: name suffixes of the wrapped submodules; None picks
    the architecture's (gpt2, llama, qwen2, mistral, bart). modules_to_save: modules trained in full.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    adapter_type: str = "houlsby"
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    init: str = "near_identity"
    attn_modules: Any = None
    ffn_modules: Any = None
    modules_to_save: Any = None

    def __post_init__(self) -> None:
        check_choice("adapter_type", self.adapter_type, ("houlsby", "pfeiffer"))
        check_range("bottleneck_size", self.bottleneck_size, 1, integer=True)
        check_choice("non_linearity", self.non_linearity, tuple(ACTIVATIONS))
        check_choice("init", self.init, ("near_identity", "identity"))
        for name in ("attn_modules", "ffn_modules", "modules_to_save"):
            value = getattr(self, name)
            check_targets(name, value)
            if isinstance(value, str):
                raise ConfigError(f"{name}={value!r} must be a list of module-name suffixes")
            if isinstance(value, tuple):
                setattr(self, name, list(value))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


class BottleneckLayer(TunerLayer):
    """Wraps a sublayer's output module and adds one bottleneck per adapter name to its output."""

    adapter_dicts = ("adapter_down", "adapter_up", "adapter_act")

    def __init__(self, base_layer: nn.Module, state) -> None:
        super().__init__(base_layer, state)
        weight = unwrap(base_layer).weight
        # Linear weight [out, in]; GPT-2's Conv1D weight [in, out].
        self.features = weight.shape[1] if type(unwrap(base_layer)).__name__ == "Conv1D" else weight.shape[0]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        weight = unwrap(self.base_layer).weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        down = nn.Linear(self.features, config.bottleneck_size, device=weight.device, dtype=dtype)  # [m, d]
        up = nn.Linear(config.bottleneck_size, self.features, device=weight.device, dtype=dtype)  # [d, m]
        for lin in (down, up):
            nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(lin.bias)
        if config.init == "identity":
            nn.init.zeros_(up.weight)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.adapter_act[name] = ACTIVATIONS[config.non_linearity]()

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        name = self.live_adapter()
        if name is None:
            return out
        down = self.adapter_down[name]
        h = out.to(down.weight.dtype)  # [..., d]
        branch = self.adapter_up[name](self.adapter_act[name](down(h)))  # [..., m] -> [..., d]
        return out + branch.to(out.dtype)


class BottleneckTuner(Tuner):
    config_cls = AdapterConfig
    cannot_merge_reason = ("a bottleneck adapter applies a nonlinearity to the sublayer's output, so no change "
                           "of the base weights reproduces it; keep the adapter attached, or use LoRA to merge")

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, state) -> None:
        kind = model_type(model)
        attn, ffn = SITES.get(kind, (None, None))
        attn = config.attn_modules or attn
        ffn = config.ffn_modules or ffn
        if ffn is None or (config.adapter_type == "houlsby" and attn is None):
            raise ConfigError(f"model_type {kind!r} has no known adapter sites; pass ffn_modules=[...] (and "
                              f"attn_modules=[...] for houlsby) naming the sublayers' output projections")
        config.ffn_modules = list(ffn)
        groups = [("ffn_modules", ffn)]
        if config.adapter_type == "houlsby":
            config.attn_modules = list(attn)
            groups.insert(0, ("attn_modules", attn))
        else:
            config.attn_modules = None
        paths = []
        for field, targets in groups:
            paths += match_targets(model, list(targets), field=field)
        for path in sorted(set(paths), key=paths.index):
            module = model.get_submodule(path)
            if not isinstance(module, BottleneckLayer):
                module = BottleneckLayer(module, state)
                set_submodule(model, path, module)
            module.add_adapter(name, config)

    def adapter_parameters(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in wrapper_layers(model):
            if isinstance(layer, BottleneckLayer) and name in layer.adapter_down:
                key = f"base_model.model.{hf_path(path)}"
                for part in ("adapter_down", "adapter_up"):
                    lin = getattr(layer, part)[name]
                    out[f"{key}.{part}.weight"] = lin.weight
                    out[f"{key}.{part}.bias"] = lin.bias
        return out
