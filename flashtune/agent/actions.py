"""Typed GUI actions of UI-TARS (arXiv 2501.12326, "UI-TARS: Pioneering Automated GUI Interaction with Native
Agents") and their rendering back to the model's own syntax.

An `Action` holds coordinates exactly as the model wrote them (model space, see `coords.py` for the mapping to
screen pixels) together with the dialect they were written in, so `parse_action(str(a)) == a`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# name -> (coordinate slots, string argument or None, whether the string argument is required)
# Coordinate slots: "start" (required), "start?" (optional), "end" (required), "end?" (optional).
SCHEMA: dict[str, tuple[tuple[str, ...], str | None, bool]] = {
    # desktop
    "click": (("start",), None, False),
    "left_single": (("start",), None, False),
    "left_double": (("start",), None, False),
    "right_single": (("start",), None, False),
    "hover": (("start",), None, False),
    "drag": (("start", "end"), None, False),
    "select": (("start", "end"), None, False),
    "hotkey": ((), "key", True),
    "press": ((), "key", True),
    "keydown": ((), "key", True),
    "release": ((), "key", True),
    "keyup": ((), "key", True),
    "type": (("start?",), "content", True),  # the training action space also writes type(content, start_box)
    "scroll": (("start?", "end?"), None, False),  # plus direction= (1.5); v1 mobile used start+end instead
    "wait": ((), None, False),
    "finished": ((), "content", False),
    "call_user": ((), None, False),
    # mobile
    "long_press": (("start",), None, False),
    "open_app": ((), "app_name", True),
    "press_home": ((), None, False),
    "press_back": ((), None, False),
    # browser extras accepted by the reference operators
    "navigate": ((), "content", True),
    "navigate_back": ((), None, False),
    "error_env": ((), None, False),
}

DIRECTIONS = ("up", "down", "left", "right")

# Coordinate dialects: how a coordinate was written inside its quotes.
#   paren       '(x,y)' or '(x1,y1,x2,y2)'
#   box_tokens  '<|box_start|>(x,y)<|box_end|>'
#   brackets    '[x1, y1, x2, y2]'           (desktop SDK prompt)
#   point_tag   '<point>x y</point>'         (Doubao prompt; keyword point= / start_point= / end_point=)
#   bbox_tag    '<bbox>x1 y1 x2 y2</bbox>'   (Doubao prompt)
DIALECTS = ("paren", "box_tokens", "brackets", "point_tag", "bbox_tag")


def _num(v: float) -> str:
    """A number as the model writes it: integers without a decimal point."""
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


@dataclass(frozen=True)
class Coord:
    """A point (2 values) or a box (4 values: x1, y1, x2, y2) in model space, with the dialect it came in."""

    values: tuple[float, ...]
    dialect: str = "paren"

    def __post_init__(self):
        if len(self.values) not in (2, 4):
            raise ValueError(f"a coordinate has 2 or 4 numbers, got {len(self.values)}")
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown coordinate dialect {self.dialect!r}")
        if self.dialect == "point_tag" and len(self.values) != 2:
            raise ValueError("<point> holds exactly 2 numbers")
        if self.dialect in ("bbox_tag", "brackets") and len(self.values) != 4:
            raise ValueError(f"{self.dialect} holds exactly 4 numbers")

    @property
    def center(self) -> tuple[float, float]:
        v = self.values
        if len(v) == 2:
            return float(v[0]), float(v[1])
        return (v[0] + v[2]) / 2, (v[1] + v[3]) / 2

    def render(self) -> str:
        v = [_num(x) for x in self.values]
        if self.dialect == "point_tag":
            return f"<point>{v[0]} {v[1]}</point>"
        if self.dialect == "bbox_tag":
            return f"<bbox>{' '.join(v)}</bbox>"
        if self.dialect == "brackets":
            return f"[{', '.join(v)}]"
        inner = f"({','.join(v)})"
        return f"<|box_start|>{inner}<|box_end|>" if self.dialect == "box_tokens" else inner


def escape(text: str) -> str:
    """Escape a string for a single-quoted argument: backslash, quotes and newlines."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"').replace("\n", "\\n")


@dataclass(frozen=True)
class Action:
    """One UI-TARS action. `text` is the string argument (content, key or app_name, per SCHEMA)."""

    name: str
    start: Coord | None = None
    end: Coord | None = None
    text: str | None = None
    direction: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())  # e.g. v1's long_press(time='')

    def __post_init__(self):
        if self.name not in SCHEMA:
            raise ValueError(f"unknown action {self.name!r}")
        slots, arg, required = SCHEMA[self.name]
        if "start" in slots and self.start is None:
            raise ValueError(f"{self.name} needs a start coordinate")
        if "end" in slots and self.end is None:
            raise ValueError(f"{self.name} needs an end coordinate")
        if self.start is not None and not ({"start", "start?"} & set(slots)):
            raise ValueError(f"{self.name} takes no coordinate")
        if self.end is not None and not ({"end", "end?"} & set(slots)):
            raise ValueError(f"{self.name} takes no end coordinate")
        if required and self.text is None:
            raise ValueError(f"{self.name} needs {arg}=")
        if self.text is not None and arg is None:
            raise ValueError(f"{self.name} takes no string argument")
        if self.direction is not None and (self.name != "scroll" or self.direction not in DIRECTIONS):
            raise ValueError(f"direction={self.direction!r} is only for scroll, one of {DIRECTIONS}")
        if self.name == "scroll" and self.direction is None and self.end is None:
            raise ValueError("scroll needs direction= (or an end coordinate, v1 mobile)")

    # -- views used by executors -------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        """hotkey/press/release keys, lower-cased and split on whitespace ('ctrl c' -> ['ctrl', 'c'])."""
        return (self.text or "").lower().split()

    @property
    def submits(self) -> bool:
        """A `type` whose content ends in a newline: the reference presses Enter after typing."""
        return self.name == "type" and (self.text or "").endswith("\n")

    def to_dict(self) -> dict:
        d: dict = {"action": self.name}
        for slot in ("start", "end"):
            c = getattr(self, slot)
            if c is not None:
                d[slot] = {"values": list(c.values), "dialect": c.dialect, "center": list(c.center)}
        if self.text is not None:
            d[SCHEMA[self.name][1]] = self.text
        if self.direction is not None:
            d["direction"] = self.direction
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    def __str__(self) -> str:
        args: list[str] = []
        for slot, c in (("start", self.start), ("end", self.end)):
            if c is None:
                continue
            if c.dialect == "point_tag":
                key = "point" if self.end is None else f"{slot}_point"
            else:
                key = f"{slot}_box"
            args.append(f"{key}='{c.render()}'")
        if self.text is not None:
            args.append(f"{SCHEMA[self.name][1]}='{escape(self.text)}'")
        if self.direction is not None:
            args.append(f"direction='{self.direction}'")
        args.extend(f"{k}='{escape(v)}'" for k, v in self.extra)
        return f"{self.name}({', '.join(args)})"


@dataclass(frozen=True)
class Step:
    """One parsed model response: the reasoning parts and the actions, in order."""

    actions: tuple[Action, ...]
    thought: str = ""
    reflection: str = ""
    summary: str = ""
    raw: str = ""

    @property
    def terminal(self) -> str | None:
        """'finished' or 'call_user' when the step ends the episode, else None."""
        for a in self.actions:
            if a.name in ("finished", "call_user"):
                return a.name
        return None

    def to_dict(self) -> dict:
        return {
            "thought": self.thought,
            "reflection": self.reflection,
            "summary": self.summary,
            "actions": [a.to_dict() for a in self.actions],
            "raw": self.raw,
        }

    def render(self) -> str:
        """The step in the model's output format (what `parse_response` reads back)."""
        parts = []
        if self.reflection:
            parts.append(f"Reflection: {self.reflection}")
        if self.summary:
            parts.append(f"Action_Summary: {self.summary}")
        if self.thought:
            parts.append(f"Thought: {self.thought}")
        parts.append("Action: " + "\n\n".join(str(a) for a in self.actions))
        return "\n".join(parts)
