"""EAGLE-3 drafts in the `LlamaForCausalLMEagle3` layout that vLLM and SGLang load (EAGLE-3, arXiv 2503.01840).

Folder: `config.json` + `model.safetensors`. Tensors: `fc.weight` [H, 3H], `midlayer.{input_layernorm,
hidden_norm,post_attention_layernorm}.weight`, `midlayer.self_attn.{q,k,v}_proj.weight` [*, 2H],
`midlayer.self_attn.o_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`, `lm_head.weight`
[draft vocab, H], `d2t` (draft id j -> target id j + d2t[j]) and `t2d` (bool over the target vocabulary). No
embedding: both engines share the target's.

The aux layer ids are written per engine because the two count them one layer apart: vLLM's
`eagle_aux_hidden_state_layer_ids` (top level) name the layers whose *input* is captured, which is flashtune's
convention (`Eagle3Config.aux_layers`); SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids` name the
layers whose *output* is captured (it adds 1 to each before capturing the next layer's input), so they are
flashtune's ids minus one.

The third layout is vLLM's `speculators` format (vllm-project/speculators, `Eagle3SpeculatorConfig`): the
config names `speculators_model_type: "eagle3"`, the decoder layer's own config (`transformer_layer_config`,
a Llama config of one layer), the draft vocabulary, `norm_before_residual: false` (the residual is fc's
output before `hidden_norm`, as here), the aux ids in vLLM's convention and a `speculators_config` with the
verifier and a greedy proposal of `speculative_tokens`; the layer's tensors are named `layers.0.*` instead of
`midlayer.*`. `import_eagle3` reads all three back into an `Eagle3Draft`.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashtune.decoding.drafters.eagle.model import Eagle3Config, Eagle3Draft, default_aux_layers
from flashtune.errors import FlashtuneError, check_choice
from flashtune.fileio import atomic_save_safetensors, atomic_write_json

ENGINES = ("vllm", "sglang", "speculators")
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose reader the conformance test runs


def served_config(config: Eagle3Config, engine: str, dtype: str = "bfloat16") -> dict:
    """config.json of the draft for `engine` ("vllm" or "sglang")."""
    check_choice("engine", engine, ENGINES)
    out = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
           "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
           "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
           "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "hidden_act": config.hidden_act,
           "vocab_size": config.vocab_size, "draft_vocab_size": config.draft_vocab_size,
           "target_hidden_size": config.hidden_size, "max_position_embeddings": config.max_position_embeddings,
           "rope_theta": config.rope_theta, "tie_word_embeddings": False, "torch_dtype": dtype,
           "flashtune": {"aux_layers_input_of": list(config.aux_layers), "engine": engine,
                         "num_target_layers": config.num_target_layers, "target_model_type": config.model_type}}
    if engine == "vllm":
        out["eagle_aux_hidden_state_layer_ids"] = list(config.aux_layers)
    else:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in config.aux_layers],
                               "use_aux_hidden_state": True}
    return out


def speculators_config(config: Eagle3Config, dtype: str = "bfloat16", verifier: str | None = None,
                       speculative_tokens: int = 5) -> dict:
    """config.json of the draft in the speculators format (`Eagle3SpeculatorConfig`)."""
    layer = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": config.hidden_size,
             "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
             "rms_norm_eps": config.rms_norm_eps, "hidden_act": config.hidden_act, "vocab_size": config.vocab_size,
             "max_position_embeddings": config.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
             "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "speculators_version": SPECULATORS_VERSION, "transformer_layer_config": layer,
            "draft_vocab_size": config.draft_vocab_size, "norm_before_residual": False,
            "target_hidden_size": config.hidden_size, "eagle_aux_hidden_state_layer_ids": list(config.aux_layers),
            "torch_dtype": dtype,
            "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                   "proposal_methods": [{"proposal_type": "greedy",
                                                         "speculative_tokens": speculative_tokens}],
                                   "verifier": {"name_or_path": verifier,
                                                "architectures": ["LlamaForCausalLM"]}},
            "flashtune": {"aux_layers_input_of": list(config.aux_layers), "engine": "speculators",
                          "num_target_layers": config.num_target_layers, "target_model_type": config.model_type}}


def _verifier_name(model) -> str | None:
    """The target's Hub id or folder, as speculators records its verifier (None when it has neither)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") if model is not None else ""
    return name or None


def export_eagle3(draft: Eagle3Draft, directory, engine: str = "vllm", dtype: str = "bfloat16",
                  model=None) -> Path:
    """Write `draft` as a folder for `engine`: `LlamaForCausalLMEagle3` (vllm, sglang) or the speculators
    format (weights cast to `dtype`; `model`, the target, names the verifier there)."""
    import torch

    check_choice("engine", engine, ENGINES)
    if engine == "speculators":
        cfg = speculators_config(draft.config, dtype, _verifier_name(model))
    else:
        cfg = served_config(draft.config, engine, dtype)
    if engine == "sglang" and min(draft.config.aux_layers) < 1:
        raise FlashtuneError("SGLang names aux layers by the layer before them; aux layer 0 (the embeddings) has "
                             "none: train the draft with aux layers >= 1")
    tensors = draft.served_state_dict()
    if engine == "speculators":  # the layer is the first of `layers` there: midlayer.* -> layers.0.*
        tensors = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
                   for k, v in tensors.items()}
    cast = getattr(torch, dtype)
    tensors = {k: (v.to(cast) if v.is_floating_point() else v) for k, v in tensors.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    atomic_write_json(directory / "config.json", cfg)
    return directory


def import_eagle3(directory, model) -> Eagle3Draft:
    """An `Eagle3Draft` bound to `model` from a `LlamaForCausalLMEagle3` folder written for vLLM or SGLang."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FlashtuneError(f"{directory} is not an EAGLE-3 folder (config.json + model.safetensors)")
    c = json.loads((directory / "config.json").read_text())
    speculators = c.get("speculators_model_type") == "eagle3"
    if speculators:  # the layer's shape lives in its own config there
        c = {**c["transformer_layer_config"], "draft_vocab_size": c["draft_vocab_size"],
             "eagle_aux_hidden_state_layer_ids": c.get("eagle_aux_hidden_state_layer_ids")
             or list(default_aux_layers(model.config.num_hidden_layers))}
        c["rope_theta"] = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    elif "LlamaForCausalLMEagle3" not in c.get("architectures", []):
        raise FlashtuneError(f"{directory}/config.json is neither a LlamaForCausalLMEagle3 nor a speculators "
                             f"EAGLE-3 config")
    if "eagle_aux_hidden_state_layer_ids" in c:
        aux = list(c["eagle_aux_hidden_state_layer_ids"])
    elif "eagle_config" in c:
        aux = [i + 1 for i in c["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    else:
        aux = None
    n = model.config.num_hidden_layers
    config = Eagle3Config(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                          c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                          c["rms_norm_eps"], c["vocab_size"], c["draft_vocab_size"],
                          aux if aux is not None else list(default_aux_layers(n)), n, model.config.model_type,
                          c.get("hidden_act", "silu"), float(c.get("rope_theta", 10000.0)),
                          c.get("max_position_embeddings", 2048))
    tensors = load_file(str(directory / "model.safetensors"))
    if speculators:
        tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                   for k, v in tensors.items()}
    if "t2d" not in tensors and "d2t" in tensors:  # t2d is optional in the served layout: rebuild it
        import torch

        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[torch.arange(len(tensors["d2t"])) + tensors["d2t"]] = True
        tensors["t2d"] = t2d
    return Eagle3Draft.from_tensors(config, tensors, model, directory / "model.safetensors")


# `flashtune export-heads` / `export_heads`: the serving-layout registry of drafters/export.py.
def _register() -> None:
    from flashtune.decoding.drafters import export as registry

    for fmt in ENGINES:
        registry.register_exporter("eagle3", fmt)(
            lambda draft, out, model=None, _fmt=fmt: export_eagle3(draft, out, _fmt, model=model))

    @registry.register_importer
    def _import(config: dict, d: Path, model, device, dtype):
        if ("LlamaForCausalLMEagle3" not in config.get("architectures", [])
                and config.get("speculators_model_type") != "eagle3"):
            return None
        if model is None:
            raise FlashtuneError(f"{d} holds an EAGLE-3 draft, which binds to its target model; pass it (--model)")
        return import_eagle3(d, model)


_register()
