"""Grounding evaluation on ScreenSpot-style data (UI-TARS, arXiv 2501.12326; SeeClick's ScreenSpot and
ScreenSpot-Pro conventions).

A record names an image, an instruction and the target's box. Two box conventions exist:
- ScreenSpot: `bbox = [x, y, w, h]`;
- ScreenSpot-Pro: `bbox = [x1, y1, x2, y2]` plus `img_size = [w, h]`.
`bbox_format="auto"` picks xyxy when the record has `img_size`, else xywh. A prediction is a hit when its
point lies in the box with the edges included; an answer with no point counts as `wrong_format` (and a miss).
Accuracy is reported overall, per platform and per element type.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from flashtune.agent.coords import MAX_PIXELS, MIN_PIXELS, VERSIONS, CoordinateMapper, check_pixels
from flashtune.agent.parser import ActionParseError, parse_coord, parse_response
from flashtune.errors import ConfigError, check_choice

BBOX_FORMATS = ("auto", "xywh", "xyxy")


@dataclass(frozen=True)
class GroundingSample:
    image: str  # path to the screenshot
    instruction: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    platform: str = "unknown"
    element_type: str = "unknown"


def to_xyxy(bbox, fmt: str) -> tuple[float, float, float, float]:
    check_choice("bbox_format", fmt, BBOX_FORMATS[1:])
    x, y, a, b = (float(v) for v in bbox)
    return (x, y, x + a, y + b) if fmt == "xywh" else (x, y, a, b)


def point_in_box(x: float, y: float, box) -> bool:
    """Inclusive on every edge."""
    x1, y1, x2, y2 = box
    return x1 <= x <= x2 and y1 <= y <= y2


def load_samples(path: str, images_dir: str | None = None, bbox_format: str = "auto") -> list[GroundingSample]:
    """Read a ScreenSpot / ScreenSpot-Pro JSON list. Images are looked up in images_dir (default: the
    JSON file's folder)."""
    check_choice("bbox_format", bbox_format, BBOX_FORMATS)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read grounding data {path!r}: {exc}") from None
    except UnicodeDecodeError as exc:  # binary, or another encoding
        raise ConfigError(f"cannot read grounding data {path!r}: it is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); give a JSON list of records") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of records")
    base = images_dir or os.path.dirname(os.path.abspath(path))
    samples = []
    for i, r in enumerate(records):
        try:
            name, bbox, instruction = r["img_filename"], r["bbox"], r["instruction"]
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: record {i} needs img_filename, bbox and instruction") from None
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ConfigError(f"{path}: record {i} has bbox={bbox!r}; expected 4 numbers")
        fmt = bbox_format if bbox_format != "auto" else ("xyxy" if "img_size" in r else "xywh")
        samples.append(GroundingSample(
            image=os.path.join(base, name), instruction=instruction, box=to_xyxy(bbox, fmt),
            platform=str(r.get("platform") or r.get("data_source") or "unknown"),
            element_type=str(r.get("data_type") or r.get("ui_type") or "unknown")))
    return samples


def extract_point(text: str):
    """The `Coord` a grounding answer points at: the first action's start, or a bare coordinate."""
    try:
        step = parse_response(text)
        for a in step.actions:
            if a.start is not None:
                return a.start
        return None
    except ActionParseError:
        pass
    try:
        return parse_coord(text.strip())
    except ActionParseError:
        return None


def _bucket(table: dict, key: str, hit: bool) -> None:
    row = table.setdefault(key, {"n": 0, "correct": 0})
    row["n"] += 1
    row["correct"] += int(hit)


def image_sizes(samples: list[GroundingSample]) -> list[tuple[int, int]]:
    """(width, height) of each sample's image, read from the image headers. A missing image refuses the whole
    list (counted, the first one named); one that is not an image is named with its record."""
    from PIL import Image

    missing = [(i, s.image) for i, s in enumerate(samples) if not os.path.isfile(s.image)]
    if missing:
        i, path = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"image {path!r} of record {i}{more} not found; check img_filename in the data, or "
                          "--images (the image folder, default: the data file's folder)")
    sizes = []
    for i, s in enumerate(samples):
        try:
            with Image.open(s.image) as im:
                sizes.append(im.size)
        except (OSError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"image {s.image!r} of record {i} cannot be read as an image "
                              f"({' '.join(str(exc).split())[:200]}); replace it or drop the record") from None
    return sizes


def evaluate(samples: list[GroundingSample], answer_fn, model_version: str = "1.5", *, sizes=None,
             **mapper_kw) -> dict:
    """Score `answer_fn(sample) -> model text` on `samples`; returns the summary and one row per sample.
    The pixel budget (`mapper_kw`) and every image are checked before the first answer is asked for; `sizes`:
    what `image_sizes(samples)` returned, when the caller has checked them already."""
    check_choice("model_version", model_version, VERSIONS)
    check_pixels(mapper_kw.get("min_pixels", MIN_PIXELS), mapper_kw.get("max_pixels", MAX_PIXELS))
    sizes = image_sizes(samples) if sizes is None else sizes
    by_platform: dict = {}
    by_type: dict = {}
    rows = []
    wrong_format = 0
    for s, (width, height) in zip(samples, sizes):
        text = answer_fn(s)
        coord = extract_point(text)
        point = None
        if coord is None:
            wrong_format += 1
            hit = False
        else:
            mapper = CoordinateMapper(width, height, version=model_version, **mapper_kw)
            fw, fh = mapper.frame(coord.dialect)
            cx, cy = coord.center
            point = (cx * width / fw, cy * height / fh)  # not clamped: an off-screen answer is a miss
            hit = point_in_box(*point, s.box)
        _bucket(by_platform, s.platform, hit)
        _bucket(by_type, s.element_type, hit)
        rows.append({"image": os.path.basename(s.image), "instruction": s.instruction, "answer": text,
                     "point": point, "box": list(s.box), "hit": hit})
    for table in (by_platform, by_type):
        for row in table.values():
            row["accuracy"] = row["correct"] / row["n"]
    correct = sum(r["hit"] for r in rows)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0,
            "wrong_format": wrong_format, "by_platform": by_platform, "by_type": by_type, "rows": rows}
