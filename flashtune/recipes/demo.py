"""`flashtune demo` (and `make demo`): score the base model, LoRA-tune it on E2E-style data, score it again.

Sized to finish in a few minutes on 2 CPU cores; the report folder holds metrics, samples and loss curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flashtune.recipes.finetune import (FinetuneConfig, check_run_folder, load_examples, resolve_runtime,
                                        run_finetune)

# What `flashtune demo` (and `make demo`) runs: sized to finish in about 5 minutes on 2 CPU cores.
DEMO_CONFIG = {
    "out_dir": "runs/demo",
    "data": {"task": "synthetic", "num_examples": 416, "val_size": 16, "seed": 0, "refs": "all"},
    "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "train": {"lr": 3e-3, "max_steps": 56, "batch_size": 8, "warmup_steps": 3, "schedule": "cosine",
              "log_every": 2, "save_every": 0, "seed": 0},
    "eval": {"num_beams": 1, "max_new_tokens": 40, "batch_size": 16, "samples": 3},
}
# LoRA goes on the linear layers of the top third of the blocks only: backward then stops there, which makes
# a CPU step about twice as cheap as adapting every block, and the output format is learned just as well.
TOP_FRACTION = 1 / 3


def top_layers_regex(model, k: int | None) -> str:
    """A target_modules regex for the linear layers of the top `k` decoder blocks (None: the top third)."""
    n = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if n == 0:
        return "all-linear"
    k = max(1, round(n * TOP_FRACTION)) if k is None else min(max(k, 1), n)
    layers = "|".join(str(i) for i in range(n - k, n))
    return rf".*\.layers\.({layers})\..*(proj|fc\d?)"


def _slots(metrics: dict) -> str:
    """'  slot errors 3.1%' when the metrics hold them (E2E-style inputs), else ''."""
    return f"  slot errors {metrics['slot_error_rate']:.1f}%" if "slot_error_rate" in metrics else ""


def run_demo(cfg: FinetuneConfig, device=None, overwrite: bool = False, top_layers: int | None = None,
             log=print, say=print, progress: bool = True) -> dict:
    """Score the base model on the held-out inputs, fine-tune (`run_finetune`), score again, write the report.

    top_layers: LoRA on the linear layers of the top K blocks (None: a third; 0: cfg.method as it is).
    `say` receives the before/after lines as they are known. Returns {"before", "after", "samples",
    "summary", "total_s", "trainable_params"}.
    """
    from flashtune.evaluation import evaluate_generation, write_report
    from flashtune.models import load_base_model, resolve_device

    t0 = time.perf_counter()
    device = resolve_device(device)
    cfg = resolve_runtime(cfg, device)
    check_run_folder(cfg, overwrite=overwrite, can_resume=False)  # refuse before the minutes of work
    log(f"loading {cfg.model.name or 'SmolLM2-135M-Instruct'} (the first run converts the GGUF file: ~40 s) ...")
    extra = {"attn_implementation": "sdpa"} if device.type == "cuda" else {}
    model, tok = load_base_model(cfg.model.name or None, dtype=cfg.model.dtype, device=device, **extra)
    if top_layers != 0 and cfg.method.get("name", "lora") == "lora":  # the other tuners have no target list
        cfg.method["target_modules"] = top_layers_regex(model, top_layers)
    _, held_out = load_examples(cfg.data)
    gen = dict(batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
               progress=progress)
    log(f"scoring the base model on {len(held_out)} held-out inputs ...")
    before = evaluate_generation(model, tok, held_out, **gen)
    say(f"before: BLEU {before['metrics']['bleu']:.2f}  ROUGE-L {before['metrics']['rouge_l']:.2f}"
        + _slots(before["metrics"]))
    res = run_finetune(cfg, log=log, progress=progress, overwrite=overwrite, model=model, tokenizer=tok,
                       device=device)
    after = res["metrics"]
    say(f"after:  BLEU {after['bleu']:.2f}  ROUGE-L {after['rouge_l']:.2f}{_slots(after)}  "
        f"({res['trainable_params']:,} LoRA parameters, {after['steps']} steps in {after['train_time_s']:.0f} s)")
    path = Path(res["report"]).parent / "samples.jsonl"
    trained = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    samples = [dict(s, output_before=b["output"]) for s, b in zip(trained, before["samples"])]
    keys = ("bleu", "rouge_l", "nist", "slot_error_rate", "outputs_correct")
    metrics = {"before": {k: before["metrics"][k] for k in keys if k in before["metrics"]},
               "after": {k: after[k] for k in keys if k in after}}
    total = time.perf_counter() - t0
    metrics["after"].update(trainable_params=res["trainable_params"], train_time_s=after["train_time_s"],
                            steps=after["steps"])
    summary = write_report(f"{cfg.out_dir}/report", metrics, samples, res["history"],
                           title="flashtune demo: LoRA on E2E-style data",
                           config={**res["config"].to_dict(), "demo_wall_time_s": round(total, 1)},
                           n_samples=cfg.eval.samples)
    return {"before": metrics["before"], "after": metrics["after"], "samples": samples, "summary": str(summary),
            "total_s": total, "trainable_params": res["trainable_params"], "n_samples": cfg.eval.samples}
