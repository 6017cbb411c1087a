"""flashtune: cheap adaptation and fast inference for transformer language models.

The public surface is small; each name is imported on first use so that `import flashtune` stays light
(the GUI-agent runtime, for one, needs no torch).

    model, tok = flashtune.load_base_model()                      # the embedded SmolLM2-135M-Instruct
    model = flashtune.attach(model, flashtune.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    flashtune.save_adapter(model, "out/")                          # Hugging Face PEFT's format
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_base_model": "flashtune.models",
    "LoraConfig": "flashtune.tuners",
    "AdapterConfig": "flashtune.tuners",
    "PrefixConfig": "flashtune.tuners",
    "attach": "flashtune.tuners",
    "save_adapter": "flashtune.tuners",
    "load_adapter": "flashtune.tuners",
    "flash_attention": "flashtune.attention",
    "TrainConfig": "flashtune.training",
    "fit": "flashtune.training",
    "Engine": "flashtune.decoding",
    "MedusaHeads": "flashtune.decoding",
    "MTPModules": "flashtune.decoding.drafters.mtp",
    "MTPDrafter": "flashtune.decoding.drafters.mtp",
    "disable_adapters": "flashtune.tuners",
    "merge_adapter": "flashtune.tuners",
    "unload": "flashtune.tuners",
    "load_e2e_csv": "flashtune.data",
    "generate_e2e_style": "flashtune.data",
    "evaluate_generation": "flashtune.evaluation",
    "FlashtuneError": "flashtune.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flashtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
