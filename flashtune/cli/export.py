"""`flashtune export-heads`: write trained heads in the layouts serving engines load, or read such a folder back.

    flashtune export-heads --heads runs/medusa --format vllm --out runs/medusa-vllm
    flashtune export-heads --heads runs/mtp --format sglang --out runs/mtp-sglang     # MTP: the base model too
    flashtune export-heads --import runs/medusa-vllm --out runs/medusa-again          # back to flashtune's files
"""

from __future__ import annotations

import argparse

from flashtune.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-heads", help="export trained heads for vLLM / SGLang / speculators (or import them back)",
        description="Write heads from `flashtune train-heads` in a serving engine's layout (Medusa: vLLM; MTP: "
                    "DeepSeek-V3 names for vLLM and SGLang), or with --import read such a folder back.",
        epilog="Formats and their limits: docs/decoding.md")
    p.add_argument("--heads", help="a folder written by `flashtune train-heads`")
    p.add_argument("--import", dest="import_dir", help="a serving-layout folder to read back instead")
    p.add_argument("--format", choices=["vllm", "sglang", "speculators"], default="vllm")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--model", default="", help="the base model (MTP and parallel heads; default SmolLM2-135M)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flashtune.decoding.drafters.export import export_heads, import_heads, load_heads

    if bool(args.heads) == bool(args.import_dir):
        raise ConfigError("pass exactly one of --heads DIR (export) or --import DIR (read back)")
    src = args.heads or args.import_dir
    model = None
    from pathlib import Path

    needs_model = not (Path(src) / "medusa_config.json").is_file() and not _is_medusa_export(Path(src))
    if needs_model:
        from flashtune.models import load_base_model

        model, _ = load_base_model(args.model or None, dtype="float32")
    if args.heads:
        drafter = load_heads(args.heads, model)
        export_heads(drafter, args.out, args.format, model)
        print(f"exported {type(drafter).__name__} for {args.format} to {args.out}")
    else:
        drafter = import_heads(args.import_dir, model)
        drafter.save(args.out)
        print(f"imported {type(drafter).__name__} to {args.out}")
    return 0


def _is_medusa_export(d) -> bool:
    import json

    try:
        return json.loads((d / "config.json").read_text()).get("model_type") == "medusa"
    except (OSError, ValueError, AttributeError):
        return False
