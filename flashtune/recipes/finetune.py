"""The finetune recipe: one typed config (`FinetuneConfig`) and one function (`run_finetune`).

    cfg = load_config("flashtune/configs/e2e_lora.toml", ["train.lr=1e-3"])
    result = run_finetune(cfg, device="cuda")        # adapter/, metrics.jsonl, report/ under cfg.out_dir

Sections: `[model]` (name, dtype), `[data]` (task "e2e" | "synthetic" | "text", path, sizes), `[method]`
(name "lora" | "prefix" | "houlsby" | "pfeiffer" plus that tuner's config fields), `[train]` (the fields of
`flashtune.training.TrainConfig`), `[eval]` (generation settings). The run folder gets checkpoints/,
metrics.jsonl, `finetune.json` (the resolved config), `adapter/` (PEFT format) and `report/`.

Device defaults (`resolve_runtime`): on a GPU the recipe runs the fast path bench/train.py measures (bf16
autocast over a bf16 base, fused LoRA, chunked cross-entropy; torch.compile off, see FAST_CUDA); on the CPU
fp32. `flashtune eval` and `flashtune demo` build on this module: recipes/evaluate.py, recipes/demo.py.
A field the config sets is never changed. Runs are reproducible: the same config and seed give the same
adapter, because the seed is set before the adapter is initialised.

Run folders are owned: nothing in an existing run is written until the run is known to start (fresh, resume
with the same hyper-parameters, or overwrite); see `check_run_folder`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

from flashtune.errors import ConfigError, FlashtuneError, check_bool, check_choice, check_range
from flashtune.fileio import output_dir

TASKS = ("e2e", "synthetic", "text", "file")
FORMATS = ("", "messages", "prompt_completion", "text", "e2e")   # "": detected from the columns
METHODS = ("lora", "prefix", "houlsby", "pfeiffer")
# Defaults per method, overridden by the [method] section's other keys.
METHOD_DEFAULTS = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "prefix": {"num_virtual_tokens": 10},
    "houlsby": {"bottleneck_size": 64},
    "pfeiffer": {"bottleneck_size": 64},
}
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
# What a run folder holds; any of these marks the folder as an existing run.
RUN_FILES = ("finetune.json", "latest.json", "checkpoints", "metrics.jsonl", "adapter", "report")
# The GPU fast path. torch.compile stays off: with fine-tuning data of varying lengths it recompiles per shape,
# and `flashtune finetune` on E2E ran at 0.37x TRL's tokens/s compiled against 1.27x without (120 steps,
# bench/results/finetune-h200.json); `train.compile=true` pays on long runs of fixed-length blocks.
FAST_CUDA = {"fused_lora": True, "ce_chunk_size": 4096, "compile": False}
PLAIN = {"fused_lora": False, "ce_chunk_size": 0, "compile": False}        # the reference path (--no-fast)


@dataclasses.dataclass
class ModelSection:
    name: str = ""                 # "" = the default SmolLM2-135M-Instruct; else a local path or HF id
    dtype: str = "auto"            # the frozen base's dtype; "auto": the training precision's on a GPU, else fp32

    def __post_init__(self):
        check_choice("dtype", self.dtype, MODEL_DTYPES)


@dataclasses.dataclass
class DataSection:
    task: str = "synthetic"        # "file" (any data file), "e2e" (csv), "synthetic" (generated E2E-style),
                                   # "text" (plain-text file); a path with the default task means "file"
    path: str = ""                 # file: .jsonl/.json/.csv/.tsv/.parquet/.txt or a Hub dataset name;
                                   # e2e: csv ("" = $FLASHTUNE_E2E_DATA or ../shared/data/e2e/); text: a file
    format: str = ""               # file: "messages" | "prompt_completion" | "text" | "e2e" ("" = detect)
    pack: bool = False             # pack short examples into full rows (attention stays inside each example)
    num_examples: int = 1000       # synthetic: distinct MRs generated
    max_inputs: int = 0            # e2e/synthetic: keep the first N distinct MRs (0 = all)
    val_size: float = 100          # distinct MRs held out (a count, or a fraction in (0, 1))
    max_length: int = 256          # tokens per training example
    refs: str = "all"              # "all": one example per reference; "first": one per MR
    block_size: int = 128          # text: tokens per packed block
    seed: int = 0                  # the validation split (and synthetic data) seed

    def __post_init__(self):
        if self.task == "synthetic" and self.path:
            self.task = "file"     # `--data my.jsonl` on the default config: the file is the data
        check_choice("task", self.task, TASKS)
        check_choice("format", self.format, FORMATS)
        check_bool("pack", self.pack)
        if self.task == "file" and not self.path:
            raise ConfigError("path='' is not allowed with task='file'; set data.path (--data) to a data file")
        check_choice("refs", self.refs, ("all", "first"))
        check_range("num_examples", self.num_examples, 2, 100_000, integer=True)
        check_range("max_inputs", self.max_inputs, 0, integer=True)
        check_range("val_size", self.val_size, 0, low_open=True)
        check_range("max_length", self.max_length, 8, integer=True)
        check_range("block_size", self.block_size, 2, integer=True)
        check_range("seed", self.seed, 0, integer=True)
        if self.task == "text" and not self.path:
            raise ConfigError("path='' is not allowed with task='text'; set data.path to a text file")


@dataclasses.dataclass
class EvalSection:
    num_beams: int = 1             # 1 = greedy
    max_new_tokens: int = 64
    batch_size: int = 16
    max_inputs: int = 0            # evaluate the first N validation MRs (0 = all)
    samples: int = 5               # samples shown in the summary

    def __post_init__(self):
        for name, low in (("num_beams", 1), ("max_new_tokens", 1), ("batch_size", 1), ("max_inputs", 0),
                          ("samples", 0)):
            check_range(name, getattr(self, name), low, integer=True)


@dataclasses.dataclass
class FinetuneConfig:
    out_dir: str = "runs/finetune"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    method: dict = dataclasses.field(default_factory=lambda: {"name": "lora"})
    train: dict = dataclasses.field(default_factory=dict)   # TrainConfig fields except out_dir
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def __post_init__(self):
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(f"out_dir={self.out_dir!r} must be a directory path")
        method = dict(self.method)
        check_choice("method.name", method.get("name", "lora"), METHODS)
        self.tuner_config()                 # validates the method's fields
        self.train_config()                 # validates the training fields

    def tuner_config(self):
        """The flashtune.tuners config object for [method]."""
        opts = dict(self.method)
        name = opts.pop("name", "lora")
        return build_tuner_config(name, opts)

    def train_config(self, **extra):
        from flashtune.training import TrainConfig

        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"out_dir"}
        bad = sorted(set(self.train) - fields)
        if bad:
            raise ConfigError(f"unknown field 'train.{bad[0]}'; allowed: {', '.join(sorted(fields))}")
        return _construct(TrainConfig, {"out_dir": self.out_dir, **self.train, **extra}, "train")

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "model": dataclasses.asdict(self.model),
                "data": dataclasses.asdict(self.data), "method": dict(self.method), "train": dict(self.train),
                "eval": dataclasses.asdict(self.eval)}

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        allowed = ("out_dir", "model", "data", "method", "train", "eval")
        for key in data:
            if key not in allowed:
                raise ConfigError(f"unknown section {key!r}; allowed: {', '.join(allowed)}")
        kwargs: dict[str, Any] = {}
        if "out_dir" in data:
            kwargs["out_dir"] = data["out_dir"]
        for key, section in (("model", ModelSection), ("data", DataSection), ("eval", EvalSection)):
            if key in data:
                kwargs[key] = _section(section, data[key], key)
        for key in ("method", "train"):
            if key in data:
                if not isinstance(data[key], dict):
                    raise ConfigError(f"[{key}] must be a table of fields")
                kwargs[key] = dict(data[key])
        return cls(**kwargs)


def _construct(cls, data: dict, section: str, context: str = ""):
    """cls(**data) with unknown fields refused and errors prefixed by the section (`train.lr=...`); the value
    checks themselves (finite numbers, ranges) are the config class's own."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown field '{section}.{key}'{context}; allowed: {', '.join(fields)}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{section}.{exc}") from None


def _section(cls, data, name):
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table of fields")
    return _construct(cls, data, name)


def build_tuner_config(method: str, options: dict | None = None):
    """A flashtune.tuners config for `method` ("lora" | "prefix" | "houlsby" | "pfeiffer") with `options`."""
    check_choice("method.name", method, METHODS)
    import flashtune.tuners as tuners

    opts = {**METHOD_DEFAULTS[method], **(options or {})}
    if method == "lora":
        cls = tuners.LoraConfig
    elif method == "prefix":
        cls = tuners.PrefixConfig
    else:
        cls = tuners.AdapterConfig
        if opts.setdefault("adapter_type", method) != method:
            raise ConfigError(f"method.adapter_type={opts['adapter_type']!r} contradicts method.name={method!r}")
    return _construct(cls, opts, "method", f" for method {method!r}")


# ------------------------------------------------------------------------------------------ config input
def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.lr=1e-4"` -> (["train", "lr"], 1e-4); the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.field=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".") if p.strip()]
    if not path:
        raise ConfigError(f"--set {text!r} names no field")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def read_toml(path) -> dict:
    """A TOML file as a dict; a missing, unreadable, non-UTF-8 or invalid file is one ConfigError line."""
    p = Path(path)
    if not p.is_file():
        why = "is a folder" if p.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(p)!r} {why}; pass the path of a TOML file")
    try:
        return tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                          f"TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {str(exc).splitlines()[0]}; fix the file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None


def load_config(path=None, overrides=(), base: dict | None = None) -> FinetuneConfig:
    """Read a TOML file (or start from `base` / defaults), apply overrides, validate. One-line ConfigErrors.

    An override that changes method.name (`--method houlsby` on a LoRA config) starts the [method] table
    afresh: the other tuner's fields (r, lora_alpha, ...) are dropped; `method.*` overrides still apply.
    """
    data: dict = json.loads(json.dumps(base or {}))
    if path:
        data = _merge(data, read_toml(path))
    parsed = [parse_override(item) if isinstance(item, str) else (list(item[0]), item[1]) for item in overrides]
    names = [value for keys, value in parsed if keys == ["method", "name"]]
    method = data.get("method")
    if names and isinstance(method, dict) and method.get("name", "lora") != names[-1]:
        data["method"] = {"name": names[-1]}
    for keys, value in parsed:
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {k!r} is not a section")
        node[keys[-1]] = value
    return FinetuneConfig.from_dict(data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_run_config(run_dir) -> dict | None:
    """The run's finetune.json as a dict (None when the folder has none); a corrupt file is one line."""
    path = Path(run_dir) / "finetune.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        FinetuneConfig.from_dict(data)
    except (ValueError, ConfigError) as exc:
        raise FlashtuneError(f"{path} is corrupt ({str(exc).splitlines()[0][:120]}); restore it, or start a new "
                             f"run with --overwrite or another --out") from None
    return data


# ----------------------------------------------------------------------------------------- device, speed
def resolve_runtime(cfg: FinetuneConfig, device, fast: bool | None = None) -> FinetuneConfig:
    """A copy of `cfg` with what the device decides filled in, fields the config sets left alone.

    cuda: precision bf16, base dtype = the precision's, and (fast, the default) fused LoRA, chunked
    cross-entropy and torch.compile; cpu: fp32 and the fused LoRA + chunked cross-entropy of TrainConfig's
    defaults. fast=False turns the speed switches off (the plain reference path) on any device.
    """
    import torch

    device = torch.device(device)
    train = dict(cfg.train)
    if device.type == "cuda":
        train.setdefault("precision", "bf16")
    speed = PLAIN if fast is False else (FAST_CUDA if device.type == "cuda" else {})
    for key, value in speed.items():
        train.setdefault(key, value)
    model = dataclasses.replace(cfg.model)
    if model.dtype == "auto":
        precision = train.get("precision", "fp32")
        model.dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32") \
            if device.type == "cuda" else "float32"
    return dataclasses.replace(cfg, model=model, train=train, method=dict(cfg.method))


def model_dtype(cfg: FinetuneConfig, device) -> str:
    """The base model's dtype for `cfg` on `device` ("auto" resolved)."""
    return resolve_runtime(cfg, device).model.dtype


# ------------------------------------------------------------------------------------------- run folders
def check_run_folder(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False,
                     can_resume: bool = True) -> str:
    """Decide, before anything is written, how the run in cfg.out_dir starts: "fresh" | "resume" | "overwrite".

    An existing run is refused unless `resume` or `overwrite` (`can_resume`: whether the command offers
    --resume, for the message); a resume whose hyper-parameters differ from the
    run's finetune.json is refused with one line naming each difference (the checkpoint's optimizer, schedule
    and data position were made under the old values, so applying new ones would silently mix two runs).
    """
    from flashtune.training import checkpoint as ckpt

    out = Path(cfg.out_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={str(out)!r} is a file; pass a folder for the run")
    present = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if not present:
        if resume:
            raise ConfigError(f"--resume: out_dir={str(out)!r} holds no run to continue; check the folder, or drop "
                              f"--resume to start a new run there")
        output_dir(out, "out_dir", create=False)  # a read-only place is one line now, not after loading
        return "fresh"
    if overwrite:
        return "overwrite"
    if not resume:
        what = "a checkpoint" if "latest.json" in present else ", ".join(present)
        raise ConfigError(f"out_dir={str(out)!r} already holds a run ({what}); pass "
                          f"{'--resume to continue it, ' if can_resume else ''}--overwrite to start over, or "
                          f"another --out")
    ckpt.latest_checkpoint(out)            # a bad latest.json or checkpoint is one line, before anything changes
    old = read_run_config(out)
    if old is not None:
        diffs = config_differences(FinetuneConfig.from_dict(old), cfg)
        if diffs:
            raise ConfigError(f"--resume with changed settings: {'; '.join(diffs)}; resume with the run's values, "
                              f"or pass --overwrite (or another --out) to start a new run")
    return "resume"


def config_differences(old: FinetuneConfig, new: FinetuneConfig) -> list[str]:
    """'section.field=old, now new' for each setting a resume must not change: [model], [data], [method], and
    of [train] the trainer's RESUME_MUST_MATCH (one rule, so `fit` never refuses what this let through)."""
    from flashtune.training.trainer import RESUME_MUST_MATCH

    def flat(cfg: FinetuneConfig) -> dict:
        out = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()}
        out.update({f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()})
        out["method.name"] = cfg.method.get("name", "lora")
        out.update({f"method.{k}": v for k, v in dataclasses.asdict(cfg.tuner_config()).items()})
        train = cfg.train_config().to_dict()
        out.update({f"train.{k}": train[k] for k in RESUME_MUST_MATCH})
        return out

    a, b = flat(old), flat(new)
    return [f"{k}={a.get(k)!r} in the run, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ------------------------------------------------------------------------------------------------- data
def load_examples(data: DataSection):
    """(train, val) E2EExample lists for an e2e/synthetic task, split by distinct MR."""
    from flashtune.data import generate_e2e_style, load_e2e_csv, split_by_mr

    if data.task == "e2e":
        examples = load_e2e_csv(data.path or None, limit=data.max_inputs or None)
    else:
        examples = generate_e2e_style(data.num_examples, seed=data.seed)
        if data.max_inputs:
            examples = examples[:data.max_inputs]
    val_size = data.val_size if data.val_size < 1 else int(data.val_size)
    return split_by_mr(examples, val_size, seed=data.seed)


def load_texts(data: DataSection, val_fraction: float = 0.05):
    """(train_texts, val_texts) from a plain-text file: paragraphs (blank-line separated), last 5% held out."""
    p = Path(data.path)
    if not p.is_file():
        raise FlashtuneError(f"data.path={data.path!r} does not exist; point it at a UTF-8 text file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlashtuneError(f"{p} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    paras = [t.strip() for t in text.split("\n\n") if t.strip()]
    if len(paras) < 2:
        paras = [line for line in text.splitlines() if line.strip()]
    if len(paras) < 2:
        raise FlashtuneError(f"{p} holds less than two paragraphs; give it more text")
    n_val = max(1, int(len(paras) * val_fraction))
    return paras[:-n_val], paras[-n_val:]


def load_datasets(data: DataSection, tokenizer):
    """The data hook of the recipe: (train_ds, val_ds, val_examples) for `data`.

    train_ds / val_ds: tokenized examples (dicts of `input_ids`, `labels`) for `fit` and the loss evaluation;
    val_examples: E2EExample inputs to generate for and score (empty for tasks without references).
    """
    from flashtune.data import make_lm_dataset, make_text_dataset
    from flashtune.data.formats import build_datasets, load_records, split_records
    from flashtune.data.packing import pack_examples

    if data.task == "file":
        records, fmt = load_records(data.path, data.format or None)
        train_ds, val_ds = build_datasets(records, fmt, tokenizer, data.max_length, data.val_size, data.seed,
                                          pack=data.pack, refs=data.refs)
        # E2E records are scored by generation (BLEU, slot errors); other formats by the held-out loss.
        val_examples = split_records(records, fmt, data.val_size, data.seed)[1] if fmt == "e2e" else []
        return train_ds, val_ds, val_examples
    if data.task == "text":
        train_texts, val_texts = load_texts(data)
        train_ds = make_text_dataset(train_texts, tokenizer, data.block_size)
        val_ds, val_examples = make_text_dataset(val_texts, tokenizer, data.block_size), []
    else:
        train_ex, val_examples = load_examples(data)
        train_ds = make_lm_dataset(train_ex, tokenizer, data.max_length, refs=data.refs)
        val_ds = make_lm_dataset(val_examples, tokenizer, data.max_length, refs="first")
    if data.pack:
        train_ds, val_ds = pack_examples(train_ds, data.max_length), pack_examples(val_ds, data.max_length)
    return train_ds, val_ds, val_examples


# ------------------------------------------------------------------------------------------------ recipe
def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_loss_eval(model, dataset, collate, batch_size: int = 16, limit: int = 64):
    """An eval_fn for `fit`: mean target-token cross-entropy over the first `limit` validation examples."""
    from flashtune.training import causal_lm_loss_sum

    items = dataset[:limit]

    def eval_fn(m) -> dict:
        total, count = 0.0, 0
        device = next(m.parameters()).device
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in collate(items[s:s + batch_size]).items()}
            total += float(causal_lm_loss_sum(m, batch, None))
            count += int((batch["labels"][:, 1:] != -100).sum())
        return {"loss": total / max(count, 1)}

    return eval_fn if items else None


def _uncompile(model) -> None:
    """Drop the compiled forwards `TrainConfig(compile=True)` put on the blocks (generation runs eagerly)."""
    from flashtune.training.speed import decoder_blocks

    try:
        blocks = decoder_blocks(model)
    except ConfigError:
        return
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None


def _clear_outputs(out: Path) -> None:
    """--overwrite: the old run's adapter and report go before the new run writes its own."""
    for name in ("adapter", "report"):
        shutil.rmtree(out / name, ignore_errors=True)


def run_finetune(cfg: FinetuneConfig, log=print, progress: bool = True, resume: bool = False,
                 overwrite: bool = False, model=None, tokenizer=None, device=None, fast: bool | None = None) -> dict:
    """Train `cfg`, save the adapter, evaluate on the validation inputs and write the report.

    device: "cuda" | "cpu" | ... (None: cuda when available); fast: the GPU fast path (None: on where it
    applies, False: the plain path). `model` / `tokenizer` may be passed already loaded (they are moved to
    the device). Returns {"metrics", "history", "adapter_dir", "report", "trainable_params", "train_time_s",
    "config", "model", "tokenizer"}.
    """
    from flashtune.data import Collator, example_length
    from flashtune.evaluation import evaluate_generation, write_json, write_report
    from flashtune.models import load_base_model, resolve_device
    from flashtune.training import distributed, fit
    from flashtune.training.trainer import seed_everything
    from flashtune.tuners import attach

    device = resolve_device(device)
    _, world, local_rank = distributed.init(device.type)     # under torchrun: one process per GPU
    if world > 1 and device.type == "cuda":
        import torch

        device = torch.device("cuda", local_rank)
    if not distributed.is_main():                             # rank 0 alone prints and writes reports
        log, progress = (lambda *a, **k: None), False
    cfg = resolve_runtime(cfg, device, fast)
    train_cfg = cfg.train_config(resume=resume or cfg.train.get("resume", False),
                                 overwrite=overwrite or cfg.train.get("overwrite", False))
    tuner_cfg = cfg.tuner_config()
    mode = check_run_folder(cfg, train_cfg.resume, train_cfg.overwrite)
    distributed.barrier()                  # every rank has seen the folder as it was before rank 0 writes
    out = Path(cfg.out_dir)
    if model is None:
        log(f"loading model {cfg.model.name or 'SmolLM2-135M-Instruct (default)'} on {device} ...")
        # On a GPU the fast path attends with SDPA: with compiled blocks it beat the Triton kernel in
        # bench/train.py (75.8k vs 64.8k tokens/s on the H200).
        extra = {"attn_implementation": "sdpa"} if device.type == "cuda" else {}
        model, tokenizer = load_base_model(cfg.model.name or None, dtype=cfg.model.dtype, device=device, **extra)
    else:
        model.to(device)
        held = str(next(model.parameters()).dtype).removeprefix("torch.")
        if held in MODEL_DTYPES:               # finetune.json records the dtype the passed model is held in
            cfg.model.dtype = held
    train_ds, val_ds, val_examples = load_datasets(cfg.data, tokenizer)
    if not train_ds:
        raise FlashtuneError("the training set is empty; give more data or a smaller data.block_size")
    seed_everything(train_cfg.seed)        # before attach: the adapter's initial weights come from this seed
    attach(model, tuner_cfg)
    model.to(device)
    if cfg.data.pack:
        from flashtune.data.packing import check_packing

        check_packing(model)               # refuses tuners / attention that would let packed rows mix
    n_params = trainable_parameters(model)
    log(f"{cfg.method.get('name', 'lora')}: {n_params:,} trainable parameters; {len(train_ds)} training "
        f"examples, {len(val_examples) or len(val_ds)} validation inputs; {device}, {train_cfg.precision}")
    # The run is known to start: from here on the folder is ours to write.
    if distributed.is_main():
        if mode == "overwrite":
            _clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "finetune.json", cfg.to_dict())
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    start = time.perf_counter()
    try:
        result = fit(model, train_ds, train_cfg, collate_fn=collate, length_fn=example_length,
                     eval_fn=make_loss_eval(model, val_ds, collate), progress=progress)
    finally:
        _uncompile(model)
    train_time = time.perf_counter() - start
    adapter_dir = distributed.save_adapter(model, out / "adapter")     # PEFT format, written once by rank 0
    metrics: dict[str, Any] = {"trainable_params": n_params, "train_time_s": round(train_time, 1),
                               "steps": result.step}
    if result.eval:
        metrics.update(result.eval)
    samples = None
    if not distributed.is_main() or distributed.is_sharded(model):
        if distributed.is_sharded(model):
            log("generation is skipped under FSDP (the weights are sharded): run `flashtune eval` on the run")
        return {"metrics": metrics, "history": result.history, "adapter_dir": str(adapter_dir), "report": None,
                "trainable_params": n_params, "train_time_s": train_time, "config": cfg, "model": model,
                "tokenizer": tokenizer}
    if val_examples:
        subset = val_examples[:cfg.eval.max_inputs] if cfg.eval.max_inputs else val_examples
        beams = "greedy" if cfg.eval.num_beams == 1 else f"beam {cfg.eval.num_beams}"
        log(f"generating for {len(subset)} validation inputs ({beams}) ...")
        res = evaluate_generation(model, tokenizer, subset, batch_size=cfg.eval.batch_size,
                                  num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
                                  progress=progress)
        metrics.update(res["metrics"])
        samples = res["samples"]
    summary = write_report(out / "report", metrics, samples, result.history, title="flashtune finetune",
                           config=cfg.to_dict(), n_samples=cfg.eval.samples)
    return {"metrics": metrics, "history": result.history, "adapter_dir": str(adapter_dir), "report": str(summary),
            "trainable_params": n_params, "train_time_s": train_time, "config": cfg, "model": model,
            "tokenizer": tokenizer}
