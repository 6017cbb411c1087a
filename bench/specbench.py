"""Spec-Bench for flashtune's drafters: tokens a step, first-draft acceptance and speedup over the plain engine.

Benchmark: Spec-Bench (Xia et al., "Unlocking Efficiency in Large Language Model Inference: A Comprehensive
Survey of Speculative Decoding", arXiv 2401.07851): ../shared/data/spec_bench/question.dev.jsonl, 240 prompts
in 13 categories, never trained on. Each prompt's first turn goes through the target's chat template.

For every drafter given (EAGLE-3 always; Medusa / MTP when their heads folders are passed), at batch 1 and 8,
greedy and temperature 1, in the target's dtype (bf16 on CUDA): wall time of the same prompts with the plain
engine (measured in the same run, same settings), tokens per step (accepted drafts + 1), the share of steps
whose first draft was accepted, and the speedup (plain time / drafter time), per category and overall.
Every run reports the share of prompts whose output equals the plain engine's token for token
(greedy: 1.0 expected in fp32, and in bf16 with --invariant; at temperature 1 the same seed gives different
but identically distributed outputs, so the share is informative only for greedy).

    python bench/specbench.py --eagle runs/eagle3 [--medusa runs/medusa] [--mtp runs/mtp] \
        --out bench/results/specbench-h200.json
    python bench/specbench.py --eagle runs/eagle3 --train-eagle '{"steps": 600}' --medusa runs/medusa \
        --mtp runs/mtp --train-heads '{"steps": 300}'   # trains all three on the same Magpie data first
    python bench/specbench.py --eagle runs/eagle3 --per-category 1 --batch-sizes 1 --max-new-tokens 16  # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The prompts live beside the checkout (../shared/data/spec_bench/); on a machine without it (the GPU machine),
# carry the file and point $FLASHTUNE_SPECBENCH_DATA at it.
DATA = Path(os.environ.get("FLASHTUNE_SPECBENCH_DATA")
            or ROOT.parent / "shared" / "data" / "spec_bench" / "question.dev.jsonl")


def load_questions(path: Path, per_category: int | None) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if per_category:
        seen = defaultdict(int)
        keep = []
        for r in rows:
            if seen[r["category"]] < per_category:
                keep.append(r)
                seen[r["category"]] += 1
        rows = keep
    return rows


class FirstDraftCounter:
    """Wraps a drafter: counts, per row step, whether the first draft was accepted (acc.accepted >= 1).
    Counting reads no host value during generation (a device tensor accumulates)."""

    def __init__(self, inner):
        self.inner = inner
        self.counts = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def tree(self):
        return self.inner.tree

    @tree.setter
    def tree(self, value):
        self.inner.tree = value

    def start(self, engine, hidden, tokens, lengths, root):
        if self.counts is None:  # allocated once: captured CUDA graphs keep adding into this very tensor
            self.counts = torch.zeros(3, dtype=torch.long, device=root.device)
        return self.inner.start(engine, hidden, tokens, lengths, root)

    def propose(self, hidden, root):
        return self.inner.propose(hidden, root)

    def accept(self, hidden, tree_tokens, acc, path):
        a = acc.accepted
        self.counts.add_(torch.stack([torch.ones_like(a).sum(), (a >= 1).sum(), a.sum()]))
        return self.inner.accept(hidden, tree_tokens, acc, path)


def run(engine, prompts, batch, drafter, temperature, max_new, seed, stop):
    """(tokens per prompt, seconds, target steps per row summed, accepted first drafts, row steps)."""
    outs, steps_rows = [], 0.0
    if drafter is not None and drafter.counts is not None:
        with torch.inference_mode():  # made inside the engine's inference mode
            drafter.counts.zero_()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    made = 0
    for s in range(0, len(prompts), batch):
        chunk = prompts[s: s + batch]
        out = engine.generate(chunk, max_new_tokens=max_new, temperature=temperature, seed=seed + s,
                              stop_tokens=stop, speculative=drafter)
        outs += out.tokens
        n = sum(len(t) - 1 for t in out.tokens)
        made += n
        steps_rows += n / max(out.accepted_per_step, 1e-9)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    dt = time.perf_counter() - t0
    first = None
    if drafter is not None and drafter.counts is not None:
        c = drafter.counts.tolist()
        first = c[1] / max(1, c[0])
    return outs, dt, made, steps_rows, first


def train_heads(args, model, tokenizer, cuda: bool) -> dict:
    """Medusa-1 heads and an MTP module trained on the EAGLE-3 draft's data.jsonl (Magpie prompts, the target's
    greedy answers); returns their reports (summaries)."""
    from flashtune.recipes.heads import MedusaRecipe, MTPRecipe, train_medusa_heads, train_mtp_heads

    data = Path(args.eagle) / "data.jsonl"
    common = {"data": str(data), "num_prompts": 100000, "precision": "bf16" if cuda else "fp32",
              **json.loads(args.train_heads)}
    out = {}
    for name, folder, recipe, fn in (("medusa", args.medusa, MedusaRecipe, train_medusa_heads),
                                     ("mtp", args.mtp, MTPRecipe, train_mtp_heads)):
        if not folder or any(Path(folder).glob("*.safetensors")):
            continue
        report = fn(recipe(out_dir=folder, **common), model=model, tokenizer=tokenizer, progress=False)
        out[name] = {k: report.get(k) for k in ("examples", "final_loss", "head_top1", "depth_top1",
                                                "expected_tokens_per_step", "seconds_data", "seconds_train")}
        print(name, out[name], flush=True)
    model.eval()
    return out


def make_drafters(args, model, tokenizer):
    from flashtune.decoding.drafters.eagle import Eagle3Draft, Eagle3Drafter

    out = {}
    if args.eagle:
        draft = Eagle3Draft.load(args.eagle, model)
        out["eagle3-chain"] = Eagle3Drafter(draft, depth=args.chain_depth)
        out["eagle3-tree"] = Eagle3Drafter(draft, depth=args.tree_depth, topk=args.tree_topk, nodes=args.tree_nodes)
        out["eagle3-chain-sampled"] = Eagle3Drafter(draft, depth=args.chain_depth, temperature=1.0)  # T=1 only
        if args.reference_layer:  # the same drafters through the PyTorch layer (before the fused kernels)
            for name in ("eagle3-chain", "eagle3-tree"):
                ref = Eagle3Drafter(draft, depth=out[name].depth, topk=out[name].topk, nodes=out[name].nodes)
                ref.kernels = False
                out[name + "-pytorch-layer"] = ref
    if args.medusa:
        from flashtune.decoding import MedusaHeads

        p = next(model.parameters())
        out["medusa"] = MedusaHeads.load(args.medusa, device=p.device, dtype=p.dtype)
    if args.mtp:
        from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules

        out["mtp"] = MTPDrafter(MTPModules.load(args.mtp, model), k=args.mtp_k)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="")
    p.add_argument("--eagle", default="", help="an EAGLE-3 draft folder (train-heads --method eagle3)")
    p.add_argument("--train-eagle", default="", help="JSON of Eagle3TrainConfig fields: train a draft into "
                   "--eagle first (when that folder holds none yet)")
    p.add_argument("--medusa", default="")
    p.add_argument("--mtp", default="")
    p.add_argument("--train-heads", default="", help="JSON of head-recipe fields shared by Medusa and MTP (e.g. "
                   "steps): train each into --medusa / --mtp first (when that folder holds none yet), on the "
                   "EAGLE-3 recipe's data.jsonl, so that every drafter learns from the same prompts and answers")
    p.add_argument("--mtp-k", type=int, default=3)
    p.add_argument("--train-only", action="store_true", help="train what --train-eagle / --train-heads ask for, "
                   "write their reports beside --out (specbench-training.json) and stop")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--per-category", type=int, default=0, help="prompts per category (0: all 240)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chain-depth", type=int, default=5)
    p.add_argument("--tree-depth", type=int, default=6)
    p.add_argument("--tree-topk", type=int, default=8)
    p.add_argument("--tree-nodes", type=int, default=48)
    p.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-layer", action="store_true", help="also run the EAGLE-3 chain and tree through "
                   "the PyTorch draft layer (kernels=False), to measure what the fused layer gains")
    p.add_argument("--invariant", action="store_true", help="Engine(invariant=True): bf16 greedy speculative "
                   "output identical to plain greedy (CUDA, Triton backend)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "specbench-h200.json"))
    args = p.parse_args(argv)

    from flashtune.decoding import Engine
    from flashtune.decoding.drafters.eagle.synth import chat_prompt_ids, end_of_turn_ids
    from flashtune.fileio import atomic_write_json
    from flashtune.models import load_base_model

    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    model, tok = load_base_model(args.model or None, dtype=dtype)
    model.to("cuda" if cuda else "cpu").eval()
    qs = load_questions(Path(args.data), args.per_category or None)
    prompts = [chat_prompt_ids(tok, q["turns"][0]) for q in qs]
    cats = [q["category"] for q in qs]
    stop = end_of_turn_ids(tok)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    longest = max(len(x) for x in prompts)
    def new_engine():
        return Engine(model, tok, max_batch_size=max(batches), max_seq_len=longest + args.max_new_tokens + 80,
                      invariant=args.invariant)

    engine = new_engine()
    trained = None
    if args.train_eagle and args.eagle and not (Path(args.eagle) / "eagle3.safetensors").is_file():
        from flashtune.recipes.eagle import Eagle3TrainConfig, train_eagle3

        fields = {"out_dir": args.eagle, "precision": "bf16" if cuda else "fp32", **json.loads(args.train_eagle)}
        trained = train_eagle3(Eagle3TrainConfig(**fields), model, tok)
        print({k: trained[k] for k in ("heldout_step_accuracy", "heldout_tokens_per_step_chain5", "seconds_total")})
    heads_trained = train_heads(args, model, tok, cuda) if args.train_heads else {}
    if args.train_only:
        atomic_write_json(Path(args.out).with_name("specbench-training.json"),
                          {"eagle_training": trained, "heads_training": heads_trained})
        return {"eagle_training": trained, "heads_training": heads_trained}
    drafters = {k: FirstDraftCounter(v) for k, v in make_drafters(args, model, tok).items()}
    # one engine per drafter: a drafter whose step cannot be captured in a CUDA graph runs eagerly (and says so in
    # its rows) without taking the graphs of the plain engine or of the other drafters with it
    engines = {None: engine, **{name: new_engine() for name in drafters}}
    names = {id(d): name for name, d in drafters.items()}
    order = sorted(range(len(prompts)), key=lambda i: cats[i])  # category by category
    by_cat = defaultdict(list)
    for i in order:
        by_cat[cats[i]].append(i)
    # warm-up: graphs and kernels for every (drafter, batch) before timing
    for b in batches:
        for t in temps:
            for d in [None] + list(drafters.values()):
                run(engines[names.get(id(d))], [prompts[0]] * b, b, d, t, 8, 0, stop)
    rows = []
    import transformers

    def save(rows):
        result = {"benchmark": "spec-bench question.dev.jsonl, first turns", "command": " ".join(sys.argv),
                  "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                  "dtype": dtype, "torch": torch.__version__, "transformers": transformers.__version__,
                  "max_new_tokens": args.max_new_tokens, "invariant": args.invariant, "per_category": args.per_category or None,
                  "drafters": {"eagle3-chain": f"depth {args.chain_depth}",
                               "eagle3-tree": f"EAGLE-2 dynamic tree, depth {args.tree_depth}, topk "
                                              f"{args.tree_topk}, {args.tree_nodes} nodes",
                               "eagle3-chain-sampled": f"depth {args.chain_depth}, drafts sampled at T=1",
                               "*-pytorch-layer": "the same drafter through the PyTorch draft layer (dense mask "
                                                  "over the static cache) instead of the fused kernels"},
                  "note": "speedup = plain engine time per token / drafter time per token, same prompts, same "
                          "run; tokens_per_step and first_draft_acceptance count row steps of active rows",
                  "eagle_training": trained, "heads_training": heads_trained, "rows": rows}
        atomic_write_json(args.out, result)
        return result

    for b in batches:
        for t in temps:
            plain = {}
            for cat, idx in by_cat.items():
                ps = [prompts[i] for i in idx]
                plain[cat] = run(engine, ps, b, None, t, args.max_new_tokens, args.seed, stop)
            for name, d in drafters.items():
                if name.endswith("sampled") and t == 0:
                    continue
                tot = defaultdict(float)
                for cat, idx in by_cat.items():
                    ps = [prompts[i] for i in idx]
                    outs, dt, made, srows, first = run(engines[name], ps, b, d, t, args.max_new_tokens, args.seed,
                                                       stop)
                    p_outs, p_dt, p_made = plain[cat][:3]
                    row = {"drafter": name, "batch": b, "temperature": t, "category": cat, "prompts": len(ps),
                           "tokens": made, "tokens_per_step": made / max(srows, 1e-9),
                           "first_draft_acceptance": first, "seconds": dt, "plain_seconds": p_dt,
                           "plain_tokens": p_made, "speedup": (p_dt / max(p_made, 1)) / (dt / max(made, 1)),
                           "identical_to_plain": sum(a == b for a, b in zip(outs, p_outs)) / len(ps),
                           "cuda_graphs": engines[name]._graphs.all_captured,
                           "plain_cuda_graphs": engine._graphs.all_captured}
                    rows.append(row)
                    for k, v in (("tokens", made), ("steps", srows), ("seconds", dt), ("plain_seconds", p_dt),
                                 ("plain_tokens", p_made), ("first", (first or 0) * srows)):
                        tot[k] += v
                    tot["same"] += sum(a == b for a, b in zip(outs, p_outs))
                overall = {"drafter": name, "batch": b, "temperature": t, "category": "overall",
                           "prompts": len(prompts), "tokens": tot["tokens"],
                           "tokens_per_step": tot["tokens"] / max(tot["steps"], 1e-9),
                           "first_draft_acceptance": tot["first"] / max(tot["steps"], 1e-9),
                           "seconds": tot["seconds"], "plain_seconds": tot["plain_seconds"],
                           "speedup": (tot["plain_seconds"] / max(tot["plain_tokens"], 1))
                           / (tot["seconds"] / max(tot["tokens"], 1)),
                           "identical_to_plain": tot["same"] / len(prompts),
                           "cuda_graphs": engines[name]._graphs.all_captured,
                           "plain_cuda_graphs": engine._graphs.all_captured}
                rows.append(overall)
                save(rows)
                print(f"{name:22s} b={b} T={t}: {overall['tokens_per_step']:.2f} tok/step, first-draft "
                      f"{overall['first_draft_acceptance']:.2f}, {overall['speedup']:.2f}x, "
                      f"identical to plain {overall['identical_to_plain']:.2f}, graphs {overall['cuda_graphs']}",
                      flush=True)
    result = save(rows)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
