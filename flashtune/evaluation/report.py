"""A run's report folder: metrics.json, samples.jsonl, loss.png, lr.png and a one-page summary.md.

Every file is written atomically (temporary file in the same folder, then `os.replace`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from flashtune.fileio import atomic_write_bytes


def write_json(path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _plot(path: Path, xs, ys, ylabel: str, title: str, extra=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(xs, ys, label=ylabel, lw=1.5)
    if extra:
        ex_x, ex_y, ex_label = extra
        ax.plot(ex_x, ex_y, "o-", label=ex_label, lw=1.5)
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _series(history, key):
    pts = [(row["step"], row[key]) for row in history
           if key in row and "step" in row and isinstance(row[key], (int, float)) and math.isfinite(row[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _sample_lines(s: dict) -> list[str]:
    lines = [f"- **input**: `{_md_escape(s.get('mr', ''))}`"]
    for key in [k for k in s if k.startswith("output")]:
        lines.append(f"  - *{key.replace('_', ' ')}*: {_md_escape(s[key])}")
    if s.get("slot_errors") is not None:
        lines.append(f"  - *slot errors*: {_md_escape(s['slot_errors'])}")
    refs = s.get("refs") or []
    if refs:
        lines.append(f"  - *reference*: {_md_escape(refs[0])}")
    return lines


def _slot_lines(metrics: dict) -> list[str]:
    """One sentence per stage on slot errors (flat or nested metrics), or nothing when they were not scored."""
    stages = metrics.items() if metrics and all(isinstance(v, dict) for v in metrics.values()) else [(None, metrics)]
    lines = []
    for stage, m in stages:
        if not isinstance(m, dict) or "slot_error_rate" not in m:
            continue
        lines.append(f"Slot errors{f' ({stage})' if stage else ''}: {m['slot_error_rate']:.2f}% of "
                     f"{m.get('slots_total', '?')} MR values (missing {m.get('slots_missing', '?')}, wrong value "
                     f"{m.get('slots_wrong', '?')}, added {m.get('slots_added', '?')}); "
                     f"{m.get('outputs_correct', 0.0):.1f}% of outputs say every value right.")
    return lines + [""] if lines else []


def write_report(out_dir, metrics: dict, samples: list[dict] | None = None, history: list[dict] | None = None,
                 title: str = "flashtune run", config: dict | None = None, n_samples: int = 5) -> Path:
    """Write the report folder and return the path of summary.md.

    metrics: flat {name: value} or nested {split_or_stage: {name: value}} (e.g. "before"/"after");
    samples: [{"mr", "output", "refs", "slot_errors"?, ...}] (all of them go to samples.jsonl, `n_samples` to
    the summary, then up to `n_samples` more of those with slot errors);
    history: training log rows with "step", "loss", "lr" (and eval metrics) for the curves.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {"metrics": metrics, "config": config or {}})
    if samples is not None:
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_bytes(out / "samples.jsonl", lines.encode())
    plots = []
    if history:
        xs, ys = _series(history, "loss")
        if xs:
            ex, ey = _series(history, "eval_loss")
            _plot(out / "loss.png", xs, ys, "loss", "training loss", (ex, ey, "eval loss") if ex else None)
            plots.append("loss.png")
        xs, ys = _series(history, "lr")
        if xs:
            _plot(out / "lr.png", xs, ys, "learning rate", "learning-rate schedule")
            plots.append("lr.png")

    md = [f"# {title}", ""]
    nested = metrics and all(isinstance(v, dict) for v in metrics.values())
    if nested:
        names = sorted({k for v in metrics.values() for k in v})
        md += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for stage, vals in metrics.items():
            md.append(f"| {stage} | " + " | ".join(_fmt(vals.get(n, "")) for n in names) + " |")
    else:
        md += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    md.append("")
    losses = [r for r in history or [] if isinstance(r.get("loss"), (int, float))]
    if losses:
        evals = [r for r in history if isinstance(r.get("eval_loss"), (int, float))]
        line = f"Training: {history[-1].get('step', '?')} steps, final training loss {_fmt(float(losses[-1]['loss']))}"
        line += f", validation loss {_fmt(float(evals[-1]['eval_loss']))}." if evals else "."
        md += [line, ""]
    for p in plots:
        md += [f"![{p[:-4]}]({p})", ""]
    md += _slot_lines(metrics)
    if samples:
        md += ["## Samples", ""]
        for s in samples[:n_samples]:
            md += _sample_lines(s)
        md.append("")
        wrong = [s for s in samples[n_samples:] if s.get("slot_errors") not in (None, "ok")]
        if wrong:
            md += [f"## Outputs with slot errors ({sum(s.get('slot_errors') not in (None, 'ok') for s in samples)} "
                   f"of {len(samples)}; the first {min(n_samples, len(wrong))} not shown above)", ""]
            for s in wrong[:n_samples]:
                md += _sample_lines(s)
            md.append("")
    if config:
        md += ["## Configuration", "", "```json", json.dumps(config, indent=2, ensure_ascii=False), "```", ""]
    md += ["Files: metrics.json, samples.jsonl" + "".join(f", {p}" for p in plots) + "."]
    atomic_write_bytes(out / "summary.md", ("\n".join(md) + "\n").encode())
    return out / "summary.md"
