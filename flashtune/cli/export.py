"""`flashtune export-heads`: write trained heads in the layouts serving engines load, or read such a folder back.

    flashtune export-heads --heads runs/medusa --format vllm --out runs/medusa-vllm
    flashtune export-heads --heads runs/mtp --format sglang --out runs/mtp-sglang     # MTP: the base model too
    flashtune export-heads --import runs/medusa-vllm --out runs/medusa-again          # back to flashtune's files
"""

from __future__ import annotations

import argparse
import contextlib

from flashtune.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-heads", help="export trained heads for vLLM / SGLang / speculators (or import them back)",
        description="Write heads from `flashtune train-heads` in a serving engine's layout (Medusa: vLLM; MTP: "
                    "DeepSeek-V3 names for vLLM and SGLang), or with --import read such a folder back.",
        epilog="Formats and their limits: docs/decoding.md")
    p.add_argument("--heads", help="a folder written by `flashtune train-heads`")
    p.add_argument("--import", dest="import_dir", help="a serving-layout folder to read back instead")
    p.add_argument("--format", choices=["vllm", "sglang", "speculators"], default="vllm", action=Given,
                   help="the serving layout to write (with --heads; default vllm)")
    p.add_argument("--out", required=True, help="a new or empty folder to write (a non-empty one is refused)")
    p.add_argument("--model", default="", help="the base model (MTP and parallel heads; default SmolLM2-135M)")
    p.set_defaults(func=main)


class Given(argparse.Action):
    """Stores an option's value as argparse's default action does, and records in `args.given` that the option
    was on the command line (so an option that does not apply is refused rather than ignored)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = set(getattr(namespace, "given", ())) | {self.dest}


def given(args: argparse.Namespace, dest: str) -> bool:
    return dest in getattr(args, "given", ())


def check_new_out(path, option: str = "--out", what: str = "a new or empty folder") -> None:
    """Refuse, before any work, an output folder that is a file or already holds files (writing there would
    replace or mix with what it holds). Nothing is created."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {str(p)!r} is a file, not a folder; choose {what}")
    if p.is_dir():
        try:
            full = next(p.iterdir(), None) is not None
        except OSError as exc:
            raise ConfigError(f"cannot read {option} {str(p)!r}: {exc.strerror or exc}; choose {what}") from None
        if full:
            raise ConfigError(f"{option} {str(p)!r} is not empty; choose {what} (flashtune does not write over "
                              "or into existing files)")


def existing_dir(path, option: str, fix: str):
    """The folder `path` as a Path, or one line saying it does not exist or is a file, and what to `fix` (pass)
    instead."""
    from pathlib import Path

    d = Path(path)
    if not d.is_dir():
        where = "does not exist" if not d.exists() else "is a file"
        raise ConfigError(f"{option} {path!r} {where}; pass {fix}")
    return d


@contextlib.contextmanager
def output_folder(path, option: str = "--out"):
    """Create and write-probe the output folder (fileio.output_dir: one line if it cannot be written) for the
    work in the `with` block; if that work fails, the folders this made are removed again while still empty."""
    from pathlib import Path

    from flashtune.fileio import output_dir

    p = Path(path).absolute()
    made = [q for q in (p, *p.parents) if not q.exists()]
    output_dir(path, option)
    try:
        yield Path(path)
    except BaseException:
        for q in made:  # deepest first; stops at the first folder the work left files in
            try:
                q.rmdir()
            except OSError:
                break
        raise


def main(args: argparse.Namespace) -> int:
    from flashtune.decoding.drafters.export import (CONFIG, check_exportable, check_one_method, export_heads,
                                                    heads_files, import_heads, load_heads, saved_methods)

    if bool(args.heads) == bool(args.import_dir):
        raise ConfigError("pass exactly one of --heads DIR (export) or --import DIR (read back)")
    option, src = ("--heads", args.heads) if args.heads else ("--import", args.import_dir)
    d = existing_dir(src, option, "a folder written by `flashtune train-heads`" if args.heads
                     else "a folder written by `flashtune export-heads`")
    medusa_config = heads_files()["medusa"][0]
    if args.heads:  # checked before the model loads: which heads, and whether the format serves them
        found = saved_methods(d)
        if not found:
            names = ", ".join(c for c, _ in heads_files().values())
            raise ConfigError(f"--heads {src!r} holds no heads (no {names}); pass a folder written by "
                              "`flashtune train-heads`")
        check_one_method(d, found)
        check_exportable(next(iter(found)), args.format)
        has_medusa_config = medusa_config in found.get("medusa", ())  # the scan above looked for it
    else:
        if given(args, "format"):
            raise ConfigError("--format applies to export (--heads) only; --import reads the layout from the "
                              "folder's config.json: drop --format")
        if not (d / CONFIG).is_file():
            raise ConfigError(f"--import {src!r} has no {CONFIG}; pass a folder written by `flashtune export-heads`")
        has_medusa_config = (d / medusa_config).is_file()
    check_new_out(args.out)
    with output_folder(args.out):
        model = None
        needs_model = not has_medusa_config and not _is_medusa_export(d)  # Medusa heads need no base model
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
