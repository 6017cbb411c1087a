"""The UI-TARS agent loop (arXiv 2501.12326): screenshot -> model -> parsed actions -> executor, repeated.

Stops on `finished` (status "finished"), `call_user` ("call_user"), an answer that never parses
("parse_error"), an action the executor cannot perform ("error") or the step limit ("max_steps"). `wait()`
sleeps through the injectable `sleep` and takes a new screenshot. Everything is written to `out_dir`:
step_NNN.png (the screenshot the model saw), step_NNN_annotated.png (the actions drawn on it),
trajectory.json (raw responses, parsed actions, screen points, status) and report.html.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import asdict, dataclass

from flashtune.agent.client import EndpointError
from flashtune.agent.coords import MAX_PIXELS, MIN_PIXELS, VERSIONS
from flashtune.agent.parser import ActionParseError
from flashtune.agent.prompts import HISTORY_N, TEMPLATES, build_messages
from flashtune.agent.report import annotate, write_atomic, write_record
from flashtune.errors import FlashtuneError, check_choice, check_range


@dataclass
class AgentConfig:
    """How the loop talks to the model and paces the executor."""

    max_steps: int = 15
    model_version: str = "1.5"  # "1.5" (absolute, smart_resize frame) | "1.0" (relative 0-1000) | "doubao"
    template: str = "computer"
    language: str = "English"
    history_n: int = HISTORY_N  # screenshots sent per request, the current one included
    wait_seconds: float = 5.0  # what wait() sleeps
    settle_seconds: float = 0.5  # pause after each step's actions before the next screenshot
    resamples: int = 2  # retries at temperature 1 after an unparseable answer
    min_pixels: int = MIN_PIXELS  # must match the server's image processor
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        check_range("max_steps", self.max_steps, 1, integer=True)
        check_choice("model_version", self.model_version, VERSIONS)
        check_choice("template", self.template, tuple(k for k in TEMPLATES if k != "grounding"))
        check_range("history_n", self.history_n, 1, integer=True)
        check_range("wait_seconds", self.wait_seconds, 0)
        check_range("settle_seconds", self.settle_seconds, 0)
        check_range("resamples", self.resamples, 0, integer=True)
        check_range("min_pixels", self.min_pixels, 1, integer=True)
        check_range("max_pixels", self.max_pixels, self.min_pixels, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AgentConfig":
        return cls(**d)


def _image_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.size


def run_agent(task: str, client, executor, out_dir: str, config: AgentConfig | None = None,
              sleep=time.sleep, executor_name: str = "") -> dict:
    """Run one episode; returns the trajectory record (also written to out_dir/trajectory.json)."""
    config = config or AgentConfig()
    os.makedirs(out_dir, exist_ok=True)
    record = {"task": task, "config": config.to_dict(), "executor": executor_name, "status": "running",
              "steps": []}
    screenshots: list[bytes] = []
    responses: list[str] = []
    status = "max_steps"
    for index in range(config.max_steps):
        png = executor.screenshot()
        screenshots.append(png)
        shot = f"step_{index:03d}.png"
        write_atomic(os.path.join(out_dir, shot), png)
        width, height = _image_size(png)
        mapper = executor.mapper(width, height, config.model_version, min_pixels=config.min_pixels,
                                 max_pixels=config.max_pixels)
        entry: dict = {"index": index, "screenshot": shot, "screen_size": [width, height],
                       "scale_factor": mapper.scale_factor, "model_size": list(mapper.model_size)}
        record["steps"].append(entry)
        messages = build_messages(task, screenshots, responses, template=config.template,
                                  language=config.language, history_n=config.history_n)
        entry["images_sent"] = sum(1 for m in messages for part in m["content"]
                                   if isinstance(part, dict) and part.get("type") == "image_url")
        try:
            step, answers = client.predict(messages, resamples=config.resamples)
        except ActionParseError as exc:
            entry.update(responses=getattr(exc, "answers", []), error=str(exc))
            status = "parse_error"
            break
        except EndpointError as exc:
            entry["error"] = str(exc)
            status = "endpoint_error"
            break
        responses.append(step.raw)
        entry.update(responses=answers, thought=step.thought, reflection=step.reflection, summary=step.summary,
                     actions=[a.to_dict() for a in step.actions], action_strings=[str(a) for a in step.actions],
                     screen_points=[list(mapper.to_screen(*a.start.center, dialect=a.start.dialect))
                                    if a.start else None for a in step.actions])
        annotated = f"step_{index:03d}_annotated.png"
        write_atomic(os.path.join(out_dir, annotated), annotate(png, step.actions, mapper))
        entry["annotated"] = annotated
        terminal = step.terminal
        if terminal:
            status = terminal
            finished = next(a for a in step.actions if a.name == terminal)
            record["answer"] = finished.text
            break
        try:
            for action in step.actions:
                if action.name == "wait":
                    sleep(config.wait_seconds)
                else:
                    executor.execute(action, mapper)
        except FlashtuneError as exc:  # UnsupportedActionError, xdotool failures, ...
            entry["error"] = str(exc)
            status = "error"
            break
        write_record(out_dir, record)
        if config.settle_seconds:
            sleep(config.settle_seconds)
    record["status"] = status
    write_record(out_dir, record)
    return record
