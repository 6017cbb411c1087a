"""Drafters in the layouts serving engines load, and back.

Medusa heads (Cai et al., arXiv 2401.10774) in vLLM's Medusa draft-model layout
(vllm/model_executor/models/medusa.py): `config.json` with model_type "medusa", num_heads, num_hidden_layers
(ResBlocks per head), hidden_size, vocab_size, truncated_vocab_size, medusa_fc_bias; `model.safetensors` with
`blocks.{h}.layers.{l}.weight|bias` and `lm_heads.{h}.weight`. SGLang serves no Medusa drafter.

MTP modules (DeepSeek-V3, arXiv 2412.19437) under DeepSeek-V3's names. vLLM (deepseek_mtp.py) reads
`model.layers.{N+k}.{embed_tokens,enorm,hnorm,eh_proj,shared_head.norm,shared_head.head}` plus the decoder
block's own names under the same prefix, N = num_hidden_layers of the base, k < num_nextn_predict_layers = D.
SGLang (deepseek_nextn.py) reads a separate one-layer NextN model: the same names under `model.layers.0.`,
num_hidden_layers = num_nextn_predict_layers = 1 (so depth 1 only), and takes embed_tokens and
shared_head.head from the target. The engines build DeepSeek-V3 blocks (MLA attention, MoE) there;
our block is the base's own layer class, so the names and config conform but only a DeepSeek-V3 base would
run in those engines as is.

Each `config.json` also carries a "flashtune" entry (the drafter's own config: tree, recycle, ...) so that
`import_heads` restores drafts bit for bit. EAGLE-3 registers its writers here (`register_exporter("eagle3",
fmt)`, `register_importer`) from drafters/eagle/, in all three formats; `vllm-project/speculators` has no Medusa
format and its MTP format takes Qwen3-family layers only, so those two refuse "speculators".
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from flashtune.decoding.drafters.base import (base_dims, check_dims, decoder_layers, read_json, read_tensors)
from flashtune.errors import ConfigError, FlashtuneError, check_choice
from flashtune.fileio import atomic_save_safetensors, atomic_write_json

FORMATS = ("vllm", "sglang", "speculators")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

_EXPORTERS: dict[tuple[str, str], Callable] = {}  # (method, format) -> fn(drafter, out_dir, model) -> None
_IMPORTERS: list[Callable] = []  # fn(config dict, directory, model, device, dtype) -> drafter | None


def register_exporter(method: str, fmt: str):
    """Decorator: fn(drafter, out_dir: Path, model) writes `drafter` of `method` in `fmt` into out_dir."""
    check_choice("format", fmt, FORMATS)

    def deco(fn):
        _EXPORTERS[(method, fmt)] = fn
        return fn
    return deco


def register_importer(fn: Callable) -> Callable:
    """fn(config: dict, directory: Path, model, device, dtype) -> the drafter, or None if not its layout."""
    _IMPORTERS.append(fn)
    return fn


def method_of(drafter) -> str:
    config = getattr(drafter, "config", None)
    method = getattr(config, "METHOD", "")
    if not method:
        raise ConfigError(f"{type(drafter).__name__} is not a drafter flashtune can export")
    return method


def _plugins() -> None:
    """Drafters that register their layouts from their own folder (EAGLE-3)."""
    import flashtune.decoding.drafters.eagle.export  # noqa: F401


def check_exportable(method: str, fmt: str) -> Callable:
    """The writer of `method` for `fmt`, or one line saying which formats serve that method."""
    check_choice("format", fmt, FORMATS)
    _plugins()
    fn = _EXPORTERS.get((method, fmt))
    if fn is None:
        have = sorted(f for m, f in _EXPORTERS if m == method)
        if not have:
            raise ConfigError(f"{method} heads have no serving layout (vLLM, SGLang and speculators load no {method} "
                              f"drafter), so there is nothing to export; decode with them in flashtune (`flashtune "
                              f"generate --speculative {method} --heads DIR`), or train medusa, mtp or eagle3 heads "
                              f"to serve")
        raise ConfigError(f"{fmt} serves no {method} drafter in a layout flashtune writes; choose --format "
                          f"{' or '.join(have)}")
    return fn


def export_heads(drafter, out_dir, fmt: str, model=None) -> Path:
    """Write `drafter` (MedusaHeads, MTPModules, ...) for serving engine `fmt` into `out_dir`."""
    fn = check_exportable(method_of(drafter), fmt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fn(drafter, out, model)
    return out


def import_heads(directory, model=None, device=None, dtype=None):
    """Read a folder written by `export_heads` (or by another tool in the same layout) back as a drafter."""
    _plugins()
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise FlashtuneError(f"{d} has no {CONFIG}; point at a folder written by `flashtune export-heads`")
    config = read_json(d / CONFIG)
    if not isinstance(config, dict):
        raise FlashtuneError(f"{d / CONFIG} is not a JSON object; re-export the heads")
    for fn in _IMPORTERS:
        drafter = fn(config, d, model, device, dtype)
        if drafter is not None:
            return drafter
    raise FlashtuneError(f"{d / CONFIG} describes no drafter flashtune reads (model_type "
                         f"{config.get('model_type')!r}); expected Medusa (model_type 'medusa') or MTP "
                         "(num_nextn_predict_layers)")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    if not (d / WEIGHTS).is_file():
        raise FlashtuneError(f"{d} has no {WEIGHTS}; re-export the heads")
    return read_tensors(d / WEIGHTS)


def _write(out: Path, tensors: dict, config: dict) -> None:
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # shared tensors: one copy each
    atomic_save_safetensors(out / WEIGHTS, tensors, {"format": "pt"})
    atomic_write_json(out / CONFIG, config)


def _take(tensors: dict, name: str, shape: tuple, where: Path) -> torch.Tensor:
    if name not in tensors:
        raise FlashtuneError(f"{where} misses {name}; the file is damaged or for another layout")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise FlashtuneError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}; the heads "
                             "are for another model")
    return t


# ----------------------------------------------------------------------------------------------------------
# Medusa: vLLM's draft-model layout.

@register_exporter("medusa", "vllm")
def _medusa_vllm(heads, out: Path, model=None) -> None:
    c = heads.config
    t = {}
    for i, head in enumerate(heads.heads):
        for j, blk in enumerate(head.blocks):
            t[f"blocks.{i}.layers.{j}.weight"] = blk.linear.weight
            t[f"blocks.{i}.layers.{j}.bias"] = blk.linear.bias
        t[f"lm_heads.{i}.weight"] = head.out.weight
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": c.hidden_size,
              "vocab_size": c.vocab_size, "truncated_vocab_size": c.vocab_size, "num_heads": c.num_heads,
              "num_hidden_layers": c.num_layers, "medusa_fc_bias": True, "original_lm_head": False,
              "flashtune": c.to_dict()}
    _write(out, t, config)


@register_importer
def _medusa_import(config: dict, d: Path, model, device, dtype):
    if config.get("model_type") != "medusa":
        return None
    from flashtune.decoding.drafters.medusa import MedusaConfig, MedusaHeads

    if config.get("truncated_vocab_size", config.get("vocab_size")) != config.get("vocab_size"):
        raise FlashtuneError(f"{d / CONFIG}: a truncated vocabulary (token_map) is not supported; export the "
                             "heads over the full vocabulary")
    if not config.get("medusa_fc_bias", False):
        raise FlashtuneError(f"{d / CONFIG}: medusa_fc_bias=false (blocks without bias) is not supported")
    own = dict(config.get("flashtune") or {})
    try:
        own.update(hidden_size=config["hidden_size"], vocab_size=config["vocab_size"],
                   num_heads=config["num_heads"], num_layers=config["num_hidden_layers"])
    except KeyError as exc:
        raise FlashtuneError(f"{d / CONFIG} misses {exc.args[0]}; it is not a vLLM Medusa config") from None
    cfg = MedusaConfig.from_dict(own)
    if model is not None:
        check_dims(cfg.to_dict(), base_dims(model), f"the Medusa heads in {d}")
    tensors = _weights(d)
    heads = MedusaHeads(cfg)
    dim, vocab = cfg.hidden_size, cfg.vocab_size
    state = {}
    for i in range(cfg.num_heads):
        for j in range(cfg.num_layers):
            state[f"heads.{i}.blocks.{j}.linear.weight"] = _take(tensors, f"blocks.{i}.layers.{j}.weight",
                                                                 (dim, dim), d)
            state[f"heads.{i}.blocks.{j}.linear.bias"] = _take(tensors, f"blocks.{i}.layers.{j}.bias", (dim,), d)
        state[f"heads.{i}.out.weight"] = _take(tensors, f"lm_heads.{i}.weight", (vocab, dim), d)
    heads.load_state_dict(state)
    heads = heads.to(device=device, dtype=dtype)
    heads.set_tree(cfg.tree or None)
    return heads.eval()


# ----------------------------------------------------------------------------------------------------------
# MTP: DeepSeek-V3 names (vLLM deepseek_mtp.py, SGLang deepseek_nextn.py).

def _mtp_tensors(mtp) -> dict:
    """vLLM: the modules under DeepSeek-V3 names, with the shared embedding and output head written per layer
    as DeepSeek-V3's checkpoints do (vLLM loads the first layer's copy)."""
    t = mtp.deepseek_state_dict()
    first = mtp.config.num_base_layers
    for m in range(mtp.config.depth):
        t[f"model.layers.{first + m}.embed_tokens.weight"] = mtp.embed_tokens.weight
        t[f"model.layers.{first + m}.shared_head.head.weight"] = mtp.lm_head.weight
    return t


def _nextn_tensors(mtp) -> dict:
    """SGLang: the one module as layer 0 of a NextN model (embedding and head come from the target)."""
    if mtp.config.depth != 1:
        raise ConfigError(f"SGLang's NextN draft model holds one MTP module but these have depth="
                          f"{mtp.config.depth}; export them with --format vllm")
    prefix = f"model.layers.{mtp.config.num_base_layers}."
    return {"model.layers.0." + k[len(prefix):]: v for k, v in mtp.deepseek_state_dict().items()}


def _mtp_config(mtp, engine: str) -> dict:
    c = mtp.config
    base = mtp.base.config
    config = {"num_hidden_layers": c.num_base_layers if engine == "vllm" else 1, "num_nextn_predict_layers": c.depth,
              "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
              "rms_norm_eps": getattr(base, "rms_norm_eps", None) or getattr(base, "layer_norm_epsilon", 1e-6),
              "block_model_type": c.model_type, "flashtune": c.to_dict()}
    if engine == "vllm":  # what vLLM's speculative config turns a DeepSeek-V3 target's config into
        config.update(model_type="deepseek_mtp", architectures=["DeepSeekMTPModel"], n_predict=c.depth)
    else:  # SGLang's NextN draft model
        config.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLMNextN"])
    return config


@register_exporter("mtp", "vllm")
def _mtp_vllm(mtp, out: Path, model=None) -> None:
    _write(out, _mtp_tensors(mtp), _mtp_config(mtp, "vllm"))


@register_exporter("mtp", "sglang")
def _mtp_sglang(mtp, out: Path, model=None) -> None:
    _write(out, _nextn_tensors(mtp), _mtp_config(mtp, "sglang"))


@register_importer
def _mtp_import(config: dict, d: Path, model, device, dtype):
    if "num_nextn_predict_layers" not in config:
        return None
    from flashtune.decoding.drafters.mtp import MTPConfig, MTPModules

    if model is None:
        raise ConfigError(f"{d} holds MTP modules, which share the base model's embedding and head; pass the "
                          "base model (--model)")
    own = dict(config.get("flashtune") or {})
    nextn = "DeepseekV3ForCausalLMNextN" in (config.get("architectures") or [])  # SGLang: one layer, index 0
    try:
        own.update(depth=config["num_nextn_predict_layers"], hidden_size=config["hidden_size"],
                   vocab_size=config["vocab_size"])
        if not nextn:
            own["num_base_layers"] = config["num_hidden_layers"]
    except KeyError as exc:
        raise FlashtuneError(f"{d / CONFIG} misses {exc.args[0]}; it is not an MTP config") from None
    if nextn:
        own["num_base_layers"] = len(decoder_layers(model))
    first = 0 if nextn else own["num_base_layers"]
    cfg = MTPConfig.from_dict(own)
    check_dims(cfg.to_dict(), base_dims(model), f"the MTP modules in {d}")
    if cfg.num_base_layers != len(decoder_layers(model)):
        raise FlashtuneError(f"{d} was exported for a base of {cfg.num_base_layers} layers but this model has "
                             f"{len(decoder_layers(model))}; pass the base model the modules were trained for")
    tensors = _weights(d)
    for m in range(cfg.depth):  # the shared tensors must be the base's own
        for name, ref in (("embed_tokens", model.get_input_embeddings().weight),
                          ("shared_head.head", model.get_output_embeddings().weight)):
            key = f"model.layers.{first + m}.{name}.weight"
            if key in tensors and not torch.equal(tensors[key].to(ref.dtype), ref.detach().cpu()):
                raise FlashtuneError(f"{d / WEIGHTS}: {key} differs from the base model's; these modules were "
                                     "exported with another base (or a tuned one): pass that model")
    mtp = MTPModules(cfg, model, fresh=True)
    mtp.load_state_dict_deepseek(tensors, first_layer=first)
    return mtp.to(device=device, dtype=dtype) if (device or dtype) else mtp


# ----------------------------------------------------------------------------------------------------------
# flashtune's own heads folders (what `train-heads` writes).

def heads_files() -> dict[str, tuple[str, str]]:
    """method -> (config file, weights file) that `train-heads` writes for it."""
    from flashtune.decoding.drafters import medusa, mtp, parallel
    from flashtune.decoding.drafters.eagle import model as eagle_model

    return {m: (pkg.CONFIG_NAME, pkg.WEIGHTS_NAME)
            for m, pkg in (("medusa", medusa), ("mtp", mtp), ("parallel", parallel), ("eagle3", eagle_model))}


def saved_methods(directory) -> dict[str, list[str]]:
    """The methods whose heads files (config or weights) the folder holds -> those file names; {} if none."""
    d = Path(directory)
    found = {m: [f for f in names if (d / f).is_file()] for m, names in heads_files().items()}
    return {m: files for m, files in found.items() if files}


def check_one_method(directory, found: dict[str, list[str]] | None = None) -> None:
    """One line naming the methods and files when a heads folder holds files of more than one method (a folder
    trained into twice): which heads it means is ambiguous. `found`: `saved_methods(directory)` where the caller
    has it already (the folder is scanned otherwise)."""
    if found is None:
        found = saved_methods(directory)
    if len(found) > 1:
        shown = "; ".join(f"{m}: {', '.join(files)}" for m, files in found.items())
        raise FlashtuneError(f"{directory} holds heads of {len(found)} methods ({shown}); keep one method's files "
                             f"per folder: train each method into its own --out, or remove the other files")


def load_heads(directory, model=None, device=None, dtype=None):
    """The drafter saved in a `train-heads` folder, whichever method wrote it (MTP and parallel heads bind to
    `model`, so they need it)."""
    from flashtune.decoding.drafters import eagle, medusa, mtp, parallel
    from flashtune.decoding.drafters.eagle import model as eagle_model

    d = Path(directory)
    check_one_method(d)
    if (d / medusa.CONFIG_NAME).is_file():
        return medusa.MedusaHeads.load(d, device=device, dtype=dtype, model=model)
    if (d / eagle_model.CONFIG_NAME).is_file():
        if model is None:
            raise ConfigError(f"{d} holds an EAGLE-3 draft, which binds to its target model; pass it (--model)")
        return eagle.Eagle3Draft.load(d, model)
    for pkg, cls in ((mtp, mtp.MTPModules), (parallel, parallel.ParallelHeads)):
        if (d / pkg.CONFIG_NAME).is_file():
            if model is None:
                raise ConfigError(f"{d} holds {cls.__name__}, which bind to their base model; pass it (--model)")
            return cls.load(d, model)
    *names, last = (c for c, _ in heads_files().values())
    raise FlashtuneError(f"{d} holds no heads ({', '.join(names)} or {last}); train them with `flashtune "
                         "train-heads`")
