"""The UI-TARS agent loop (arXiv 2501.12326): screenshot -> model -> parsed actions -> policy -> executor, repeated.

Each screenshot is resized on the client with `smart_resize` to the server's pixel budget before it is sent, so
the image the model sees is exactly the frame its coordinates are mapped from, on any screen size.

An answer that does not parse, a step the policy refuses (`policy.py`) or a step with an action the executor
lacks (open_app in a browser) is sent back to the model as an error message and asked again, at most
`resamples` times per step (at temperature 1, as OSWorld resamples); none of such a step's actions is executed.
An action that fails while it runs through the model's fault (`executors.base.ActionError`: a page that did not
load, a field that took no text) ends the step there; the next step's request tells the model what failed and
what ran before it; `resamples` + 1 such steps in a row end the run. Any other executor exception is the machine's
(a browser that crashed, a lost X connection) and ends the run. Keys held with press()/keydown() are released at
the end of every step.

Stops on `finished` (status "finished"), `call_user` ("call_user"), an answer that never parses ("parse_error"),
a step still refused after the retries ("refused"), actions the executor still cannot do after the retries
("action_error"), the same action proposed on an unchanged screenshot `stuck_after` times in a row ("stuck"), an
executor crash ("error"), an unreachable model server ("endpoint_error") or the step limit ("max_steps").
`wait()` sleeps through the injectable `sleep` and takes a new screenshot. Whatever happens, out_dir ends with
trajectory.json and report.html (so does a run that fails before its first step: `record_failed_start`); also
there: step_NNN.png (the full screenshot) and step_NNN_annotated.png (the actions drawn on it).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass

from flashtune.agent.actions import Action
from flashtune.agent.client import EndpointError
from flashtune.agent.coords import MAX_PIXELS, MIN_PIXELS, VERSIONS, check_pixels, smart_resize
from flashtune.agent.executors.base import ActionError, UnsupportedActionError
from flashtune.agent.parser import ActionParseError, parse_response
from flashtune.agent.policy import ACTION_SPACES, Policy, PolicyError
from flashtune.agent.prompts import HISTORY_N, build_messages
from flashtune.agent.report import annotate, write_atomic, write_record
from flashtune.errors import ConfigError, FlashtuneError, check_choice, check_range

BLOCKED_SHOWN = 50  # refused requests kept in the trajectory per step
STATUSES = ("finished", "call_user", "max_steps", "parse_error", "refused", "action_error", "stuck", "error",
            "endpoint_error", "interrupted")
FEEDBACK_CHARS = 2000  # how much of a rejected answer is repeated back to the model


@dataclass
class AgentConfig:
    """How the loop talks to the model, what the policy allows, and how the executor is paced."""

    max_steps: int = 15
    model_version: str = "1.5"  # "1.5" (absolute, smart_resize frame) | "1.0" (relative 0-1000) | "doubao"
    template: str = "computer"  # computer | mobile | browser (computer + navigate)
    language: str = "English"
    history_n: int = HISTORY_N  # screenshots sent per request, the current one included
    wait_seconds: float = 5.0  # what wait() sleeps
    settle_seconds: float = 0.5  # pause after each step's actions before the next screenshot
    resamples: int = 2  # retries per step after an unparseable or refused answer, the error sent back
    min_pixels: int = MIN_PIXELS  # the server's image processor budget: screenshots are resized to it
    max_pixels: int = MAX_PIXELS
    stuck_after: int = 3  # the same action on an unchanged screenshot this many times ends the run; 0: never
    start_url: str | None = None  # the policy's reference for allowed hosts (the executor opens it)
    allow_hosts: tuple[str, ...] = ()  # navigation allow-list; empty: the start URL's host and public hosts
    max_type_chars: int = 2000

    def __post_init__(self):
        check_range("max_steps", self.max_steps, 1, integer=True)
        check_choice("model_version", self.model_version, VERSIONS)
        check_choice("template", self.template, tuple(ACTION_SPACES))
        check_range("history_n", self.history_n, 1, integer=True)
        check_range("wait_seconds", self.wait_seconds, 0)
        check_range("settle_seconds", self.settle_seconds, 0)
        check_range("resamples", self.resamples, 0, integer=True)
        check_pixels(self.min_pixels, self.max_pixels)
        check_range("stuck_after", self.stuck_after, 0, integer=True)
        if self.stuck_after == 1:
            raise ConfigError("stuck_after=1 would stop at the first action; use 2 or more, or 0 to turn it off")
        self.allow_hosts = tuple(self.allow_hosts)
        self.policy()  # validates start_url, allow_hosts and max_type_chars

    def policy(self) -> Policy:
        return Policy(template=self.template, model_version=self.model_version, start_url=self.start_url,
                      allow_hosts=self.allow_hosts, max_type_chars=self.max_type_chars)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allow_hosts"] = list(self.allow_hosts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AgentConfig":
        return cls(**d)


def _decode(png: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB")


def model_image(png: bytes, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                image=None) -> tuple[bytes, tuple]:
    """The screenshot as the model should see it: resized (bicubic, as Qwen2-VL's processor) to
    smart_resize(h, w) within the server's pixel budget, so the server's processor leaves it as it is.
    `image`: the PNG already decoded (RGB), when the caller has it. Returns (PNG bytes, (width, height))."""
    im = image if image is not None else _decode(png)
    h, w = smart_resize(im.height, im.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) == im.size:
        return png, (w, h)
    from PIL import Image

    buf = io.BytesIO()
    im.resize((w, h), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue(), (w, h)


def _feedback(exc: FlashtuneError) -> str:
    nothing = "Nothing of that step was executed. " if isinstance(exc, (PolicyError, ActionError)) else ""
    return (f"Error: {exc}. {nothing}Answer again for the same screenshot in the format 'Thought: ...' then "
            "'Action: ...', using only the actions of the action space.")


def _action_feedback(exc: ActionError, executed: list[str]) -> str:
    done = f"These actions of it were executed first: {'; '.join(executed)}. " if executed else \
        "Nothing of it was executed. "
    return (f"Error: your last step's action {exc.action} could not be performed: {exc}. {done}"
            "This is the screen now; continue the task from here.")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


class LaunchError(FlashtuneError):
    """The run could not start; its folder still holds trajectory.json and report.html. `exit_code` is the
    cause's (2: the user's input, 3: a missing dependency, 1: the machine)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _new_record(task, config, policy, executor_name, sandbox) -> dict:
    return {"task": task, "config": config.to_dict(), "executor": executor_name, "status": "running",
            "policy": policy.to_dict(), "sandbox": sandbox, "steps": []}


def first_line(exc: BaseException) -> str:
    """A FlashtuneError's message, or the first line of any other exception (Playwright adds call logs)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0][:300] if lines else ""
    return text if isinstance(exc, FlashtuneError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _holds_run(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, "trajectory.json"))


def check_new_run_dir(out_dir: str, option: str = "--out") -> None:
    """Refuse a run folder that already holds a run (trajectory.json): a new run, or one that fails to start,
    would replace its trajectory, report and screenshots. Call before anything is written."""
    if _holds_run(out_dir):
        raise FlashtuneError(f"{option} {out_dir!r} already holds a run (trajectory.json); choose a new {option} "
                             "or remove the old run")


def record_failed_start(task: str, out_dir: str, exc: BaseException, config: AgentConfig | None = None,
                        executor_name: str = "", sandbox: dict | None = None) -> LaunchError:
    """For a run that failed before its first step (Chromium or Xvfb missing, a start URL that did not load):
    write out_dir/trajectory.json (status "error", or "interrupted" on ctrl-c, with the reason) and report.html,
    and return the one-line LaunchError to raise (exit code 2 for the user's input, 3 for a missing dependency,
    1 for anything else). A folder that already holds a run is left as it is (see `check_new_run_dir`)."""
    config = config or AgentConfig()
    record = _new_record(task, config, config.policy(), executor_name, sandbox)
    interrupted = isinstance(exc, KeyboardInterrupt)
    reason = "interrupted while starting" if interrupted else first_line(exc)
    record.update(status="interrupted" if interrupted else "error", stage="launch", error=reason)
    code = exc.exit_code if isinstance(exc, FlashtuneError) else 1
    if _holds_run(out_dir):  # another run's: keep it
        return LaunchError(f"the run could not start: {reason} (nothing written: {out_dir} holds another run)",
                           exit_code=code)
    os.makedirs(out_dir, exist_ok=True)
    write_record(out_dir, record)
    return LaunchError(f"the run could not start: {reason} (the run folder {out_dir} has trajectory.json and "
                       "report.html)", exit_code=code)


def run_agent(task: str, client, executor, out_dir: str, config: AgentConfig | None = None,
              sleep=time.sleep, executor_name: str = "") -> dict:
    """Run one episode; returns the trajectory record (also written to out_dir/trajectory.json)."""
    config = config or AgentConfig()
    policy = config.policy()
    os.makedirs(out_dir, exist_ok=True)
    record = _new_record(task, config, policy, executor_name, getattr(executor, "sandbox", None))
    status = "error"
    try:
        status = _episode(task, client, executor, out_dir, config, policy, sleep, record)
        if status == "endpoint_error":
            record["error"] = record["steps"][-1]["error"]
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except EndpointError as exc:
        record["error"] = str(exc)
        status = "endpoint_error"
    except Exception as exc:  # an executor crash (Playwright, xdotool, X11 ...): end cleanly with the files
        record["error"] = _one_line(exc)
        status = "error"
    finally:
        _note_blocked(executor, record)
        record["status"] = status
        write_record(out_dir, record)
    return record


def _note_blocked(executor, record: dict) -> None:
    """Requests the executor's sandbox refused (`executor.blocked`: the browser's request guard, the egress
    proxy) since the last call: onto the step whose actions were running, or the record itself before the
    first step (the start page). At most BLOCKED_SHOWN a place; `blocked_total` counts them all."""
    blocked = getattr(executor, "blocked", None) or ()
    new = blocked[record.get("blocked_total", 0):]
    if not new:
        return
    record["blocked_total"] = len(blocked)
    place = (record["steps"][-1] if record["steps"] else record).setdefault("blocked", [])
    place.extend(new[:max(0, BLOCKED_SHOWN - len(place))])


def _episode(task, client, executor, out_dir, config, policy, sleep, record) -> str:
    screenshots: list[bytes] = []  # as sent to the model
    responses: list[str] = []
    last_key, repeats = None, 0
    feedback = None  # what failed in the last step, told to the model with the next screenshot
    failures = 0  # steps in a row whose actions failed
    check = getattr(executor, "check", None)  # raises UnsupportedActionError before anything runs
    for index in range(config.max_steps):
        png = executor.screenshot()
        _note_blocked(executor, record)  # what the last step's actions (or the start page) tried
        shot = f"step_{index:03d}.png"
        write_atomic(os.path.join(out_dir, shot), png)
        image = _decode(png)
        sent, sent_size = model_image(png, config.min_pixels, config.max_pixels, image=image)
        screenshots.append(sent)
        width, height = image.size
        mapper = executor.mapper(width, height, config.model_version, min_pixels=config.min_pixels,
                                 max_pixels=config.max_pixels)
        entry: dict = {"index": index, "screenshot": shot, "screen_size": [width, height],
                       "image_sent_size": list(sent_size), "scale_factor": mapper.scale_factor,
                       "model_size": list(mapper.model_size), "responses": [], "attempts": [], "executed": []}
        record["steps"].append(entry)
        messages = build_messages(task, screenshots, responses, template=config.template,
                                  language=config.language, history_n=config.history_n)
        if feedback:  # the current screenshot follows the account of what failed
            messages[-1]["content"].insert(0, {"type": "text", "text": feedback})
            entry["feedback"] = feedback
        entry["images_sent"] = sum(1 for m in messages for part in m["content"]
                                   if isinstance(part, dict) and part.get("type") == "image_url")
        step = actions = error = None
        for attempt in range(config.resamples + 1):
            try:
                text = client.complete(messages, **({"temperature": 1.0} if attempt else {}))
            except EndpointError as exc:
                entry["error"] = str(exc)
                return "endpoint_error"
            entry["responses"].append(text)
            try:
                step = parse_response(text)
                actions = policy.check_step(step.actions, mapper)
                for action in actions if check else ():
                    check(action)
                break
            except (ActionParseError, PolicyError, UnsupportedActionError) as exc:
                step, error = None, exc
                entry["attempts"].append({"error": str(exc), "reason": exc.reason})
                messages = messages + [
                    {"role": "assistant", "content": [{"type": "text", "text": text[:FEEDBACK_CHARS]}]},
                    {"role": "user", "content": [{"type": "text", "text": _feedback(exc)}]}]
        if step is None:
            entry["error"] = str(error)
            return ("refused" if isinstance(error, PolicyError) else
                    "action_error" if isinstance(error, ActionError) else "parse_error")
        responses.append(step.raw)
        entry.update(thought=step.thought, reflection=step.reflection, summary=step.summary,
                     actions=[a.to_dict() for a in actions], action_strings=[str(a) for a in actions],
                     screen_points=[list(mapper.to_screen(*a.start.center, dialect=a.start.dialect))
                                    if a.start else None for a in actions])
        annotated = f"step_{index:03d}_annotated.png"
        write_atomic(os.path.join(out_dir, annotated), annotate(png, actions, mapper))
        entry["annotated"] = annotated
        terminal = step.terminal
        if terminal:
            record["answer"] = next(a for a in actions if a.name == terminal).text
            return terminal
        if config.stuck_after and any(a.name != "wait" for a in actions):
            key = (hashlib.sha256(image.tobytes()).hexdigest(), tuple(entry["action_strings"]))
            repeats = repeats + 1 if key == last_key else 1
            last_key = key
            if repeats >= config.stuck_after:
                entry["error"] = (f"stuck: the same action on an unchanged screenshot {repeats} times in a row; "
                                  "not executed again")
                return "stuck"
        else:
            last_key, repeats = None, 0
        feedback = None
        try:
            _execute(actions, executor, mapper, config, sleep, entry)
            failures = 0
        except ActionError as exc:  # the model's action could not be done: tell the model on the next step
            failures += 1
            entry["action_error"] = {"action": exc.action, "error": str(exc), "reason": exc.reason}
            if failures > config.resamples:
                entry["error"] = (f"{exc.action} could not be performed: {exc} ({failures} failing steps in a "
                                  "row)")
                return "action_error"
            feedback = _action_feedback(exc, entry["executed"])
        except FlashtuneError as exc:  # the machine's fault: xdotool failures, a lost display ...
            entry["error"] = str(exc)
            return "error"
        # once per step, when it is whole (a step that ends the run is written by run_agent); atomic, so a
        # crash leaves every step before this one readable
        write_record(out_dir, record)
        if config.settle_seconds:
            sleep(config.settle_seconds)
    return "max_steps"


def _execute(actions, executor, mapper, config, sleep, entry) -> None:
    """Perform one step's actions; keys still held at its end are released, also when an action fails."""
    held: list[str] = []
    failed = True
    try:
        for action in actions:
            try:
                if action.name == "wait":
                    sleep(config.wait_seconds)
                else:
                    executor.execute(action, mapper)
            except ActionError as exc:
                exc.action = exc.action or str(action)
                raise
            entry["executed"].append(str(action))
            if action.name in ("press", "keydown"):
                held.extend(k for k in action.keys if k not in held)
            elif action.name in ("release", "keyup"):
                held = [k for k in held if k not in action.keys]
        failed = False
    finally:
        if held:
            entry["released"] = list(reversed(held))
        for key in reversed(held):
            try:
                executor.execute(Action("release", text=key), mapper)
            except Exception:
                if not failed:
                    raise
