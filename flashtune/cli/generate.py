"""`flashtune generate`: generate text with the decoding engine, optionally with Medusa heads.

    flashtune generate --prompt "Tell me about Paris."
    flashtune generate --mr "name[Aromi], eatType[coffee shop], area[city centre]" --speculative medusa --heads runs/heads
    flashtune generate --prompt "Hi" --temperature 0.7 --top-p 0.9 --seed 1 --stream
"""

from __future__ import annotations

import argparse
import sys
import time

from flashtune.cli.export import Given, existing_dir, given
from flashtune.decoding.tree import MAX_TREE_NODES
from flashtune.errors import ConfigError
from flashtune.models import resolve_device

# The most new tokens generate asks for (the model's context is the tighter bound for every model it loads).
MAX_NEW_TOKENS = 1 << 20
_METHODS = ("medusa", "mtp", "parallel", "eagle3")
_DRAFT_TOKENS = {"mtp": 16, "eagle3": 32}  # what MTPDrafter (k) and Eagle3Drafter (depth) take


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text (static-cache engine; optional Medusa speculative decoding)",
        description="Generate from one or more prompts with flashtune's decoding engine. Greedy by default; "
                    "speculative decoding with Medusa heads is lossless (same output as without).",
        epilog="Train heads first: flashtune train-heads --method medusa --out runs/heads")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--mr", action="append", default=[], help="an E2E meaning representation, prompted as in training")
    p.add_argument("--raw", action="store_true", help="do not wrap --prompt in the chat template")
    p.add_argument("--model", default="", help="base model: local path or HF id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="a LoRA / prefix adapter folder (PEFT format) to apply")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help=f"1 to {MAX_NEW_TOKENS}, and prompt + new tokens within the model's context "
                        "(max_position_embeddings)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--speculative", choices=["none", "medusa", "mtp", "parallel", "eagle3"], default="none")
    p.add_argument("--heads", help="folder with Medusa heads, MTP modules or parallel heads (from train-heads); "
                                   "with --speculative")
    p.add_argument("--draft-tokens", type=int, default=3, action=Given,
                   help="tokens drafted per step (--speculative mtp: 1-16; eagle3: the draft depth, 1-32)")
    p.add_argument("--tree", default="saved", action=Given,
                   help="Medusa tree: 'saved' (the heads' own), 'auto' (time trees of 3-63 nodes built from the "
                        "heads' head_accuracy.json on this machine and keep the fastest, or plain decoding if "
                        f"no tree pays), or a node count N, 1-{MAX_TREE_NODES} (built from head_accuracy.json); "
                        "eagle3: N drafts EAGLE-2's tree of N nodes (default: a chain)")
    p.add_argument("--acceptance", choices=["lossless", "typical"], default="lossless",
                   help="speculative sampling rule: lossless (exact) or typical (Medusa's, lossy)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (first prompt only shown)")
    p.add_argument("--invariant", action="store_true",
                   help="batch-invariant kernels (CUDA, Llama family): bf16 output token-identical between plain "
                        "and speculative decoding and at any batch size, for slower plain steps (docs/decoding.md)")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    from flashtune.decoding import Engine, MedusaHeads
    from flashtune.models import load_base_model

    check_args(args)
    device = resolve_device(args.device)
    if args.invariant and device.type != "cuda":
        raise ConfigError("--invariant runs the engine's Triton kernels, which need a CUDA GPU; drop --invariant "
                          "(on the CPU, fp32 plain and speculative output agree anyway)")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tok = load_base_model(args.model or None, dtype=dtype)
    if args.adapter:
        from flashtune.tuners import load_adapter

        load_adapter(model, args.adapter)
    model.to(device).eval()
    from flashtune.data import encode_prompt, stop_token_ids
    prompts = []
    for text in args.prompt:
        if not args.raw and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            prompts.append(tok(text)["input_ids"])
    prompts += [encode_prompt(tok, mr) for mr in args.mr]
    heads = None
    if args.speculative == "medusa":
        heads = MedusaHeads.load(args.heads, device=device, dtype=model.dtype, model=model)
    elif args.speculative == "mtp":
        from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules

        heads = MTPDrafter(MTPModules.load(args.heads, model), k=args.draft_tokens)
    elif args.speculative == "parallel":  # n_heads - 1 drafts a step
        from flashtune.decoding.drafters.parallel import ParallelDrafter, ParallelHeads

        heads = ParallelDrafter(ParallelHeads.load(args.heads, model))
    elif args.speculative == "eagle3":  # a chain of --draft-tokens drafts, or EAGLE-2's tree with --tree N
        from flashtune.decoding.drafters.eagle import Eagle3Draft, Eagle3Drafter

        tree = int(args.tree) if args.tree.isdigit() else None
        heads = Eagle3Drafter(Eagle3Draft.load(args.heads, model),
                              depth=args.draft_tokens, topk=8 if tree else 1, nodes=tree)
    longest = max(len(p) for p in prompts)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and longest + args.max_new_tokens > context:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} with a {longest}-token prompt exceeds the model's "
                          f"context of {context} tokens (max_position_embeddings); lower --max-new-tokens to at "
                          f"most {max(1, context - longest)}")
    tree_nodes = heads.tree.num_nodes if heads is not None else 1
    if args.speculative == "medusa" and args.tree != "saved":  # room for the largest tree tried or asked for
        from flashtune.decoding.tree_tune import SIZES

        tree_nodes = 1 + (max(SIZES) if args.tree == "auto" else int(args.tree))
    engine = Engine(model, tok, max_batch_size=len(prompts), device=device,
                    max_seq_len=longest + args.max_new_tokens + tree_nodes + 8, invariant=args.invariant)
    if args.speculative == "medusa" and args.tree != "saved":
        heads = _choose_tree(heads, engine, args.heads, args.tree, len(prompts))
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_tokens=stop_token_ids(tok), speculative=heads,
              acceptance=args.acceptance)
    t0 = time.perf_counter()
    if args.stream:
        got = [[] for _ in prompts]
        for chunk in engine.stream(prompts, **kw):
            for b, new in enumerate(chunk):
                got[b] += new
            if chunk[0]:
                sys.stdout.write(tok.decode(chunk[0], skip_special_tokens=True))
                sys.stdout.flush()
        print()
        tokens, steps, per_step = got, None, None
        for text in [tok.decode(t, skip_special_tokens=True) for t in got[1:]]:
            print(text)
    else:
        out = engine.generate(prompts, **kw)
        tokens, steps, per_step = out.tokens, out.steps, out.accepted_per_step
        for text in out.texts:
            print(text)
    dt = time.perf_counter() - t0
    n = sum(len(t) for t in tokens)
    extra = f", {per_step:.2f} tokens/step over {steps} steps" if per_step is not None else ""
    print(f"[{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s{extra}]", file=sys.stderr)
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, before it loads: one line naming the option and the fix."""
    import math
    from pathlib import Path

    from flashtune.decoding.drafters.export import heads_files, saved_methods

    if not args.prompt and not args.mr:
        raise ConfigError("nothing to generate from; pass --prompt TEXT or --mr MR (repeatable)")
    spec = args.speculative
    if spec == "none" and args.heads:
        found = saved_methods(args.heads) if Path(args.heads).is_dir() else {}
        which = "|".join(found) if found else "|".join(_METHODS)
        raise ConfigError(f"--heads is used only with --speculative; add --speculative {which} (the method that "
                          "trained the heads), or drop --heads")
    if given(args, "draft_tokens") and spec not in _DRAFT_TOKENS:
        raise ConfigError(f"--draft-tokens applies to --speculative mtp or eagle3 only, not {spec}; drop "
                          "--draft-tokens")
    if given(args, "tree") and spec not in ("medusa", "eagle3"):
        raise ConfigError(f"--tree applies to --speculative medusa or eagle3 only, not {spec}; drop --tree")
    if spec != "none" and not args.heads:
        raise ConfigError(f"--speculative {spec} needs --heads DIR (train them with "
                          f"`flashtune train-heads --method {spec}`)")
    tree = args.tree
    if tree not in ("saved", "auto") and not (tree.isdigit() and int(tree) >= 1):
        raise ConfigError(f"--tree {tree!r} is not allowed; use saved, auto or a node count like 15")
    if tree.isdigit() and int(tree) > MAX_TREE_NODES:
        raise ConfigError(f"--tree {int(tree)} is too large; trees have at most {MAX_TREE_NODES} nodes "
                          "(typical: 15-63), or use --tree auto")
    if spec in _DRAFT_TOKENS and not 1 <= args.draft_tokens <= _DRAFT_TOKENS[spec]:
        raise ConfigError(f"--draft-tokens {args.draft_tokens} is out of range; --speculative {spec} drafts 1 to "
                          f"{_DRAFT_TOKENS[spec]} tokens a step")
    if spec == "eagle3" and tree == "auto":
        raise ConfigError("--tree auto times Medusa trees; for --speculative eagle3 pass --tree N (EAGLE-2's tree "
                          "of N nodes) or leave --tree out for a chain")
    if spec == "eagle3" and tree.isdigit():
        most = 8 + (args.draft_tokens - 1) * 64  # Eagle3Drafter(topk=8): K + (depth - 1) K^2
        if int(tree) > most:
            raise ConfigError(f"--tree {tree} is more nodes than {args.draft_tokens} levels of top-8 drafts hold "
                              f"({most}); lower --tree or raise --draft-tokens")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is out of range; give 1 to {MAX_NEW_TOKENS} "
                          "(and within the model's context)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k} must be >= 0 (0 = off)")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ConfigError(f"--top-p {args.top_p} must be in (0, 1] (1 = off)")
    if args.acceptance == "typical" and args.temperature == 0:
        raise ConfigError("--acceptance typical needs --temperature > 0; greedy decoding is always lossless")
    if spec != "none":
        d = existing_dir(args.heads, "--heads", f"a folder written by `flashtune train-heads --method {spec}`")
        found = saved_methods(d)
        if spec not in found:
            if found:
                raise ConfigError(f"--heads {args.heads!r} holds {' and '.join(found)} heads, not {spec}; pass "
                                  f"--speculative {next(iter(found))}")
            raise ConfigError(f"--heads {args.heads!r} holds no {spec} heads (no {heads_files()[spec][0]}); train "
                              f"them with `flashtune train-heads --method {spec} --out DIR`")
        if spec == "medusa" and tree != "saved" and not (d / "head_accuracy.json").is_file():
            raise ConfigError(f"--tree {tree} needs {d / 'head_accuracy.json'} (written by `flashtune train-heads "
                              "--method medusa`); pass --tree saved to use the heads' own tree")
    if args.adapter:
        from flashtune.tuners.io import read_adapter_config

        read_adapter_config(args.adapter)


def _choose_tree(heads, engine, heads_dir, tree: str, batch_size: int):
    """--tree auto | N for Medusa heads: a tree built from the saved head accuracies (None: decode plain)."""
    import json
    from pathlib import Path

    from flashtune.decoding.tree import build_tree
    from flashtune.decoding.tree_tune import tune_tree

    path = Path(heads_dir) / "head_accuracy.json"
    if not path.is_file():
        raise ConfigError(f"--tree {tree} needs {path} (written by `flashtune train-heads --method medusa`); "
                          "pass --tree saved to use the heads' own tree")
    acc = json.loads(path.read_text())
    if tree != "auto":
        heads.set_tree(build_tree(acc, int(tree), topk=heads.config.topk))
        return heads
    report = tune_tree(heads, engine, acc, batch_size=batch_size)
    rows = ", ".join(f"{r['nodes']}: {r['tokens_per_s']:.0f}" for r in report["rows"])
    if report["nodes"] == 0:
        print(f"[--tree auto: plain decoding is fastest here (expected tokens/s by tree nodes: {rows}); "
              "decoding without the heads]", file=sys.stderr)
        return None
    print(f"[--tree auto: {report['nodes']} nodes (expected tokens/s by tree nodes: {rows})]", file=sys.stderr)
    return heads
