"""Parse UI-TARS responses (arXiv 2501.12326) into typed actions.

Accepted: `Thought:` / `Reflection:` / `Action_Summary:` sections before `Action:` (an ASCII or full-width colon),
several actions per step (separated by blank lines or newlines), every coordinate dialect listed in
`actions.DIALECTS`, the keyword names `start_box`/`end_box` and Doubao's `point`/`start_point`/`end_point`,
escapes in quoted strings, and a bare action without the `Action:` label. Everything else raises
`ActionParseError` with a `reason` a caller can branch on and a message that quotes the offending text.

Differences from the reference parser, on purpose: box tokens left in by the server are accepted (the
reference raises ValueError); a missing `Action:` is accepted when the text is a call (the reference asserts);
a coordinate such as `start_box='='` (UI-TARS issue #78) is a typed error, not a crash.
"""

from __future__ import annotations

import re

from flashtune.agent.actions import DIRECTIONS, SCHEMA, Action, Coord, Step
from flashtune.agent.keys import MAX_HOTKEY_KEYS, normalize_key
from flashtune.errors import FlashtuneError

REASONS = ("empty", "no_action", "truncated", "syntax", "unknown_action", "bad_argument", "bad_coordinate")


class ActionParseError(FlashtuneError):
    """The model's answer is not a valid UI-TARS step; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


_LABEL = re.compile(r"(?<![A-Za-z_])(Thought|Reflection|Action_Summary|Action)[ \t]*[:：]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNESCAPE = {"n": "\n", "'": "'", '"': '"', "\\": "\\", "t": "\t"}
_END_TOKENS = re.compile(r"(?:\s*<\|(?:im_end|endoftext|eot_id)\|>)+\s*$")
_NEXT_KWARG = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_AFTER_CALL = re.compile(r"[ \t]*(?:$|\n|\r|```|[A-Za-z_][A-Za-z0-9_]*\s*\()")
_FREE_TEXT_KEYS = ("content", "app_name")
# A model coordinate is at most a few thousand; anything past this bound is garbage (a 400-digit number would
# overflow float arithmetic downstream), refused here as a typed error the model can correct.
MAX_COORD = 100_000
_COORD_KEYS = {"start_box": "start", "point": "start", "start_point": "start", "end_box": "end", "end_point": "end"}


def _excerpt(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_response(text: str) -> Step:
    """Parse one whole model answer (Thought/Reflection/Action_Summary/Action) into a `Step`."""
    if text is None or not text.strip():
        raise ActionParseError("empty", "the model returned an empty answer")
    raw, text = text, _END_TOKENS.sub("", text)  # a trailing <|im_end|> left in by the server
    if not text.strip():
        raise ActionParseError("empty", "the model returned only end-of-turn tokens")
    labels = list(_LABEL.finditer(text))
    action_labels = [m for m in labels if m.group(1) == "Action"]
    sections = {"Thought": "", "Reflection": "", "Action_Summary": ""}
    if action_labels:
        last = action_labels[-1]
        action_text = text[last.end():]
        before = [m for m in labels if m.start() < last.start()]
        for i, m in enumerate(before):
            end = before[i + 1].start() if i + 1 < len(before) else last.start()
            if m.group(1) in sections and not sections[m.group(1)]:
                sections[m.group(1)] = text[m.end():end].strip()
    else:
        stripped = text.strip()
        ident = _IDENT.match(stripped)
        if ident and ident.group(0) in SCHEMA and stripped[ident.end():].lstrip().startswith("("):
            action_text = stripped
        else:
            hint = " (the answer may have been cut off at max_tokens)" if labels else ""
            raise ActionParseError("no_action", f"no 'Action:' section in {_excerpt(text)}{hint}")
    actions = parse_actions(action_text)
    return Step(
        actions=tuple(actions),
        thought=sections["Thought"],
        reflection=sections["Reflection"],
        summary=sections["Action_Summary"],
        raw=raw,
    )


def parse_action(text: str) -> Action:
    """Parse exactly one action call, e.g. "click(start_box='(10,20)')"."""
    actions = parse_actions(text)
    if len(actions) != 1:
        raise ActionParseError("syntax", f"expected one action, found {len(actions)} in {_excerpt(text)}")
    return actions[0]


def parse_actions(text: str) -> list[Action]:
    """Parse the text after `Action:`: one or more calls separated by whitespace."""
    body = text.strip()
    body = re.sub(r"^```\w*\s*|\s*```$", "", body)  # a code fence around the calls
    if not body:
        raise ActionParseError("truncated", "the 'Action:' section is empty (cut off at max_tokens?)")
    scanner = _Scanner(body)
    actions = []
    while True:
        scanner.skip_ws()
        if scanner.done():
            break
        actions.append(scanner.call())
    return actions


class _Scanner:
    """A small hand-written scanner for `name(key='value', ...)` calls; quotes may hide `)`, `,` and `=`."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def done(self) -> bool:
        return self.i >= len(self.s)

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def _truncated(self, what: str) -> ActionParseError:
        return ActionParseError("truncated", f"{what} in {_excerpt(self.s[max(0, self.i - 50):])}")

    def call(self) -> Action:
        m = _IDENT.match(self.s, self.i)
        if not m:
            raise ActionParseError("syntax", f"expected an action name at {_excerpt(self.s[self.i:])}")
        name = m.group(0)
        self.i = m.end()
        self.skip_ws()
        if self.done() and name in SCHEMA:
            raise self._truncated(f"'{name}' has no argument list")
        if self.done() or self.s[self.i] != "(":
            if name not in SCHEMA:
                raise ActionParseError("syntax", f"unexpected text {_excerpt(self.s[m.start():])} "
                                                 "where an action call should be")
            raise ActionParseError("syntax", f"expected '(' after {name!r} at {_excerpt(self.s[self.i:])}")
        if name not in SCHEMA:
            raise ActionParseError("unknown_action", f"unknown action {name!r}; known: {', '.join(SCHEMA)}")
        self.i += 1
        args: dict[str, str] = {}
        while True:
            self.skip_ws()
            if self.done():
                raise self._truncated(f"'{name}(' is never closed")
            if self.s[self.i] == ")":
                self.i += 1
                break
            key_m = _IDENT.match(self.s, self.i)
            if not key_m:
                raise ActionParseError("syntax", f"expected key=value in {name}() at {_excerpt(self.s[self.i:])}")
            key = key_m.group(0)
            self.i = key_m.end()
            self.skip_ws()
            if self.done():
                raise self._truncated(f"argument {key!r} of {name}() has no value")
            if self.s[self.i] != "=":
                raise ActionParseError("bad_argument", f"{name}() takes keyword arguments, got {key!r} alone")
            self.i += 1
            self.skip_ws()
            if key in args:
                raise ActionParseError("bad_argument", f"{name}() repeats the argument {key!r}")
            quoted = self.s[self.i] in "'\"" if not self.done() else False
            args[key] = self.value(name, key)
            after = self.i
            self.skip_ws()
            newline = "\n" in self.s[after:self.i]
            if self.done():
                if quoted:  # a complete last argument whose ')' is missing (Doubao-1.6, UI-TARS-desktop #942)
                    break
                raise self._truncated(f"'{name}(' is never closed")
            if quoted and newline and _IDENT.match(self.s, self.i) and \
                    _IDENT.match(self.s, self.i).group(0) in SCHEMA:  # the next action starts: ')' was dropped
                break
            if self.s[self.i] == ",":
                self.i += 1
            elif self.s[self.i] != ")":
                raise ActionParseError("syntax", f"expected ',' or ')' in {name}() at {_excerpt(self.s[self.i:])}")
        return _build(name, args)

    def _closes_free_text(self, j: int) -> bool:
        """Whether a quote ending at j-1 closes a free-text value. Models leave quotes in text unescaped
        ("it's", "He said 'hi', then left"), so a quote closes only when what follows ends the value: the end
        of the answer, ', key=' (the next argument) or ')' followed by the end of the line or the next call."""
        while j < len(self.s) and self.s[j] in " \t":
            j += 1
        if j >= len(self.s):
            return True
        if self.s[j] == ",":
            return bool(_NEXT_KWARG.match(self.s, j + 1))
        return self.s[j] == ")" and bool(_AFTER_CALL.match(self.s, j + 1))

    def value(self, name: str, key: str) -> str:
        if self.done():
            raise self._truncated(f"argument {key!r} of {name}() has no value")
        quote = self.s[self.i]
        if quote not in "'\"":  # an unquoted value, e.g. start_box=(1,2): read to ',' or ')' at depth 0
            depth, j = 0, self.i
            while j < len(self.s):
                ch = self.s[j]
                if ch in "([":
                    depth += 1
                elif ch in ")]":
                    if depth == 0:
                        break
                    depth -= 1
                elif ch == "," and depth == 0:
                    break
                j += 1
            if j >= len(self.s):
                raise self._truncated(f"argument {key!r} of {name}() is cut off")
            out, self.i = self.s[self.i:j].strip(), j
            return out
        self.i += 1
        out: list[str] = []
        while True:
            if self.done():
                raise self._truncated(f"the quoted value of {key!r} in {name}() is never closed")
            ch = self.s[self.i]
            if ch == "\\" and self.i + 1 < len(self.s):
                nxt = self.s[self.i + 1]
                out.append(_UNESCAPE.get(nxt, "\\" + nxt))
                self.i += 2
                continue
            if ch == quote and (key not in _FREE_TEXT_KEYS or self._closes_free_text(self.i + 1)):
                self.i += 1
                return "".join(out)
            out.append(ch)
            self.i += 1


def parse_coord(raw: str, key: str = "start_box") -> Coord:
    """Parse one coordinate string in any dialect; raise `ActionParseError('bad_coordinate')` otherwise."""
    s = raw.strip()
    dialect = "paren"
    m = re.fullmatch(r"<\|box_start\|>(.*)<\|box_end\|>", s, re.S)
    if m:
        dialect, s = "box_tokens", m.group(1).strip()
    elif re.fullmatch(r"<point>(.*)</point>", s, re.S):
        dialect, s = "point_tag", s[7:-8]
    elif re.fullmatch(r"<bbox>(.*)</bbox>", s, re.S):
        dialect, s = "bbox_tag", s[6:-7]
    elif s.startswith("[") and s.endswith("]"):
        dialect, s = "brackets", s[1:-1]
    if dialect in ("point_tag", "bbox_tag"):
        ok = re.fullmatch(r"\s*-?\d+(?:\.\d+)?(?:[\s,]+-?\d+(?:\.\d+)?)*\s*", s)
    else:
        # "(x,y)", "(x1,y1,x2,y2)", "(x1,y1),(x2,y2)", "x,y", "x1, y1, x2, y2"
        ok = re.fullmatch(r"[\s(]*-?\d+(?:\.\d+)?(?:[\s(),]*,[\s(),]*-?\d+(?:\.\d+)?)*[\s)]*", s)
    numbers = _NUMBER.findall(s) if ok else []
    expected = {"point_tag": (2,), "bbox_tag": (4,), "brackets": (2, 4)}.get(dialect, (2, 4))
    # '(573,322' (the official inference test) is missing its final ')': accept exactly that one
    missing_paren = s.count("(") == s.count(")") + 1 and not s.rstrip().endswith(")")
    if len(numbers) not in expected or (s.count("(") != s.count(")") and not missing_paren):
        raise ActionParseError("bad_coordinate", f"{key}={_excerpt(raw)} is not a coordinate")
    for n in numbers:
        if len(n) > 12 or abs(float(n)) > MAX_COORD:
            raise ActionParseError("bad_coordinate", f"{key}={_excerpt(raw)} holds {_excerpt(n, 20)}, outside "
                                                     f"[-{MAX_COORD}, {MAX_COORD}]; write a point on the screenshot")
    values = tuple(float(n) if "." in n else int(n) for n in numbers)
    if dialect == "brackets" and len(values) == 2:
        dialect = "paren"
    return Coord(values, dialect)


def _build(name: str, args: dict[str, str]) -> Action:
    slots, text_key, required = SCHEMA[name]
    fields: dict = {}
    extra = []
    for key, value in args.items():
        if key in _COORD_KEYS and slots:
            slot = _COORD_KEYS[key]
            if slot in fields:
                raise ActionParseError("bad_argument", f"{name}() has two {slot} coordinates")
            fields[slot] = parse_coord(value, key)
        elif key == text_key:
            fields["text"] = value
        elif key == "direction" and name == "scroll":
            d = value.strip().lower()
            if d not in DIRECTIONS:
                raise ActionParseError("bad_argument", f"scroll direction={value!r}; use one of {DIRECTIONS}")
            fields["direction"] = d
        elif key == "time" and name == "long_press":  # v1 mobile template
            extra.append((key, value))
        else:
            raise ActionParseError("bad_argument", f"{name}() does not take {key}=")
    if "end" in fields and not any(s.startswith("end") for s in slots):
        raise ActionParseError("bad_argument", f"{name}() takes no end coordinate")
    for slot in slots:
        if not slot.endswith("?") and slot not in fields:
            raise ActionParseError("bad_argument", f"{name}() needs a {slot} coordinate")
    if required and "text" not in fields:
        raise ActionParseError("bad_argument", f"{name}() needs {text_key}=")
    if name == "scroll" and "direction" not in fields and "end" not in fields:
        raise ActionParseError("bad_argument", "scroll() needs direction= ('up', 'down', 'left' or 'right')")
    if text_key == "key":
        keys = fields["text"].split()
        if not keys:
            raise ActionParseError("bad_argument", f"{name}() has an empty key=")
        if len(keys) > MAX_HOTKEY_KEYS:
            raise ActionParseError("bad_argument", f"{name}(key={_excerpt(fields['text'])}) has {len(keys)} keys; "
                                                   f"use at most {MAX_HOTKEY_KEYS}, separated by spaces")
        for k in keys:
            try:
                normalize_key(k)
            except FlashtuneError as exc:
                raise ActionParseError("bad_argument", f"{name}(): {exc}") from None
    return Action(name, extra=tuple(extra), **fields)
