"""LoRA training on the 1.1B Llama shape (random weights): precision policies, and flashtune against PEFT.

Part "peft": flashtune's `fit` against Hugging Face PEFT + transformers, same model, batch 4 x 2048, LoRA r=16
on all seven projections, bf16 autocast over a bf16 base with fp32 adapters, AdamW, clipping. One PEFT row,
then flashtune rows that switch on one technique after another (the ablation): chunked linear
cross-entropy, the fused LoRA linear, activation checkpointing of half the blocks, torch.compile of the
blocks, the "flashtune" FlashAttention kernel when `flashtune.attention` registers it, and (eager, opt-in)
fused RMSNorm / SwiGLU kernels.
Peers beside PEFT: PEFT + Liger Kernel (its RMSNorm, RoPE, SwiGLU and fused linear cross-entropy patched into
transformers' Llama before the model is built, in a separate Python process so the patch cannot reach the
other rows; skipped without CUDA), and unsloth (recorded as skipped when it cannot be imported). Every row
trains the same model on the same batches and records its loss curve; the result holds each row's final
loss against PEFT's (the fast paths must train the same model: within 0.5%).
Reported: tokens/s and peak memory of every row against PEFT's, and its final loss against PEFT's.

Part "precision": fp32 vs bf16 vs fp16 (GradScaler) on one LoRA fine-tune of the same shape, base held in
the precision's dtype (fp32 / bf16 / fp16), on real text (the E2E csv at $FLASHTUNE_E2E_DATA tokenized with
the default model's tokenizer, ids folded into the 32000-token vocabulary) for N steps: step time, peak
memory, final loss: how much faster bf16 is than fp32, and whether bf16 and fp16 end where fp32 does.

    python3 bench/train.py                  # on the GPU: writes bench/results/train.json (~3-4 min)
    python3 bench/train.py --smoke          # tiny model on CPU, every code path, writes to a temp file
    python3 bench/train.py --part peft --rows peft,liger --only compile   # pick rows
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import environment, peak_gib, reset_memory, sync  # noqa: E402
from flashtune.training import TrainConfig, TrainingInterrupted, fit  # noqa: E402
from flashtune.training.fused_ops import fuse_norm_mlp  # noqa: E402
from flashtune.training.sampler import make_batches  # noqa: E402
from flashtune.training.speed import compile_blocks  # noqa: E402

SHAPE_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
SHAPE_SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The flashtune ablation, cumulative from plain to everything. chunk: ce_chunk_size (0 = full logits);
# fused: fused LoRA linear; ckpt: fraction of blocks checkpointed; attn: HF attention implementation;
# kernels (when set): the fused RMSNorm / SwiGLU kernels.
ABLATION = [
    dict(name="flashtune plain", chunk=0, fused=False, ckpt=0.0, compile=False, attn="sdpa"),
    dict(name="+ chunked CE", chunk=4096, fused=False, ckpt=0.0, compile=False, attn="sdpa"),
    dict(name="+ fused LoRA", chunk=4096, fused=True, ckpt=0.0, compile=False, attn="sdpa"),
    dict(name="+ fused LoRA, checkpoint half", chunk=4096, fused=True, ckpt=0.5, compile=False, attn="sdpa"),
    dict(name="+ fused LoRA, flashtune attention", chunk=4096, fused=True, ckpt=0.0, compile=False,
         attn="flashtune"),
    # kernels: RMSNorm and SwiGLU as one Triton kernel each way (flashtune.training.fused_ops), eager only:
    # what Liger fuses besides the loss; compiled blocks fuse them already.
    dict(name="+ fused LoRA, fused RMSNorm/SwiGLU", chunk=4096, fused=True, ckpt=0.0, compile=False, attn="sdpa",
         kernels=True),
    # torch.compile's partitioner recomputes cheap elementwise ops in backward instead of saving them, so
    # compiled blocks may need no checkpointing at all to meet the memory target.
    dict(name="+ fused LoRA, compile", chunk=4096, fused=True, ckpt=0.0, compile=True, attn="sdpa"),
    dict(name="+ fused LoRA, compile, checkpoint half", chunk=4096, fused=True, ckpt=0.5, compile=True,
         attn="sdpa"),
    dict(name="+ fused LoRA, compile, flashtune attention", chunk=4096, fused=True, ckpt=0.0, compile=True,
         attn="flashtune"),
]


# ------------------------------------------------------------------------------------------------ helpers

def allocated_gib(device):
    """Memory held when a row starts training (weights, adapters; more would mean a leak from a prior row)."""
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None


def build_model(shape, dtype, device, attn, seed=0):
    """A random Llama of `shape`: initialized in fp32 from `seed` (same weights for every dtype), then cast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    if attn == "flashtune":
        from flashtune.attention.hf import register   # raises if the kernel package is missing
        register()
    model.set_attn_implementation(attn)
    return model


def attach_lora(model, r):
    from flashtune.tuners import LoraConfig, attach

    return attach(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJECTIONS))


def random_rows(n, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def text_rows(n, seq, vocab):
    """Packed rows of real text: E2E references tokenized by the default model's tokenizer, ids mod vocab."""
    source = "e2e csv + default tokenizer"
    try:
        from transformers import AutoTokenizer

        from flashtune.models import default_model_dir
        path = os.environ.get("FLASHTUNE_E2E_DATA") or str(ROOT.parent / "shared/data/e2e/devel-fixed.no-ol.csv")
        with open(path, newline="", encoding="utf-8") as f:
            text = "".join(f"{r['mr']}\n{r['ref']}\n\n" for r in csv.DictReader(f))
        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
        ids = tok(text)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - a benchmark falls back to deterministic text and says so
        source = f"deterministic text (real data unavailable: {type(exc).__name__}: {exc})"
        g = torch.Generator().manual_seed(0)
        words = ("the restaurant serves cheap food near the river and families are welcome there with "
                 "a high customer rating in the city centre of cambridge where coffee shops").split()
        text = " ".join(words[i] for i in torch.randint(0, len(words), (n * seq,), generator=g).tolist())
        ids = list(text.encode())
    ids = torch.tensor(ids, dtype=torch.long) % vocab
    per = len(ids) // seq
    rows = ids[: per * seq].view(per, seq)                                   # [rows, seq]
    rows = rows.repeat(math.ceil(n / per), 1)[:n] if per < n else rows
    return [{"input_ids": r, "labels": r} for r in rows], source, int(len(ids))


def step_stats(history, warm, tokens_per_step):
    times = [r["step_time_s"] for r in history[warm:] if "step_time_s" in r]
    med = statistics.median(times)
    return {"step_ms": 1e3 * med, "tokens_per_s": tokens_per_step / med, "timed_steps": len(times)}


# ---------------------------------------------------------------------------------------------- the rows
def apply_liger():
    """Patch transformers' Llama classes with Liger Kernel's (process-wide: only in a worker process)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    kwargs = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False)
    apply_liger_kernel_to_llama(**kwargs)
    return kwargs


def liger_in(model):
    """What of Liger's the built model really runs: module counts, and whether rope and the loss are its."""
    from liger_kernel.transformers.model.llama import lce_forward
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.models.llama import modeling_llama

    mods = list(model.modules())
    found = {"rms_norm_modules": sum(isinstance(m, LigerRMSNorm) for m in mods),
             "swiglu_modules": sum(isinstance(m, LigerSwiGLUMLP) for m in mods),
             "rope": modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb,
             "fused_linear_cross_entropy": modeling_llama.LlamaForCausalLM.forward is lce_forward}
    if not all(found.values()):
        raise RuntimeError(f"Liger's patch did not reach the model: {found}")
    return found


def peft_row(args, shape, device, data, liger=False):
    """Hugging Face PEFT + transformers: the usual bf16 recipe (autocast, fp32 adapters), a plain loop.

    liger: patch the Llama classes with Liger Kernel first (call it in a fresh process: the patch is global).
    """
    import peft

    name = "HF PEFT + Liger" if liger else "HF PEFT"
    liger_args = apply_liger() if liger else None
    model = build_model(shape, torch.bfloat16, device, "sdpa")
    patched = liger_in(model) if liger else None
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=PROJECTIONS,
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)              # autocast_adapter_dtype=True: adapters in fp32
    if liger and device.type != "cuda":
        return {"name": name, "skipped": "no CUDA: Liger Kernel's Triton kernels need a GPU (the patch and the "
                                         "model build were checked)", "liger": liger_args, "patched": patched}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    model.train()
    reset_memory(device)
    start_gib = allocated_gib(device)
    times, losses = [], []
    order, position = make_batches(data, args.batch, seed=0), (0, 0)   # fit's order (TrainConfig.seed=0)
    for _ in range(args.warm + args.timed):
        idx, position = order.take(position)
        batch = [data[j] for j in idx]
        ids = torch.stack([b["input_ids"] for b in batch]).to(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[args.warm:])
    row = {"name": name, "step_ms": 1e3 * med, "tokens_per_s": args.batch * args.seq / med,
           "peak_gib": peak_gib(device), "start_gib": start_gib, "loss_first": losses[0], "loss_last": losses[-1],
           "loss_curve": [round(x, 6) for x in losses],
           "adapter_dtype": str(params[0].dtype), "trainable": sum(p.numel() for p in params)}
    if liger:
        row.update(liger=liger_args, patched=patched)
    del model, opt, params
    return row


def isolated_row(args, worker, timeout_s=300):
    """Run one peer row (`--worker NAME`) in a fresh Python process and return its row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--out", str(out)]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"worker {worker} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
        return json.loads(out.read_text())


def liger_row(args, shape, device, data):
    """PEFT + Liger Kernel (run in a worker process: `apply_liger` patches transformers for good)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return {"name": "HF PEFT + Liger", "skipped": "liger-kernel is not installed"}
    return peft_row(args, shape, device, data, liger=True)


def unsloth_row():
    """unsloth loads models through its own patched classes and needs its own stack; say why it cannot run."""
    needs = ("unsloth", "unsloth_zoo", "bitsandbytes", "xformers")
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    why = (f"not installed here: {', '.join(missing)} (the GPU image lacks them and has no internet)" if missing
           else "its stack imports, but this bench has no unsloth row: it loads models by path through its own "
                "FastLanguageModel classes")
    return {"name": "unsloth", "skipped": why}


def flashtune_row(args, shape, device, data, spec, out_root):
    model = attach_lora(build_model(shape, torch.bfloat16, device, spec["attn"]), args.rank)
    fused_kernels = fuse_norm_mlp(model) if spec.get("kernels") else None
    if spec["compile"]:
        compile_blocks(model, backend=args.compile_backend)
    cfg = TrainConfig(out_dir=str(out_root / spec["name"].replace(" ", "_").replace(",", "")), precision="bf16",
                      lr=1e-4, max_steps=args.warm + args.timed, batch_size=args.batch, log_every=1,
                      save_every=0, schedule="constant", ce_chunk_size=spec["chunk"],
                      gradient_checkpointing=spec["ckpt"], fused_lora=spec["fused"], overwrite=True)
    reset_memory(device)
    start_gib = allocated_gib(device)
    res = fit(model, data, cfg, progress=False)
    row = {**spec, **step_stats(res.history, args.warm, args.batch * args.seq), "peak_gib": peak_gib(device),
           "start_gib": start_gib,
           "loss_first": res.history[0]["loss"], "loss_last": res.history[-1]["loss"],
           "loss_curve": [round(r["loss"], 6) for r in res.history],
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if fused_kernels:
        row["fused_kernels"] = fused_kernels   # modules switched (off CUDA they run their own forward)
    del model, res
    return row


def precision_row(args, shape, device, data, precision, out_root):
    model = attach_lora(build_model(shape, DTYPES[precision], device, "sdpa"), args.rank)   # same init each
    cfg = TrainConfig(out_dir=str(out_root / f"precision_{precision}"), precision=precision, lr=1e-3,
                      max_steps=args.precision_steps, batch_size=args.batch, log_every=1, save_every=0,
                      warmup_steps=max(1, args.precision_steps // 8), schedule="cosine", min_lr_ratio=0.1,
                      overwrite=True)
    reset_memory(device)
    start_gib = allocated_gib(device)
    res = fit(model, data, cfg, progress=False)
    tail = [r["loss"] for r in res.history[-4:]]
    row = {"precision": precision, "base_dtype": str(DTYPES[precision]),
           **step_stats(res.history, min(3, len(res.history) - 1), args.batch * args.seq),
           "peak_gib": peak_gib(device), "start_gib": start_gib, "loss_first": res.history[0]["loss"],
           "loss_final": res.history[-1]["loss"], "loss_last4_mean": sum(tail) / len(tail),
           "skipped_steps": res.skipped_steps, "loss_curve": [round(r["loss"], 5) for r in res.history]}
    del model, res
    return row


# -------------------------------------------------------------------------------------------------- main
def summarize(result):
    rows = result["peft"]["rows"]
    base = next((r for r in rows if r.get("name") == "HF PEFT" and "tokens_per_s" in r), None)
    if base is None:
        return
    for r in rows:
        if "tokens_per_s" in r and r is not base:
            r["speed_vs_peft"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("peak_gib") and base.get("peak_gib"):
                r["memory_vs_peft"] = r["peak_gib"] / base["peak_gib"]
            # Same base, same batches, B = 0 at the start: the first loss must agree with PEFT's, and the
            # last too, within 0.5%, or the fast path trains a different model.
            r["loss_first_rel_diff_vs_peft"] = r["loss_first"] / base["loss_first"] - 1.0
            r["loss_final_ratio_vs_peft"] = r["loss_last"] / base["loss_last"]
            r["same_model_as_peft"] = bool(abs(r["loss_final_ratio_vs_peft"] - 1.0) <= 0.005)
    ours = [r for r in rows if "speed_vs_peft" in r and "fused" in r]           # flashtune's ablation rows
    ok = [r for r in ours if r.get("memory_vs_peft", 0) <= 0.6]
    best = max(ok or ours, key=lambda r: r["speed_vs_peft"], default=None)
    if best:
        result["peft"]["best"] = {"name": best["name"], "speed_vs_peft": best["speed_vs_peft"],
                                  "memory_vs_peft": best.get("memory_vs_peft"),
                                  "meets_target": bool(best["speed_vs_peft"] >= 2.0
                                                       and best.get("memory_vs_peft", 1) <= 0.6)}
    fastest = max(ours, key=lambda r: r["speed_vs_peft"], default=None)
    liger = next((r for r in rows if r.get("name") == "HF PEFT + Liger" and "tokens_per_s" in r), None)
    if liger and fastest:
        result["peft"]["vs_liger"] = {
            "liger_speed_vs_peft": liger["speed_vs_peft"], "liger_memory_vs_peft": liger.get("memory_vs_peft"),
            "fastest_flashtune": fastest["name"],
            "speed_vs_liger": fastest["tokens_per_s"] / liger["tokens_per_s"],
            "memory_vs_liger": (fastest["peak_gib"] / liger["peak_gib"]
                                if fastest.get("peak_gib") and liger.get("peak_gib") else None)}
    prec = {r["precision"]: r for r in result["precision"]["rows"] if "step_ms" in r}
    if "fp32" in prec:
        for p in ("bf16", "fp16"):
            if p in prec:
                prec[p]["speedup_vs_fp32"] = prec["fp32"]["step_ms"] / prec[p]["step_ms"]
                prec[p]["loss_rel_diff_vs_fp32"] = (prec[p]["loss_last4_mean"] / prec["fp32"]["loss_last4_mean"]
                                                    - 1.0)


ROWS = ("peft", "liger", "unsloth", "flashtune")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks every code path in seconds")
    ap.add_argument("--out", help="result JSON (default bench/results/train.json; a temp file with --smoke)")
    ap.add_argument("--part", choices=["all", "peft", "precision"], default="all")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"rows of the peft part, comma-separated from {','.join(ROWS)} (default: all)")
    ap.add_argument("--only", nargs="*", help="run only the flashtune rows whose names contain these words")
    ap.add_argument("--budget-s", type=float, default=225, help="skip rows that would start after this")
    ap.add_argument("--worker", choices=["liger"], help=argparse.SUPPRESS)    # one peer row in this process
    args = ap.parse_args(argv)
    rows = set(args.rows.split(","))
    if rows - set(ROWS):
        ap.error(f"--rows: unknown {sorted(rows - set(ROWS))}; choose from {','.join(ROWS)}")
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    shape = SHAPE_SMOKE if smoke else SHAPE_1B
    args.batch, args.seq, args.rank = (2, 64, 4) if smoke else (4, 2048, 16)
    args.warm, args.timed = (1, 2) if smoke else (3, 6)
    args.precision_steps = 4 if smoke else 24
    args.compile_backend = "eager" if smoke else "inductor"
    if smoke:
        args.budget_s = float("inf")
    if args.worker:   # the same rows and batches as the parent's PEFT row; the row goes to --out
        data = random_rows(args.batch * (args.warm + args.timed), args.seq, shape["vocab_size"])
        row = liger_row(args, shape, device, data)
        Path(args.out).write_text(json.dumps(row))
        return row
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "train.json" if smoke
                                           else ROOT / "bench/results/train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = {"bench": "train", "smoke": smoke, "env": {**environment(device), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
              "shape": {**shape, "batch": args.batch, "seq": args.seq, "lora_r": args.rank,
                        "lora_targets": PROJECTIONS},
              "peft": {"rows": [], "warm_steps": args.warm, "timed_steps": args.timed},
              "precision": {"rows": [], "steps": args.precision_steps}}

    def save():
        summarize(result)
        result["wall_s"] = time.perf_counter() - t_start
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

    def attempt(section, label, fn):
        if time.perf_counter() - t_start > args.budget_s:
            result[section]["rows"].append({"name": label, "skipped": f"over the {args.budget_s:.0f}s budget"})
            print(f"[skip] {label}: over budget", flush=True)
            return
        t0 = time.perf_counter()
        try:
            row = fn()
            row["wall_s"] = time.perf_counter() - t0
            print(f"[ok] {label}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in row.items() if k != "loss_curve"), flush=True)
        except (KeyboardInterrupt, TrainingInterrupted):
            result[section]["rows"].append({"name": label, "error": "interrupted"})
            save()
            raise
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            row = {"name": label, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"[error] {label}: {row['error']}\n{traceback.format_exc()}", flush=True)
        reset_memory(device)
        result[section]["rows"].append(row)
        save()

    work = Path(tempfile.mkdtemp(prefix="flashtune-bench-train-"))
    # Order: PEFT and the eager flashtune rows, then precision, then the rows that compile (slowest to start).
    specs = [s for s in ABLATION if "flashtune" in rows
             and (not args.only or any(w in s["name"] for w in args.only))]
    try:
        if args.part in ("all", "peft"):
            data = random_rows(args.batch * (args.warm + args.timed), args.seq, shape["vocab_size"])
            if "peft" in rows:
                attempt("peft", "HF PEFT", lambda: peft_row(args, shape, device, data))
            if "liger" in rows:
                attempt("peft", "HF PEFT + Liger", lambda: isolated_row(args, "liger"))
            if "unsloth" in rows:
                attempt("peft", "unsloth", unsloth_row)
            for spec in [s for s in specs if not s["compile"]]:
                attempt("peft", spec["name"], lambda spec=spec: flashtune_row(args, shape, device, data, spec, work))
        if args.part in ("all", "precision"):
            text, source, n_tokens = text_rows(args.batch * args.precision_steps, args.seq, shape["vocab_size"])
            result["precision"].update(data=source, data_tokens=n_tokens)
            for precision in ("fp32", "bf16", "fp16"):
                attempt("precision", precision,
                        lambda p=precision: precision_row(args, shape, device, text, p, work))
        if args.part in ("all", "peft"):
            for spec in [s for s in specs if s["compile"]]:
                attempt("peft", spec["name"], lambda spec=spec: flashtune_row(args, shape, device, data, spec, work))
    finally:
        save()
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"out": str(out), "peft_best": result["peft"].get("best"),
                      "wall_s": round(result["wall_s"], 1)}), flush=True)
    return result


if __name__ == "__main__":
    main()
