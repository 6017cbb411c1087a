"""Distributed fine-tuning on two H200s: flashtune's fit under torchrun (DDP / FSDP2) against HF accelerate.

Cases (each one torchrun launch of this file as a worker; random weights, random tokens, bf16 autocast):
- lora-1gpu, lora-2gpu-ddp: LoRA r=16 on the seven projections of the 1.1B Llama shape (bf16 frozen base, fp32
  adapters), micro batch 4 x 2048 tokens per GPU; tokens/s over both GPUs and peak memory per GPU.
  Scaling = tokens/s on 2 / on 1 (target >= 1.9).
- full8b-2gpu-fsdp: full fine-tuning of the Llama-3-8B shape (8.0B parameters, fp32 master weights, AdamW:
  16 bytes/parameter before activations) with FSDP2 on 2 GPUs, 1 x 2048 tokens per GPU, every block
  checkpointed; tokens/s, memory per GPU, MFU = (6 N + 6 L d S) tokens/s / (989 TFLOP/s x GPUs) (H200 dense
  bf16 peak; the 6 L d S term is causal attention).
- lora-1gpu-fsdp, lora-2gpu-fsdp: the LoRA case under FSDP2 (on one GPU: the code path's check).
- full8b-1gpu: the same on one GPU, to show whether it fits (an OOM is recorded as such).
- accelerate-lora-2gpu (PEFT + accelerate DDP) and accelerate-full8b-2gpu-fsdp2 (accelerate's FSDP2 plugin,
  same wrapping per decoder layer, same mixed precision): the peer, in the same run, where accelerate imports.

NCCL's NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set for every launch.

    python3 bench/distributed.py                   # on nvidia-h200-x2: bench/results/distributed-h200x2.json
    python3 bench/distributed.py --tiny            # CPU dry run (gloo, tiny shapes, every case), temp output
    python3 bench/distributed.py --cases lora-1gpu # a subset (the one-GPU check)
    python3 bench/distributed.py --merge a.json b.json --out bench/results/distributed-h200x2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

SHAPE_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
SHAPE_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 989.0           # H200 SXM dense bf16

# name: (runner, shape, GPUs, strategy, micro batch, steps, warm-up steps not timed)
CASES = {
    "lora-1gpu": ("flashtune-lora", "1b", 1, "auto", 4, 12, 4),
    "lora-2gpu-ddp": ("flashtune-lora", "1b", 2, "ddp", 4, 12, 4),
    "lora-1gpu-fsdp": ("flashtune-lora", "1b", 1, "fsdp", 4, 12, 4),      # the FSDP2 + NCCL path on one GPU
    "lora-2gpu-fsdp": ("flashtune-lora", "1b", 2, "fsdp", 4, 12, 4),
    "full8b-2gpu-fsdp": ("flashtune-full", "8b", 2, "fsdp", 1, 8, 3),
    "full8b-1gpu": ("flashtune-full", "8b", 1, "auto", 1, 5, 2),
    "accelerate-lora-2gpu": ("accelerate-lora", "1b", 2, "ddp", 4, 12, 4),
    "accelerate-full8b-2gpu-fsdp2": ("accelerate-full", "8b", 2, "fsdp", 1, 8, 3),
}


# ------------------------------------------------------------------------------------------------- worker side
def build_model(shape: dict, dtype, device, seed: int = 0):
    """A random Llama of `shape` on `device`: built on the meta device, materialized, filled from `seed`.

    Same values on every rank. Much faster than transformers' own init for 8B parameters on the CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    # Draw on the GPU when there is one (8B normal samples on one CPU thread take minutes), copy to `device`.
    draw = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    g = torch.Generator(device=draw).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)                                           # RMSNorm gains
            else:
                p.copy_(torch.empty(p.shape, device=draw).normal_(0.0, 0.02, generator=g))
        rotary = model.model.rotary_emb                                # non-persistent buffers: recompute
        model.model.rotary_emb = type(rotary)(config=cfg, device=device)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).train()


def random_rows(n: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def gather_peaks(device) -> list[float] | None:
    """Peak allocated GiB of every rank (rank order)."""
    import torch.distributed as dist

    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if not dist.is_initialized():
        return [peak] if peak is not None else None
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, peak)
    return None if out[0] is None else out


def flops_per_token(shape: dict, n_params: int, seq: int) -> float:
    return 6 * n_params + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


def host_device(device):
    """Where a model too big for one GPU is built: the CPU when FSDP2 will shard it over several GPUs."""
    return torch.device("cpu") if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1 else device


def run_flashtune(case, shape, strategy, micro, steps, warm, seq, device, workdir):
    world = int(os.environ.get("WORLD_SIZE", 1))
    from flashtune.training import TrainConfig, fit
    from flashtune.tuners import LoraConfig, attach

    lora = case.startswith("flashtune-lora")
    if lora:
        model = build_model(shape, torch.bfloat16, device)
        attach(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS))
    else:       # full fine-tuning, fp32 master weights: on several GPUs built on the CPU, FSDP2 moves shards
        model = build_model(shape, torch.float32, host_device(device))
        model.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    data = random_rows(steps * micro * world, seq, shape["vocab_size"])
    cfg = TrainConfig(out_dir=str(workdir), precision="bf16", lr=1e-4, max_steps=steps, batch_size=micro,
                      grad_accum=1, log_every=1, save_every=0, strategy=strategy, overwrite=True,
                      gradient_checkpointing=0.0 if lora else 1.0, fused_lora=lora, ce_chunk_size=4096)
    result = fit(model, data, cfg, progress=False)
    times = [r["step_time_s"] for r in result.history[warm:] if "step_time_s" in r]
    step_s = statistics.median(times)
    tokens = micro * world * seq
    return {"n_params": n_params, "world": world, "tokens_per_step": tokens, "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens / step_s, "final_loss": result.history[-1]["loss"], "timed_steps": len(times)}


def run_accelerate(case, shape, strategy, micro, steps, warm, seq, device, workdir):
    """The peer: a plain loop under HF accelerate (DDP + PEFT LoRA, or its FSDP2 plugin for full fine-tuning)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    lora = case.startswith("accelerate-lora")
    kwargs = {"mixed_precision": "bf16" if device.type == "cuda" else "no", "cpu": device.type == "cpu"}
    if strategy == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
            activation_checkpointing=True, state_dict_type="SHARDED_STATE_DICT",
            mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    acc = Accelerator(**kwargs)
    if lora:
        import peft

        model = build_model(shape, torch.bfloat16, acc.device)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    else:
        model = build_model(shape, torch.float32, host_device(device))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, opt = acc.prepare(model, opt)
    world = acc.num_processes
    rows = random_rows(steps * micro * world, seq, shape["vocab_size"])
    times, loss = [], None
    for s in range(steps):
        mine = rows[(s * world + acc.process_index) * micro:(s * world + acc.process_index + 1) * micro]
        ids = torch.stack([r["input_ids"] for r in mine]).to(acc.device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with acc.autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warm:])
    tokens = micro * world * seq
    return {"n_params": n_params, "world": world, "tokens_per_step": tokens, "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens / step_s, "final_loss": float(loss), "timed_steps": len(times) - warm}


def worker(case: str, out: Path, tiny: bool) -> int:
    from flashtune.training import distributed

    runner, shape_name, _, strategy, micro, steps, warm = CASES[case]
    shape = SHAPE_TINY if tiny else {"1b": SHAPE_1B, "8b": SHAPE_8B}[shape_name]
    seq = 64 if tiny else 2048
    if tiny:
        steps, warm = 4, 1
    distributed.init("cpu" if tiny else "cuda")
    device = torch.device("cpu") if tiny else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"case": case, "shape": shape_name, "seq": seq, "micro_batch_per_gpu": micro, "strategy": strategy}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            fn = run_flashtune if runner.startswith("flashtune") else run_accelerate
            row.update(fn(runner, shape, strategy, micro, steps, warm, seq, device, Path(workdir)))
        row["peak_gib_per_gpu"] = gather_peaks(device)
        if not runner.endswith("lora"):
            flops = flops_per_token(shape, row["n_params"], seq) * row["tokens_per_s"]
            row["mfu"] = flops / (PEAK_TFLOPS * 1e12 * row["world"]) if device.type == "cuda" else None
    except torch.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0][:300])
    except ImportError as exc:
        row.update(status="skipped", error=f"{type(exc).__name__}: {exc}")
    if distributed.is_main():
        out.write_text(json.dumps(row))
    return 0


# --------------------------------------------------------------------------------------------- orchestrator side
def environment() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "nccl_nvls_enable": "0"}
    for mod in ("peft", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["gpu"] = None
    return info


def launch(case: str, tiny: bool, timeout: int) -> dict:
    from flashtune.training.launch import torchrun_command

    nproc = CASES[case][2]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        args = [str(Path(__file__).resolve()), "--worker", case, "--row", str(out)] + (["--tiny"] if tiny else [])
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if tiny else "8",
               "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(torchrun_command(nproc, args, module=None), env=env, capture_output=True,
                                  text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", f"over {timeout} s"
        row = json.loads(out.read_text()) if out.is_file() else {"case": case, "status": "failed", "rc": rc,
                                                                 "log_tail": tail}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def summarize(rows: dict) -> dict:
    def tps(name):
        r = rows.get(name, {})
        return r.get("tokens_per_s")

    out = {}
    if tps("lora-1gpu") and tps("lora-2gpu-ddp"):
        out["lora_scaling_2gpu"] = tps("lora-2gpu-ddp") / tps("lora-1gpu")
        out["lora_scaling_target_met"] = out["lora_scaling_2gpu"] >= 1.9
    if tps("full8b-2gpu-fsdp") and tps("accelerate-full8b-2gpu-fsdp2"):
        out["full8b_vs_accelerate"] = tps("full8b-2gpu-fsdp") / tps("accelerate-full8b-2gpu-fsdp2")
    if tps("lora-2gpu-ddp") and tps("accelerate-lora-2gpu"):
        out["lora_2gpu_vs_accelerate"] = tps("lora-2gpu-ddp") / tps("accelerate-lora-2gpu")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: gloo, tiny shapes, a temp result file")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--out", help="result JSON (default bench/results/distributed-h200x2.json)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per case")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine the rows of earlier result files "
                    "(runs split over several calls) into --out, with the summary; runs nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.row), args.tiny)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        result = {**parts[0], "rows": {k: v for part in parts for k, v in part["rows"].items()}}
        result["summary"] = summarize(result["rows"])
        out = Path(args.out or ROOT / "bench/results/distributed-h200x2.json")
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"], indent=1))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "distributed-tiny.json" if args.tiny
                                           else ROOT / "bench/results/distributed-h200x2.json")
    result = {"bench": "distributed", "tiny": args.tiny, "environment": environment(), "rows": {}}
    for case in cases:
        print(f"=== {case} {time.strftime('%H:%M:%S')}", flush=True)
        try:
            result["rows"][case] = launch(case, args.tiny, args.timeout)
        except Exception:  # noqa: BLE001 - one failing case does not stop the others
            result["rows"][case] = {"case": case, "status": "failed", "error": traceback.format_exc()[-1500:]}
        print(json.dumps(result["rows"][case])[:600], flush=True)
        result["summary"] = summarize(result["rows"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
