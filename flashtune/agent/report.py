"""Trajectory reports: each screenshot with its actions drawn on it (PIL), gathered in one HTML page."""

from __future__ import annotations

import html
import io
import json
import os

from flashtune.agent.actions import Action
from flashtune.agent.coords import CoordinateMapper
from flashtune.fileio import atomic_write_bytes as write_atomic  # noqa: F401 (re-exported for the loop and CLI)

COLORS = {"left": (230, 30, 30), "right": (30, 90, 230), "drag": (20, 160, 60), "scroll": (200, 120, 0),
          "key": (120, 0, 160)}


def _arrow(draw, x1, y1, x2, y2, color, width=4):
    import math

    draw.line([(x1, y1), (x2, y2)], fill=color, width=width)
    ang = math.atan2(y2 - y1, x2 - x1)
    for side in (-0.5, 0.5):
        draw.line([(x2, y2), (x2 - 16 * math.cos(ang + side), y2 - 16 * math.sin(ang + side))],
                  fill=color, width=width)


def annotate(png: bytes, actions: list[Action] | tuple[Action, ...], mapper: CoordinateMapper) -> bytes:
    """The screenshot with each action drawn at its screen position, as PNG bytes."""
    from PIL import Image, ImageDraw

    shot = Image.open(io.BytesIO(png)).convert("RGB")
    # a strip under the screenshot lists the actions, so labels never hide what was clicked
    img = Image.new("RGB", (shot.width, shot.height + 8 + 20 * len(actions)), (255, 255, 255))
    img.paste(shot, (0, 0))
    draw = ImageDraw.Draw(img)
    r = max(8, img.width // 100)
    for n, a in enumerate(actions, start=1):
        p = mapper.to_screen(*a.start.center, dialect=a.start.dialect) if a.start else None
        q = mapper.to_screen(*a.end.center, dialect=a.end.dialect) if a.end else None
        if a.start is not None and len(a.start.values) == 4:  # show the box the model chose
            (x1, y1), (x2, y2) = (mapper.to_screen(*a.start.values[i:i + 2], dialect=a.start.dialect)
                                  for i in (0, 2))
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=COLORS["left"], width=2)
        if a.name in ("drag", "select") or (a.name == "scroll" and q is not None):
            _arrow(draw, *p, *q, COLORS["drag"])
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], outline=COLORS["drag"], width=3)
        elif a.name == "scroll":
            p = p or (shot.width / 2, shot.height / 2)
            dx, dy = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[a.direction]
            _arrow(draw, *p, p[0] + dx * 6 * r, p[1] + dy * 6 * r, COLORS["scroll"])
        elif p is not None:
            color = COLORS["right"] if a.name == "right_single" else COLORS["left"]
            rings = 2 if a.name == "left_double" else 1
            for k in range(rings):
                rr = r + 6 * k
                draw.ellipse([p[0] - rr, p[1] - rr, p[0] + rr, p[1] + rr], outline=color, width=3)
            draw.line([(p[0] - 2 * r, p[1]), (p[0] + 2 * r, p[1])], fill=color, width=1)
            draw.line([(p[0], p[1] - 2 * r), (p[0], p[1] + 2 * r)], fill=color, width=1)
        if p is not None:  # the action's number next to its marker
            draw.rectangle([p[0] + r + 2, p[1] - r - 14, p[0] + r + 14, p[1] - r], fill=COLORS["key"])
            draw.text((p[0] + r + 5, p[1] - r - 13), str(n), fill=(255, 255, 255))
        draw.text((8, shot.height + 6 + 20 * (n - 1)), f"{n}. {a}", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_html(record: dict) -> str:
    """The HTML report for a trajectory record (see loop.run_agent); image paths are relative."""
    e = html.escape
    rows = []
    for s in record["steps"]:
        actions = "".join(f"<li><code>{e(a)}</code></li>" for a in s.get("action_strings", []))
        err = f"<p class=err>{e(s['error'])}</p>" if s.get("error") else ""
        tries = "".join(f"<li class=err>{e(a['reason'])}: {e(a['error'])}</li>" for a in s.get("attempts", []))
        if tries:
            err = f"<p>Answers sent back to the model, not executed:</p><ul>{tries}</ul>" + err
        if s.get("action_error"):
            fail = s["action_error"]
            err += f"<p class=err>Could not be performed (told to the model): {e(str(fail['action']))}: " \
                   f"{e(fail['error'])}</p>"
        if s.get("released"):
            err += f"<p>Released at the end of the step: {e(', '.join(s['released']))}</p>"
        err += _blocked(s.get("blocked"))
        img = s.get("annotated") or s["screenshot"]
        rows.append(f"""<section><h2>Step {s['index'] + 1}</h2>
<a href="{e(s['screenshot'])}"><img src="{e(img)}" alt="step {s['index'] + 1}"></a>
<div><p><b>Thought:</b> {e(s.get('thought', ''))}</p><ul>{actions}</ul>{err}
<details><summary>raw response</summary><pre>{e(chr(10).join(s.get('responses', [])))}</pre></details></div>
</section>""")
    error = f"<p class=err>{e(record['error'])}</p>" if record.get("error") else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>flashtune agent: {e(record['task'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:60vw;border:1px solid #999}}
section{{display:flex;gap:1.5em;margin-bottom:2em}} pre{{white-space:pre-wrap}} .err{{color:#b00}}</style>
</head><body><h1>{e(record['task'])}</h1>
<p>Status: <b>{e(record['status'])}</b> after {len(record['steps'])} step(s); model version
{e(record['config']['model_version'])}; executor {e(record.get('executor', ''))}.</p>
{_sandbox(record)}{_blocked(record.get("blocked"), " by the start page")}{error}
{''.join(rows)}
</body></html>
"""


def _blocked(targets, by: str = "") -> str:
    if not targets:
        return ""
    items = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in targets)
    return f"<p class=err>Requests{by} refused by the sandbox:</p><ul>{items}</ul>"


def _sandbox(record: dict) -> str:
    box = record.get("sandbox")
    if not box:
        return ""
    state = "on" if box.get("enabled") else "off"
    return f"<p>Chromium sandbox: {state} ({html.escape(str(box.get('reason', '')))}).</p>"


def write_record(out_dir: str, record: dict) -> None:
    write_atomic(os.path.join(out_dir, "trajectory.json"), json.dumps(record, indent=2, ensure_ascii=False))
    write_atomic(os.path.join(out_dir, "report.html"), render_html(record))
