"""PEFT tuners: LoRA, bottleneck adapters and prefix-tuning, in Hugging Face PEFT's file format.

    model = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))   # in place; returns model
    save_adapter(model, "out/")                                                    # PEFT's format
    load_adapter(model, "out/", adapter_name="default", is_trainable=False)
"""

from flashtune.tuners.base import (attach, delete_adapter, disable_adapters, merge_adapter, merged_state_dict,
                                   register_method, set_active_adapter, unload, unmerge_adapter)
from flashtune.tuners.io import load_adapter, read_adapter_config, save_adapter
from flashtune.tuners.adapters import AdapterConfig, BottleneckTuner
from flashtune.tuners.lora import LoraConfig, LoraTuner
from flashtune.tuners.prefix import SEQ2SEQ_TYPE, PrefixConfig, PrefixTuner, materialize_prefix, prefix_key_values

register_method("LORA", LoraTuner())
register_method("BOTTLENECK", BottleneckTuner())
register_method("PREFIX_TUNING", PrefixTuner(), aliases=(SEQ2SEQ_TYPE,))

__all__ = ["LoraConfig", "AdapterConfig", "PrefixConfig", "prefix_key_values", "materialize_prefix", "attach", "save_adapter", "load_adapter", "set_active_adapter",
           "disable_adapters", "delete_adapter", "merge_adapter", "unmerge_adapter", "unload", "merged_state_dict",
           "read_adapter_config"]
