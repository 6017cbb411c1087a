"""The E2E NLG table-to-text task: meaning representations (MRs) in, one restaurant description out.

Data set paper: "The E2E Dataset: New Challenges For End-to-End Generation" (Novikova, Dušek, Rieser, 2017,
arXiv:1706.09254); cleaned release: "Semantic Noise Matters for Neural Natural Language Generation"
(Dušek, Howcroft, Rieser, INLG 2019, arXiv:1911.03905).

An MR is a list of `attribute[value]` pairs, e.g. `name[Blue Spice], eatType[coffee shop], area[city centre]`.
A CSV file has one row per human reference (columns `mr` and `ref`, others ignored); rows that share an `mr`
are alternative references for the same input and are grouped into one `E2EExample`.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from flashtune.errors import ConfigError, FlashtuneError

# The eight E2E attributes, in the order the data set writes them.
E2E_ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
_PAIR = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*")


@dataclass
class E2EExample:
    """One input and all its references. `mr`: the MR string; `refs`: one or more reference texts."""

    mr: str
    refs: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.mr, str) or not self.mr.strip():
            raise ConfigError("E2EExample.mr must be a non-empty string")
        if isinstance(self.refs, str):
            self.refs = [self.refs]
        self.refs = list(self.refs)

    def to_dict(self) -> dict:
        return {"mr": self.mr, "refs": list(self.refs)}

    @classmethod
    def from_dict(cls, d: dict) -> "E2EExample":
        return cls(mr=d["mr"], refs=list(d.get("refs", [])))


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """`"name[X], area[riverside]"` -> `[("name", "X"), ("area", "riverside")]`, in the order written."""
    pairs, pos = [], 0
    text = mr.strip()
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if not m:
            raise FlashtuneError(f"cannot parse meaning representation {mr!r} near position {pos}; "
                                 "expected comma-separated attribute[value] pairs")
        pairs.append((m.group(1), m.group(2).strip()))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise FlashtuneError(f"cannot parse meaning representation {mr!r}: expected ',' at position {pos}")
            pos += 1
    return pairs


def format_mr(pairs) -> str:
    """Inverse of `parse_mr`."""
    return ", ".join(f"{k}[{v}]" for k, v in pairs)


def default_e2e_path() -> Path:
    """$FLASHTUNE_E2E_DATA, else ../shared/data/e2e/devel-fixed.no-ol.csv relative to the repository root."""
    if os.environ.get("FLASHTUNE_E2E_DATA"):
        return Path(os.environ["FLASHTUNE_E2E_DATA"])
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data" / "e2e" / "devel-fixed.no-ol.csv"


def load_e2e_csv(path=None, limit: int | None = None) -> list[E2EExample]:
    """Read an E2E-format CSV (`mr`, `ref` columns) and group the references per MR.

    Examples keep the order in which each MR first appears; references keep file order. `limit` keeps the first
    `limit` distinct MRs. Raises FlashtuneError (one line) for a missing, empty, binary, non-UTF-8 or malformed
    file, or missing columns; a field may be of any size.
    """
    from flashtune.data.files import read_csv

    path = Path(path) if path is not None else default_e2e_path()
    if not path.is_file() and not path.is_dir():
        raise FlashtuneError(f"E2E data file {str(path)!r} does not exist; pass a path or set FLASHTUNE_E2E_DATA")
    if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        raise FlashtuneError(f"{path} is a {path.suffix} file, and the e2e task reads the E2E csv; for mr/ref "
                             f"columns in another file use --task file --format e2e, or drop --task to detect "
                             f"the format")
    table = read_csv(path, "E2E data file")
    if "mr" not in table.columns or "ref" not in table.columns:
        raise FlashtuneError(f"{path} has columns {table.columns}; an E2E csv needs the columns 'mr' and 'ref'")
    return examples_from_rows(table.rows, limit)


def examples_from_rows(rows, limit: int | None = None) -> list[E2EExample]:
    """Group rows with `mr` and `ref` strings into E2EExamples, one per distinct MR (first-appearance order;
    rows with an empty MR skipped, empty references dropped); `limit` keeps the first `limit` distinct MRs."""
    grouped: dict[str, list[str]] = {}
    for row in rows:
        mr = (row.get("mr") or "").strip()
        if not mr:
            continue
        if mr not in grouped:
            if limit is not None and len(grouped) >= limit:
                continue
            grouped[mr] = []
        ref = (row.get("ref") or "").strip()
        if ref:
            grouped[mr].append(ref)
    return [E2EExample(mr, refs) for mr, refs in grouped.items()]


def val_count(val_size, n: int, what: str) -> int:
    """How many of `n` distinct `what` (MRs, examples) a held-out split of `val_size` takes: a count, or a
    fraction in (0, 1) of n (at least 1); both sides must stay non-empty. ConfigError naming the fix."""
    if isinstance(val_size, float) and val_size >= 1 and val_size == int(val_size):
        val_size = int(val_size)  # 100.0 from a TOML file is a count
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"val_size={val_size!r} must be a count or a fraction in (0, 1)")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ConfigError(f"val_size={val_size!r} is out of range; a fraction must be in (0, 1)")
        n_val = max(1, round(val_size * n))
    else:
        n_val = val_size
    if not 0 < n_val < n:
        fix = (f"hold out fewer, e.g. --set data.val_size={max(1, n // 10)} or a fraction such as 0.1" if n > 1 else
               "give more data")
        raise ConfigError(f"val_size={val_size!r} is out of range: it must leave both sides non-empty ({n} distinct "
                          f"{what}); {fix}")
    return n_val


def split_by_mr(examples, val_size, seed: int = 0):
    """Split examples into (train, val) so that no MR is in both; `val_size` is a count or a fraction in (0, 1).

    Examples with the same MR (if the list was not grouped) go to the same side. The choice of validation MRs
    is a seeded permutation; both sides keep the input order.
    """
    mrs = list(dict.fromkeys(ex.mr for ex in examples))
    n_val = val_count(val_size, len(mrs), "MRs")
    order = list(range(len(mrs)))
    random.Random(seed).shuffle(order)
    val_mrs = {mrs[i] for i in order[:n_val]}
    train = [ex for ex in examples if ex.mr not in val_mrs]
    val = [ex for ex in examples if ex.mr in val_mrs]
    return train, val
