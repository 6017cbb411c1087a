"""`flashtune eval`: score a finetune run folder (its model, data and held-out split) or a bare adapter folder.

Generation metrics (BLEU, ROUGE-L, NIST, slot errors) on table-to-text inputs; held-out loss and perplexity on
chat, prompt / completion and text data. The run's own `finetune.json` supplies the model and data.
"""

from __future__ import annotations

import math
from pathlib import Path

from flashtune.errors import FlashtuneError, check_choice
from flashtune.fileio import output_dir
from flashtune.recipes.finetune import (load_config, load_datasets, load_examples, load_texts, make_loss_eval,
                                        model_dtype, read_run_config)


def run_eval(path, split: str = "val", overrides=(), base_only: bool = False, out=None, device=None, log=print,
             progress: bool = True) -> dict:
    """Evaluate a finetune run folder (its model, data and held-out split) or a bare adapter folder.

    overrides: as in `load_config`, applied over the run's finetune.json (or the defaults). split: "val" (the
    held-out inputs) or "all". Writes the report to `out` (default <path>/eval-<split>[-base]); returns
    {"metrics", "summary"}.
    """
    from flashtune.data import Collator, make_text_dataset
    from flashtune.evaluation import evaluate_generation, write_report
    from flashtune.models import load_base_model, resolve_device
    from flashtune.tuners import load_adapter

    check_choice("split", split, ("val", "all"))
    root = Path(path)
    if not root.exists():
        raise FlashtuneError(f"{str(root)!r} does not exist; pass a finetune run folder or an adapter folder")
    base = read_run_config(root) or {}
    adapter_dir = root / "adapter" if (root / "adapter").is_dir() else root
    cfg = load_config(None, overrides, base=base)
    out = Path(out) if out else root / f"eval-{split}{'-base' if base_only else ''}"
    output_dir(out, "--out", create=False)  # before the minutes of generation, not after
    device = resolve_device(device)
    log(f"loading {cfg.model.name or 'SmolLM2-135M-Instruct'} + adapter {adapter_dir} on {device} ...")
    model, tok = load_base_model(cfg.model.name or None, dtype=model_dtype(cfg, device), device=device)
    if not base_only:
        load_adapter(model, adapter_dir)
        model.to(device)
    config = {**cfg.to_dict(), "adapter": None if base_only else str(adapter_dir), "split": split}
    if cfg.data.task == "file":
        train_ds, val_ds, examples = load_datasets(cfg.data, tok)
        if split == "all" and examples:
            from flashtune.data.formats import load_records

            examples = load_records(cfg.data.path, "e2e")[0]
    if cfg.data.task == "file" and not examples:
        ds = val_ds if split == "val" else train_ds + val_ds
        loss = make_loss_eval(model, ds, Collator(tok.pad_token_id or 0), limit=len(ds))(model)["loss"]
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(ds)}
        summary = write_report(out, metrics, None, None, title="flashtune eval (loss)", config=config)
    elif cfg.data.task == "text":
        train_texts, val_texts = load_texts(cfg.data)
        ds = make_text_dataset(val_texts if split == "val" else train_texts + val_texts, tok, cfg.data.block_size)
        if not ds:
            raise FlashtuneError("the split holds less than one block of text; lower data.block_size")
        loss = make_loss_eval(model, ds, Collator(tok.pad_token_id or 0), limit=len(ds))(model)["loss"]
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "blocks": len(ds)}
        summary = write_report(out, metrics, None, None, title="flashtune eval (text)", config=config)
    else:
        if cfg.data.task != "file":
            train, val = load_examples(cfg.data)
            examples = val if split == "val" else train + val
        if cfg.eval.max_inputs:
            examples = examples[:cfg.eval.max_inputs]
        res = evaluate_generation(model, tok, examples, batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams,
                                  max_new_tokens=cfg.eval.max_new_tokens, progress=progress)
        metrics = res["metrics"]
        summary = write_report(out, metrics, res["samples"], None, title="flashtune eval", config=config,
                               n_samples=cfg.eval.samples)
    return {"metrics": metrics, "summary": str(summary)}
