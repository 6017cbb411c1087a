"""What every executor shares: key names, and the translation of a parsed action into a backend's primitives.

A backend implements a few primitives in its own input units (CSS pixels for Playwright, screen pixels for
X11): `click`, `move`, `drag`, `type_text`, `line_break` (or `paste_text` for text with newlines), `hotkey`,
`key_down`, `key_up`, `scroll`, `long_press`, and optionally `navigate` / `go_back`. `perform` maps model
coordinates through a `CoordinateMapper` first.
"""

from __future__ import annotations

from flashtune.agent.actions import Action
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.keys import NAMED_KEYS, normalize_key  # noqa: F401 (re-exported)
from flashtune.errors import FlashtuneError

SCROLL_CLICKS = 5  # the reference scrolls pyautogui.scroll(+-5)


class ActionError(FlashtuneError):
    """The model's action could not be done, through no fault of the machine (a page that refused the
    navigation, a field that took no text ...). The loop sends it back to the model to try again; any other
    exception an executor raises is the machine's (a browser that crashed, a lost X connection) and ends the run
    with status `error`. `action` names the action once the loop knows it."""

    reason = "action_failed"
    action: str | None = None


class UnsupportedActionError(ActionError):
    """The executor cannot perform this action (e.g. open_app in a browser)."""

    reason = "unsupported_action"


# actions every backend performs; navigate and navigate_back/press_back need backend.navigate / go_back
_PERFORMED = frozenset({"click", "left_single", "left_double", "right_single", "hover", "drag", "select", "scroll",
                        "type", "hotkey", "press", "keydown", "release", "keyup", "long_press", "wait", "finished",
                        "call_user"})
_NEEDS = {"navigate": "navigate", "navigate_back": "go_back", "press_back": "go_back"}


def check_supported(action: Action, backend) -> None:
    """Raise UnsupportedActionError unless `perform` can do `action` on `backend` (checked before a step runs,
    so a step with an action the executor lacks is sent back to the model with nothing of it executed)."""
    name = action.name
    if name in _PERFORMED or (name in _NEEDS and hasattr(backend, _NEEDS[name])):
        return
    raise UnsupportedActionError(f"the {type(backend).__name__} executor cannot perform {name}()")


def split_typed_text(text: str) -> tuple[list[str], bool]:
    """'ab\\ncd\\n' -> (['ab', '\\n', 'cd'], True).

    Only a trailing newline means "submit" in the UI-TARS templates ("use \\n at the end of content"); a newline
    inside the content is a line break, typed without pressing Enter, so a form is never submitted early.
    """
    submit = text.endswith("\n")
    body = text[:-1] if submit else text
    out: list[str] = []
    for i, chunk in enumerate(body.split("\n")):
        if i:
            out.append("\n")
        if chunk:
            out.append(chunk)
    return out, submit


def perform(action: Action, mapper: CoordinateMapper, backend, scroll_clicks: int = SCROLL_CLICKS) -> None:
    """Execute one non-terminal action on `backend`. wait/finished/call_user are the loop's business."""
    check_supported(action, backend)
    name = action.name

    def point(coord):
        return mapper.coord_center_to_input(coord)

    if name in ("click", "left_single"):
        backend.click(*point(action.start), button="left", count=1)
    elif name == "left_double":
        backend.click(*point(action.start), button="left", count=2)
    elif name == "right_single":
        backend.click(*point(action.start), button="right", count=1)
    elif name == "hover":
        backend.move(*point(action.start))
    elif name in ("drag", "select"):
        backend.drag(*point(action.start), *point(action.end))
    elif name == "scroll":
        if action.direction is None:  # v1 mobile: a swipe from start to end
            backend.drag(*point(action.start), *point(action.end))
            return
        if action.start is not None:
            x, y = point(action.start)
        else:
            x, y = mapper.width / 2 / mapper.scale_factor, mapper.height / 2 / mapper.scale_factor
        backend.scroll(x, y, action.direction, scroll_clicks)
    elif name == "type":
        if action.start is not None:  # type(content=..., start_box=...): focus the field first
            backend.click(*point(action.start), button="left", count=1)
        chunks, submit = split_typed_text(action.text)
        if "\n" in chunks and getattr(type(backend), "paste_text", None):  # X11: paste, as the reference does
            backend.paste_text("".join(chunks))
            chunks = []
        for chunk in chunks:
            if chunk == "\n":
                backend.line_break()
            else:
                backend.type_text(chunk)
        if submit:
            backend.hotkey(["enter"])
    elif name == "hotkey":
        backend.hotkey([normalize_key(k) for k in action.keys])
    elif name in ("press", "keydown"):
        for k in action.keys:
            backend.key_down(normalize_key(k))
    elif name in ("release", "keyup"):
        for k in reversed(action.keys):
            backend.key_up(normalize_key(k))
    elif name == "long_press":
        backend.long_press(*point(action.start), seconds=1.0)
    elif name == "navigate":
        backend.navigate(action.text)
    elif name in ("navigate_back", "press_back"):
        backend.go_back()
