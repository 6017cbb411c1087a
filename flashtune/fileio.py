"""Atomic file writes: every file flashtune writes goes through a temporary sibling and `os.replace`, so an
interrupted write never leaves half a file behind (the old file, if any, stays intact)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def umask() -> int:
    """The process's file-creation mask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)   # elsewhere: set and restore (the only portable way to read it)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode `mkdir` would give a new folder: 0o777 less the umask."""
    return 0o777 & ~umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it to `path` in one step.

    The file gets the mode a plain write would give it (an existing file's mode, else 0o666 less the umask),
    not the 0600 of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text is encoded as UTF-8) to `path` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    import json

    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Save `tensors` (contiguous CPU copies) as a safetensors file at `path` atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata or {}))


def output_dir(path: str | os.PathLike, option: str = "--out", create: bool = True) -> Path:
    """Check, before any work, that the output folder `path` can be written: with `create`, make it (and its
    parents) now; without, leave the disk as it is and probe the nearest folder that exists. One that cannot be
    made or written (a file in the way, a read-only file system, no permission) is a FlashtuneError naming
    `option`."""
    from flashtune.errors import FlashtuneError

    p = Path(path)
    try:
        if create:
            p.mkdir(parents=True, exist_ok=True)
            where = p
        else:
            where = next(a for a in (p, *p.absolute().parents) if a.exists())
            if not where.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(where))
        probe = tempfile.NamedTemporaryFile(dir=where, prefix=".flashtune-probe-")  # mode bits lie to root
        probe.close()
    except OSError as exc:
        raise FlashtuneError(f"cannot write to {option} {str(p)!r}: {exc.strerror or exc}; choose a folder you can "
                             f"write to") from None
    return p


def output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check now, before any work, that the file `path` can be written (its folder is made if missing); a folder
    at `path` or an unwritable place is a FlashtuneError naming `option`."""
    from flashtune.errors import FlashtuneError

    p = Path(path)
    if p.is_dir():
        raise FlashtuneError(f"{option} {str(p)!r} is a folder; give a file name, e.g. {str(p / 'result.json')!r}")
    output_dir(p.parent if str(p.parent) else ".", option=f"the folder of {option}")
    return p
