"""Reading a user's data file at the edge: decoded and checked here, every problem one `FlashtuneError` line
that names the file, what is wrong and the fix (never a UnicodeDecodeError, `_csv.Error` or parser traceback).

    text = read_text_file("notes.txt")                  # UTF-8 text, BOM dropped
    rows = read_rows("train.jsonl")                     # Rows: list of dicts, columns, where each row came from

Which reader parses what, and why:
- JSON Lines and JSON: Python's `json`, so an error names the line, and rows keep exactly the keys they have
  (a columnar reader fills missing keys with None, which chat templates read as "defined");
- CSV: Python's `csv`, strict: a row with more or fewer fields than the header is an error naming its line
  (pandas, under `datasets`' CSV builder, silently shifts such a row into an index column or drops fields);
  every value stays a string (no "1.50" -> 1.5); fields may be any size;
- Parquet files and Hub dataset names: Hugging Face `datasets`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flashtune.errors import FlashtuneError, MissingDependencyError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
_ICONV = "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"


@dataclass
class Rows:
    """The rows of a table file: `rows` (dicts), `columns` (in file order, the union over rows), `source`
    (the file or dataset name) and `where[i]`, how an error names row i ("line 7", "row 3")."""

    rows: list[dict]
    columns: list[str]
    source: str
    where: list[str] = field(default_factory=list)

    def at(self, i: int) -> str:
        return f"{self.source} {self.where[i] if i < len(self.where) else f'row {i + 1}'}"


def _check_file(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FlashtuneError(f"{what} {str(p)!r} does not exist; check the path")
    if p.is_dir():
        raise FlashtuneError(f"{what} {str(p)!r} is a folder; give a file "
                             f"({', '.join(sorted(SUFFIXES))})")
    return p


def _read_bytes(p: Path, what: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as exc:
        raise FlashtuneError(f"cannot read {what} {str(p)!r}: {exc.strerror or exc}; check its permissions") from exc


def decode_text(raw: bytes, source: str, what: str = "data file") -> str:
    """`raw` as UTF-8 text (a BOM dropped); FlashtuneError for empty, binary or non-UTF-8 content."""
    if not raw.strip():
        raise FlashtuneError(f"{what} {source!r} is empty; give it some data")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FlashtuneError(f"{what} {source!r} is UTF-16 text; re-save it as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise FlashtuneError(f"{what} {source!r} is a binary file (a NUL byte at offset {nul}), not text; "
                             f"give a UTF-8 text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise FlashtuneError(f"{what} {source!r} is not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); "
                             f"{_ICONV}") from None


def read_text_file(path, what: str = "data file") -> str:
    """The text of a UTF-8 file. One-line FlashtuneError when it is missing, a folder, unreadable, empty,
    binary or not UTF-8 (latin-1, UTF-16), naming the file and the fix."""
    p = _check_file(path, what)
    return decode_text(_read_bytes(p, what), str(p), what)


def read_jsonl(path, what: str = "data file") -> Rows:
    """One JSON object a line (blank lines skipped); an error names the first bad line."""
    p = _check_file(path, what)
    text = read_text_file(p, what)
    rows, where = [], []
    for n, line in enumerate(text.split("\n"), 1):   # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FlashtuneError(f"{what} {str(p)!r} line {n} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                 f"fix or remove that line") from None
        if not isinstance(obj, dict):
            raise FlashtuneError(f"{what} {str(p)!r} line {n} holds a JSON {type(obj).__name__}, not an object; "
                                 f'each line must be one object such as {{"text": "..."}}')
        rows.append(obj)
        where.append(f"line {n}")
    return Rows(rows, _columns(rows), str(p), where)


def read_json(path, what: str = "data file") -> Rows:
    """A JSON array of objects (a .json file that holds JSON Lines is read as such)."""
    p = _check_file(path, what)
    text = read_text_file(p, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":      # several top-level values: JSON Lines under a .json name
            return read_jsonl(p, what)
        raise FlashtuneError(f"{what} {str(p)!r} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                             f"{exc.colno}); fix the file") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FlashtuneError(f"{what} {str(p)!r} must hold a JSON array of objects ([{{\"text\": ...}}, ...]) "
                             f"or one object a line (JSON Lines)")
    return Rows(data, _columns(data), str(p), [f"item {i + 1}" for i in range(len(data))])


def read_csv(path, what: str = "data file", delimiter: str = ",") -> Rows:
    """A CSV file with a header row; every value a string; a row whose field count differs from the header's
    is an error naming its line."""
    p = _check_file(path, what)
    text = read_text_file(p, what)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))   # one field may be as large as the file
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            header = []
        header = [h.strip() for h in header]
        if not any(header):
            raise FlashtuneError(f"{what} {str(p)!r} has no header row; its first line must name the columns")
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise FlashtuneError(f"{what} {str(p)!r} names the column(s) {dup} twice; rename them")
        rows, where = [], []
        start = reader.line_num + 1
        for values in reader:
            if not values:                   # a blank line
                start = reader.line_num + 1
                continue
            if len(values) != len(header):
                raise FlashtuneError(f"{what} {str(p)!r} line {start} has {len(values)} fields but the header has "
                                     f"{len(header)}; quote fields that hold the delimiter {delimiter!r}")
            rows.append(dict(zip(header, values)))
            where.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as exc:
        raise FlashtuneError(f"{what} {str(p)!r} is not valid CSV near line {reader.line_num} ({exc}); "
                             f"check the quotes on that line") from None
    finally:
        csv.field_size_limit(limit)
    return Rows(rows, header, str(p), where)


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError("reading Parquet files and Hub datasets needs `datasets`; run: "
                                     "pip install datasets") from exc
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _from_dataset(ds, source: str) -> Rows:
    rows = ds.to_list()
    return Rows(rows, list(ds.column_names), source, [f"row {i + 1}" for i in range(len(rows))])


def read_parquet(path, what: str = "data file") -> Rows:
    """A Parquet file, through Hugging Face `datasets` (its cache in a temporary folder, removed after)."""
    p = _check_file(path, what)
    raw = _read_bytes(p, what)
    if not raw:
        raise FlashtuneError(f"{what} {str(p)!r} is empty; give it some data")
    if not (raw.startswith(b"PAR1") and raw.endswith(b"PAR1")):
        raise FlashtuneError(f"{what} {str(p)!r} is not a Parquet file (no PAR1 marker); check the file or its "
                             f"suffix")
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="flashtune-ds-") as cache:
        try:
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train", cache_dir=cache)
        except Exception as exc:   # pyarrow's many error types; the message is what the user needs
            msg = str(exc.__cause__ or exc).splitlines()[0] if str(exc.__cause__ or exc) else type(exc).__name__
            raise FlashtuneError(f"cannot read Parquet {what} {str(p)!r} ({msg}); check the file") from None
        return _from_dataset(ds, str(p))


def _hub_reachable(timeout: float = 5.0) -> bool:
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
           for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_hub(name: str, split: str = "train") -> Rows:
    """A dataset from the Hugging Face Hub (its `split`), through `datasets`; one line when it is offline or
    the name does not exist."""
    if not _hub_reachable():
        raise FlashtuneError(f"data {name!r} is not a local file, and the Hugging Face Hub is not reachable from "
                             f"this machine (offline); give a path to a .jsonl/.json/.csv/.parquet/.txt file")
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlashtuneError(f"cannot load dataset {name!r} (split {split!r}) from the Hub: {msg}; check the "
                             f"name, or give a local file") from None
    return _from_dataset(ds, name)


def read_rows(path, what: str = "data file") -> Rows:
    """The rows of a .jsonl/.json/.csv/.tsv/.parquet file, chosen by its suffix."""
    p = _check_file(path, what)
    kind = SUFFIXES.get(p.suffix.lower())
    readers = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet,
               "tsv": lambda q, w: read_csv(q, w, delimiter="\t")}
    if kind not in readers:
        raise FlashtuneError(f"{what} {str(p)!r} has the suffix {p.suffix or '(none)'!r}, which flashtune does "
                             f"not read; use one of {', '.join(sorted(SUFFIXES))}")
    return readers[kind](p, what)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))
