"""`flashtune finetune`: a TOML config (plus `--set section.key=value` overrides) -> adapter + report.

    flashtune finetune --config flashtune/configs/e2e_lora.toml --set train.lr=1e-3 --out runs/e2e

Sections: `[model]` (name, dtype), `[data]` (task "e2e" | "synthetic" | "text", path, sizes), `[method]`
(name "lora" | "prefix" | "houlsby" | "pfeiffer" plus that tuner's config fields), `[train]` (the fields of
`flashtune.training.TrainConfig`), `[eval]` (generation settings). The run folder gets checkpoints/,
metrics.jsonl, `finetune.json` (the resolved config), `adapter/` (PEFT format) and `report/`.
This module holds the recipe (`FinetuneConfig`, `run_finetune`) that `eval`, `demo` and bench/e2e.py reuse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import tomllib
from pathlib import Path
from typing import Any

from flashtune.errors import ConfigError, FlashtuneError, check_choice, check_range

TASKS = ("e2e", "synthetic", "text")
METHODS = ("lora", "prefix", "houlsby", "pfeiffer")
# Defaults per method, overridden by the [method] section's other keys.
METHOD_DEFAULTS = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "prefix": {"num_virtual_tokens": 10},
    "houlsby": {"bottleneck_size": 64},
    "pfeiffer": {"bottleneck_size": 64},
}


@dataclasses.dataclass
class ModelSection:
    name: str = ""                 # "" = the default SmolLM2-135M-Instruct; else a local path or HF id
    dtype: str = "float32"         # the frozen base's dtype: "float32" | "bfloat16" | "float16"

    def __post_init__(self):
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclasses.dataclass
class DataSection:
    task: str = "synthetic"        # "e2e" (csv), "synthetic" (generated E2E-style), "text" (plain-text file)
    path: str = ""                 # e2e: csv ("" = $FLASHTUNE_E2E_DATA or ../shared/data/e2e/); text: a file
    num_examples: int = 1000       # synthetic: distinct MRs generated
    max_inputs: int = 0            # e2e/synthetic: keep the first N distinct MRs (0 = all)
    val_size: float = 100          # distinct MRs held out (a count, or a fraction in (0, 1))
    max_length: int = 256          # tokens per training example
    refs: str = "all"              # "all": one example per reference; "first": one per MR
    block_size: int = 128          # text: tokens per packed block
    seed: int = 0                  # the validation split (and synthetic data) seed

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        check_choice("refs", self.refs, ("all", "first"))
        check_range("num_examples", self.num_examples, 2, integer=True)
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
        try:
            return TrainConfig(out_dir=self.out_dir, **{**self.train, **extra})
        except ConfigError as exc:
            raise ConfigError(f"train.{exc}") from None

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


def _section(cls, data, name):
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table of fields")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown field '{name}.{key}'; allowed: {', '.join(fields)}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{name}.{exc}") from None


def build_tuner_config(method: str, options: dict | None = None):
    """A flashtune.tuners config for `method` ("lora" | "prefix" | "houlsby" | "pfeiffer") with `options`."""
    check_choice("method.name", method, METHODS)
    import flashtune.tuners as tuners

    opts = {**METHOD_DEFAULTS[method], **(options or {})}
    if method == "lora":
        cls = tuners.LoraConfig
    elif method == "prefix":
        cls = getattr(tuners, "PrefixConfig", None)
        if cls is None:
            raise FlashtuneError("method.name='prefix' is not available in this build of flashtune.tuners; "
                                 "choose 'lora', 'houlsby' or 'pfeiffer'")
    else:
        cls = tuners.AdapterConfig
        if opts.setdefault("adapter_type", method) != method:
            raise ConfigError(f"method.adapter_type={opts['adapter_type']!r} contradicts method.name={method!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in opts:
        if key not in fields:
            raise ConfigError(f"unknown field 'method.{key}' for method {method!r}; allowed: {', '.join(fields)}")
    try:
        return cls(**opts)
    except ConfigError as exc:
        raise ConfigError(f"method.{exc}") from None


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


def load_config(path=None, overrides=(), base: dict | None = None) -> FinetuneConfig:
    """Read a TOML file (or start from `base` / defaults), apply overrides, validate. One-line ConfigErrors."""
    data: dict = json.loads(json.dumps(base or {}))
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = _merge(data, tomllib.loads(p.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    for item in overrides:
        keys, value = parse_override(item) if isinstance(item, str) else item
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


# ------------------------------------------------------------------------------------------------ recipe
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
    paras = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if len(paras) < 2:
        paras = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(paras) < 2:
        raise FlashtuneError(f"{p} holds less than two paragraphs; give it more text")
    n_val = max(1, int(len(paras) * val_fraction))
    return paras[:-n_val], paras[-n_val:]


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_loss_eval(model, dataset, collate, batch_size: int = 16, limit: int = 64):
    """An eval_fn for `fit`: mean target-token cross-entropy over the first `limit` validation examples."""
    import torch

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


def run_finetune(cfg: FinetuneConfig, log=print, progress: bool = True, resume: bool = False,
                 overwrite: bool = False, model=None, tokenizer=None) -> dict:
    """Train `cfg`, save the adapter, evaluate on the validation MRs and write the report.

    Returns {"metrics", "history", "adapter_dir", "report", "trainable_params", "train_time_s"}.
    """
    from flashtune.data import Collator, example_length, make_lm_dataset, make_text_dataset
    from flashtune.evaluation import evaluate_generation, write_json, write_report
    from flashtune.models import load_base_model
    from flashtune.training import fit
    from flashtune.tuners import attach, save_adapter

    out = Path(cfg.out_dir)
    train_cfg = cfg.train_config(resume=resume or cfg.train.get("resume", False),
                                 overwrite=overwrite or cfg.train.get("overwrite", False))
    tuner_cfg = cfg.tuner_config()
    if model is None:
        log(f"loading model {cfg.model.name or 'SmolLM2-135M-Instruct (default)'} ...")
        model, tokenizer = load_base_model(cfg.model.name or None, dtype=cfg.model.dtype)
    if cfg.data.task == "text":
        train_texts, val_texts = load_texts(cfg.data)
        train_ds = make_text_dataset(train_texts, tokenizer, cfg.data.block_size)
        val_ds = make_text_dataset(val_texts, tokenizer, cfg.data.block_size)
        val_examples = []
    else:
        train_ex, val_examples = load_examples(cfg.data)
        train_ds = make_lm_dataset(train_ex, tokenizer, cfg.data.max_length, refs=cfg.data.refs)
        val_ds = make_lm_dataset(val_examples, tokenizer, cfg.data.max_length, refs="first")
    if not train_ds:
        raise FlashtuneError("the training set is empty; give more data or a smaller data.block_size")
    attach(model, tuner_cfg)
    n_params = trainable_parameters(model)
    log(f"{cfg.method.get('name', 'lora')}: {n_params:,} trainable parameters; {len(train_ds)} training "
        f"examples, {len(val_examples) or len(val_ds)} validation inputs")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "finetune.json", cfg.to_dict())
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    start = time.perf_counter()
    result = fit(model, train_ds, train_cfg, collate_fn=collate, length_fn=example_length,
                 eval_fn=make_loss_eval(model, val_ds, collate), progress=progress)
    train_time = time.perf_counter() - start
    adapter_dir = save_adapter(model, out / "adapter")
    metrics: dict[str, Any] = {"trainable_params": n_params, "train_time_s": round(train_time, 1),
                               "steps": result.step}
    if result.eval:
        metrics.update(result.eval)
    samples = None
    if val_examples:
        subset = val_examples[:cfg.eval.max_inputs] if cfg.eval.max_inputs else val_examples
        log(f"generating for {len(subset)} validation inputs ({'greedy' if cfg.eval.num_beams == 1 else f'beam {cfg.eval.num_beams}'}) ...")
        res = evaluate_generation(model, tokenizer, subset, batch_size=cfg.eval.batch_size,
                                  num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
                                  progress=progress)
        metrics.update(res["metrics"])
        samples = res["samples"]
    summary = write_report(out / "report", metrics, samples, result.history, title="flashtune finetune",
                           config=cfg.to_dict(), n_samples=cfg.eval.samples)
    return {"metrics": metrics, "history": result.history, "adapter_dir": str(adapter_dir), "report": str(summary),
            "trainable_params": n_params, "train_time_s": train_time, "model": model, "tokenizer": tokenizer}


# ---------------------------------------------------------------------------------------------------- CLI
def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info lines, only results")


def quiet_libraries(quiet: bool) -> None:
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune an adapter from a TOML config",
        description="Fine-tune a LoRA / prefix / Houlsby / Pfeiffer adapter on E2E-format data, generated "
                    "E2E-style data or plain text, then evaluate it and write a report.",
        epilog="Example: flashtune finetune --config flashtune/configs/e2e_lora.toml --set train.lr=1e-3")
    p.add_argument("--config", "-c", help="TOML config file (sections model, data, method, train, eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--out", help="run folder (config: out_dir)")
    p.add_argument("--model", help="base model: a local path or HF id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=METHODS, help="tuner (config: method.name)")
    p.add_argument("--task", choices=TASKS, help="data task (config: data.task)")
    p.add_argument("--data", help="data file (config: data.path)")
    p.add_argument("--lr", type=float, help="learning rate (config: train.lr)")
    p.add_argument("--epochs", type=float, help="epochs (config: train.epochs)")
    p.add_argument("--max-steps", type=int, help="optimizer steps, overrides epochs (config: train.max_steps)")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch (config: train.batch_size)")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (config: train.precision)")
    p.add_argument("--seed", type=int, help="training seed (config: train.seed)")
    p.add_argument("--num-beams", type=int, help="beam size for the evaluation (config: eval.num_beams)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    p.add_argument("--overwrite", action="store_true", help="start over even if the run folder has checkpoints")
    add_common_flags(p)
    p.set_defaults(func=main)


def _flag_overrides(args) -> list:
    pairs = [(["out_dir"], args.out), (["model", "name"], args.model), (["method", "name"], args.method),
             (["data", "task"], args.task), (["data", "path"], args.data), (["train", "lr"], args.lr),
             (["train", "epochs"], args.epochs), (["train", "max_steps"], args.max_steps),
             (["train", "batch_size"], args.batch_size), (["train", "precision"], args.precision),
             (["train", "seed"], args.seed), (["eval", "num_beams"], args.num_beams)]
    return [(k, v) for k, v in pairs if v is not None]


def main(args) -> int:
    cfg = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    quiet_libraries(args.quiet)
    log = (lambda *a, **k: None) if args.quiet else print
    res = run_finetune(cfg, log=log, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    m = res["metrics"]
    scores = ", ".join(f"{k} {m[k]:.2f}" for k in ("bleu", "rouge_l", "nist", "eval_loss") if k in m)
    print(f"done: {m['steps']} steps in {m['train_time_s']:.0f} s; {scores}")
    print(f"adapter: {res['adapter_dir']}  report: {res['report']}")
    return 0
