"""Packing short examples: one epoch of LoRA training with and without `pack=True`, same data, same model.

Packing without cross-contamination (Krell et al., arXiv:2107.02027) through `build_datasets(pack=True)`:
on the GPU the "flashtune" attention runs each packed row as one varlen kernel call (cu_seqlens where the
position ids restart). Measured per mode: rows, row fill, wall time of one epoch, real (non-padding)
tokens/s, peak memory (unpacked batches are length-bucketed, as the finetune recipe does), and the validation
loss of the untrained adapter (LoRA's B = 0, so both modes must give the base model's loss: a packed run that
attended across examples would differ).

Data: the E2E csv ($FLASHTUNE_E2E_DATA, else ../shared/data/e2e/) read through `load_records`, every
reference an example (short: ~60-90 tokens), rows of `--max-length` tokens.

    python3 bench/packing.py --device cuda            # on the H200: writes bench/results/packing.json
    python3 bench/packing.py --smoke                  # tiny random Llama on the CPU, every code path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import smoke_model  # noqa: E402
from flashtune.data import Collator, build_datasets, check_packing, load_records  # noqa: E402
from flashtune.data.e2e import default_e2e_path  # noqa: E402
from flashtune.data.packing import packing_efficiency  # noqa: E402
from flashtune.fileio import atomic_write_json  # noqa: E402
from flashtune.training import TrainConfig, causal_lm_loss_sum, fit  # noqa: E402
from flashtune.tuners import LoraConfig, attach  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return out


def load_model(args):
    from flashtune.models import load_base_model

    if not args.smoke:
        return load_base_model(None, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device)
    model, tok = smoke_model(max_positions=1024)   # a tiny random Llama with the default model's tokenizer
    model = model.to(args.device)
    model.set_attn_implementation("sdpa")
    return model, tok


@torch.no_grad()
def eval_loss(model, dataset, collate, device, batch_size=16) -> float:
    total, count = 0.0, 0
    for s in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate(dataset[s:s + batch_size]).items()}
        total += float(causal_lm_loss_sum(model, batch, None))
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(count, 1)


def run(args) -> dict:
    records, fmt = load_records(args.data or default_e2e_path())
    if args.max_inputs:
        records = records[:args.max_inputs]
    model, tok = load_model(args)
    attach(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    rows = {}
    for pack in (False, True):
        train, val = build_datasets(records, fmt, tok, args.max_length, args.val_size, seed=0, pack=pack)
        if pack:
            check_packing(model)
        real = sum(len(r["input_ids"]) for r in train)
        val_loss = eval_loss(model, val, collate, args.device)
        if not pack:
            batch, mean_len = args.batch_size, real / len(train)
        else:    # the same tokens per optimizer step as unpacked, unless told
            batch = args.packed_batch_size or max(1, round(args.batch_size * mean_len / args.max_length))
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(out_dir=out, precision="bf16" if args.device == "cuda" else "fp32", lr=2e-4,
                              epochs=1, batch_size=batch, save_every=0, log_every=10**6, seed=0)
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = fit(model, train, cfg, collate_fn=collate, progress=False,
                         length_fn=None if pack else (lambda ex: len(ex["input_ids"])))
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        rows["packed" if pack else "unpacked"] = {
            "examples_or_rows": len(train), "batch_size": batch, "steps": result.step,
            "real_tokens": real, "fill": round(packing_efficiency(train, args.max_length), 4) if pack else None,
            "wall_s": round(wall, 2), "real_tokens_per_s": round(real / wall, 1),
            "peak_mem_gib": None if peak is None else round(peak, 3),
            "val_loss_untrained": round(val_loss, 6), "train_loss_last": result.history[-1].get("loss"),
        }
        # start the second mode from the same untrained adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.zeros_(p)
    rows["speedup"] = round(rows["unpacked"]["wall_s"] / rows["packed"]["wall_s"], 3)
    rows["val_loss_abs_diff"] = abs(rows["unpacked"]["val_loss_untrained"] - rows["packed"]["val_loss_untrained"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help="data file (default: the E2E csv)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32, help="examples per batch without packing")
    ap.add_argument("--packed-batch-size", type=int, default=0,
                    help="packed rows per batch (0: as many tokens per step as unpacked)")
    ap.add_argument("--val-size", type=int, default=100)
    ap.add_argument("--max-inputs", type=int, default=0, help="keep the first N records (0: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, small data")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.device, args.max_inputs, args.max_length, args.val_size = "cpu", args.max_inputs or 60, 256, 10
    res = {"bench": "packing", "command": " ".join(["python3", "bench/packing.py", *sys.argv[1:]]),
           "data": str(args.data or os.environ.get("FLASHTUNE_E2E_DATA") or default_e2e_path()),
           "max_length": args.max_length, "lora": "r=16, alpha=32, all linear", **versions(), **run(args)}
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "packing-smoke.json" if args.smoke
                                           else ROOT / "bench" / "results" / "packing.json")
    atomic_write_json(out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
