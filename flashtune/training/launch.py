"""`--nproc-per-node N`: start the same command again under torchrun (`python -m torch.distributed.run`).

PyTorch's elastic launcher starts the N workers, gives each RANK / WORLD_SIZE / LOCAL_RANK and a rendezvous,
watches them, and stops them all when one fails; flashtune adds nothing to that. This module only builds the
command line and replaces the current process with it:

    flashtune finetune --nproc-per-node 2 --config run.toml
      -> python -m torch.distributed.run --standalone --nproc-per-node 2 -m flashtune finetune --config run.toml

For several nodes, run torchrun yourself on each node with the rendezvous arguments (docs/training.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from flashtune.errors import ConfigError
from flashtune.training.distributed import STRATEGIES, launched

NPROC_FLAG = "--nproc-per-node"


def check_launch(nproc: int, strategy: str = "auto") -> None:
    """Raise ConfigError for a process count or strategy that cannot run here."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"{NPROC_FLAG}={nproc!r} must be a positive integer (processes on this node)")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy={strategy!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    import torch

    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        if nproc > torch.cuda.device_count():
            raise ConfigError(f"{NPROC_FLAG}={nproc} but this node has {torch.cuda.device_count()} GPU(s); "
                              f"use at most {torch.cuda.device_count()} (one process per GPU)")


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without `--nproc-per-node N` / `--nproc-per-node=N` (so the workers do not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == NPROC_FLAG:
            skip = True
        elif not a.startswith(NPROC_FLAG + "="):
            out.append(a)
    return out


def torchrun_command(nproc: int, args: Sequence[str], module: str | None = "flashtune") -> list[str]:
    """The torchrun command that runs `python -m <module> <args>` (or the script args[0]) in `nproc` workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", NPROC_FLAG, str(nproc)]
    return cmd + (["-m", module] if module else []) + strip_nproc(args)


def relaunch(nproc: int, argv: Sequence[str], strategy: str = "auto") -> None:
    """Replace this process by torchrun running `flashtune <argv>` on `nproc` workers (never returns).

    argv: the command's arguments after `flashtune` (sys.argv[1:]: `finetune ...`); `--nproc-per-node` is removed from them.
    Already inside torchrun (or nproc == 1 without torchrun asked for): returns without doing anything.
    """
    check_launch(nproc, strategy)
    if launched() or nproc == 1:
        return
    cmd = torchrun_command(nproc, list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
