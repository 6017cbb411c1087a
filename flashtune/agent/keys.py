"""Key names the UI-TARS action space uses (arXiv 2501.12326: `hotkey(key='ctrl c')`, lower-case, space-separated,
at most 3 keys): one fixed list, shared by the parser (unknown keys are a parse error the model can fix), the
policy (chords that open OS or browser dialogs are refused) and the executors (their own key tables).
"""

from __future__ import annotations

from flashtune.errors import FlashtuneError

ALIASES = {
    "return": "enter", "esc": "escape", "control": "ctrl", "command": "meta", "cmd": "meta", "win": "meta",
    "windows": "meta", "super": "meta", "option": "alt", "del": "delete", "arrowup": "up", "arrowdown": "down",
    "arrowleft": "left", "arrowright": "right", "page_up": "pageup", "page_down": "pagedown", "pgup": "pageup",
    "pgdn": "pagedown", "spacebar": "space", "back": "backspace", "ins": "insert",
}
NAMED_KEYS = frozenset({
    "enter", "escape", "ctrl", "alt", "shift", "meta", "space", "tab", "backspace", "delete", "up", "down",
    "left", "right", "pageup", "pagedown", "home", "end", "insert", "capslock",
    *(f"f{i}" for i in range(1, 13)),
})
MODIFIERS = frozenset({"ctrl", "alt", "shift", "meta"})
MAX_HOTKEY_KEYS = 3  # the templates' own limit


class UnknownKeyError(FlashtuneError):
    """A key name outside the fixed list."""


def normalize_key(key: str) -> str:
    """A model key name ('Return', 'arrowleft', 'cmd', 'A') -> the canonical lower-case name used here.

    Accepted: one printable character, or a name of NAMED_KEYS (or an alias of one).
    """
    k = key.strip()
    if len(k) == 1 and k.isprintable():
        return k.lower()
    k = ALIASES.get(k.lower(), k.lower())
    if k not in NAMED_KEYS:
        shown = repr(key if len(key) <= 30 else key[:30] + "...")
        hint = "; separate keys with spaces, e.g. 'ctrl c'" if "+" in key and len(key) > 1 else ""
        raise UnknownKeyError(f"unknown key {shown}{hint}; use one character or one of {', '.join(sorted(NAMED_KEYS))}")
    return k
