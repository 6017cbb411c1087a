"""Emit pyautogui code for parsed UI-TARS actions, as the reference `parsing_response_to_pyautogui_code` does
(UI-TARS, arXiv 2501.12326). Strings only: pyautogui is not imported here.

Kept from the reference: points are the coordinate's centre in screenshot pixels, rounded to 3 decimals;
typing pastes through pyperclip (or `write` with input_swap=False) and a trailing newline presses Enter;
several actions are joined with `time.sleep(1)`; finished -> "DONE". Fixed on purpose: scroll left/right
emit `pyautogui.hscroll` (the reference emits nothing), wait -> "WAIT", call_user -> "FAIL" (OSWorld's reading).
"""

from __future__ import annotations

from flashtune.agent.actions import Action
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.executors.base import SCROLL_CLICKS, normalize_key

_PYAUTOGUI_KEYS = {"escape": "esc", "meta": "win"}


def _key(k: str) -> str:
    k = normalize_key(k)
    return _PYAUTOGUI_KEYS.get(k, k)


def to_pyautogui(actions: list[Action] | tuple[Action, ...], mapper: CoordinateMapper,
                 input_swap: bool = True) -> str:
    """Python source that performs `actions` with pyautogui on the screenshot's pixel grid."""
    names = [a.name for a in actions]
    for special, word in (("finished", "DONE"), ("call_user", "FAIL")):
        if special in names:
            return word
    if names and all(n == "wait" for n in names):
        return "WAIT"

    def pt(coord) -> str:
        x, y = mapper.to_screen(*coord.center, dialect=coord.dialect)
        return f"{round(x, 3)}, {round(y, 3)}"

    header = ["import pyautogui", "import time"]
    blocks: list[str] = []
    for a in actions:
        n = a.name
        if n in ("click", "left_single"):
            code = f"pyautogui.click({pt(a.start)}, button='left')"
        elif n == "left_double":
            code = f"pyautogui.doubleClick({pt(a.start)}, button='left')"
        elif n == "right_single":
            code = f"pyautogui.click({pt(a.start)}, button='right')"
        elif n == "hover":
            code = f"pyautogui.moveTo({pt(a.start)})"
        elif n in ("drag", "select"):
            code = f"pyautogui.moveTo({pt(a.start)})\npyautogui.dragTo({pt(a.end)}, duration=1.0)"
        elif n == "scroll" and a.direction is not None:
            where = f", x={pt(a.start).split(', ')[0]}, y={pt(a.start).split(', ')[1]}" if a.start else ""
            clicks = SCROLL_CLICKS if a.direction in ("up", "right") else -SCROLL_CLICKS
            fn = "scroll" if a.direction in ("up", "down") else "hscroll"
            code = f"pyautogui.{fn}({clicks}{where})"
        elif n == "type":
            text = a.text[:-1] if a.submits else a.text
            if input_swap:
                if "import pyperclip" not in header:
                    header.append("import pyperclip")
                code = f"pyperclip.copy({text!r})\npyautogui.hotkey('ctrl', 'v')\ntime.sleep(0.5)"
            else:
                code = f"pyautogui.write({text!r}, interval=0.1)"
            if a.submits:
                code += "\npyautogui.press('enter')"
            if a.start is not None:  # type(content=..., start_box=...): focus the field first
                code = f"pyautogui.click({pt(a.start)}, button='left')\n" + code
        elif n == "hotkey":
            code = f"pyautogui.hotkey({', '.join(repr(_key(k)) for k in a.keys)})"
        elif n in ("press", "keydown"):
            code = "\n".join(f"pyautogui.keyDown({_key(k)!r})" for k in a.keys)
        elif n in ("release", "keyup"):
            code = "\n".join(f"pyautogui.keyUp({_key(k)!r})" for k in a.keys)
        elif n == "wait":
            code = "time.sleep(5)"
        else:
            code = f"# unsupported action for pyautogui: {a}"
        blocks.append(code)
    return "\n".join(header) + "\n" + "\ntime.sleep(1)\n".join(blocks)
