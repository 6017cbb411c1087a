"""The `flashtune` command. The only place that parses arguments and prints.

Each sub-command lives in its own module of this package and exposes `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flashtune.errors import FlashtuneError

# Modules that add sub-commands, in the order `--help` lists them. A module that is not there yet is skipped.
COMMAND_MODULES = ["finetune", "evaluate", "generate", "heads", "export", "demo", "agent"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashtune",
        description="Adapt transformer language models cheaply and run them fast.",
    )
    from flashtune import __version__

    parser.add_argument("--version", action="version", version=f"flashtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"flashtune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"flashtune.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv                       # what was asked, for commands that re-run themselves (torchrun)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FlashtuneError as exc:
        print(f"flashtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("flashtune: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        # a path the commands did not check first (a read-only folder, a file where a folder should be ...)
        print(f"flashtune: error: {exc.strerror or exc}: {exc.filename}; check the path and that you can "
              f"read or write it", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
