"""UI-TARS answer parsing: golden cases for every dialect and action, the reference parser's known bugs,
typed errors for malformed or truncated answers, and hypothesis round trips (render -> parse)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from flashtune.agent.actions import DIRECTIONS, SCHEMA, Action, Coord, Step
from flashtune.agent.parser import ActionParseError, parse_action, parse_coord, parse_response


def one(text):
    step = parse_response(text)
    assert len(step.actions) == 1
    return step.actions[0]


# -- golden cases ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("written,values,dialect", [
    ("(235,512)", (235, 512), "paren"),
    ("( 235 , 512 )", (235, 512), "paren"),
    ("<|box_start|>(235,512)<|box_end|>", (235, 512), "box_tokens"),
    ("<|box_start|>(10,20,30,40)<|box_end|>", (10, 20, 30, 40), "box_tokens"),
    ("(10,20),(30,40)", (10, 20, 30, 40), "paren"),
    ("[10, 20, 30, 40]", (10, 20, 30, 40), "brackets"),
    ("[10,20]", (10, 20), "paren"),
    ("<point>235 512</point>", (235, 512), "point_tag"),
    ("<bbox>10 20 30 40</bbox>", (10, 20, 30, 40), "bbox_tag"),
    ("(12.5,7.25)", (12.5, 7.25), "paren"),
])
def test_every_coordinate_dialect(written, values, dialect):
    key = "point" if dialect == "point_tag" else "start_box"
    a = one(f"Thought: go\nAction: click({key}='{written}')")
    assert a.name == "click" and a.start == Coord(values, dialect)
    if len(values) == 4:  # boxes act at their centre
        assert a.start.center == ((values[0] + values[2]) / 2, (values[1] + values[3]) / 2)


def test_sections_and_full_width_colon():
    text = ("Reflection: the last click missed.\nAction_Summary: click the OK button\n"
            "Thought: OK is at the bottom right.\nAction：click(start_box='(900,950)')")
    step = parse_response(text)
    assert step.reflection == "the last click missed."
    assert step.summary == "click the OK button"
    assert step.thought == "OK is at the bottom right."
    assert step.actions == (Action("click", start=Coord((900, 950))),)


def test_several_actions_in_one_step():
    step = parse_response("Thought: fill the form\nAction: click(start_box='(1,2)')\n\n"
                          "type(content='abc')\n\nhotkey(key='ctrl s')\nwait()")
    assert [a.name for a in step.actions] == ["click", "type", "hotkey", "wait"]
    assert step.actions[2].keys == ["ctrl", "s"]


def test_only_the_last_action_label_counts():
    # the reference splits on the last "Action: "; a mention inside the thought must not be taken
    step = parse_response("Thought: my next Action: will be a click\nAction: click(start_box='(5,6)')")
    assert step.actions[0].start.values == (5, 6)


@pytest.mark.parametrize("written,expected", [
    (r"hello", "hello"),
    (r"it\'s", "it's"),
    (r"say \"hi\"", 'say "hi"'),
    (r"line1\nline2\n", "line1\nline2\n"),
    (r"a ) b , c = d", "a ) b , c = d"),
    (r"back\\slash", "back\\slash"),
    ("中文输入\\n", "中文输入\n"),
    ("it's unescaped", "it's unescaped"),  # lenient: a quote not followed by , or ) is text
])
def test_type_content_escapes(written, expected):
    a = one(f"Action: type(content='{written}')")
    assert a.text == expected
    assert a.submits == expected.endswith("\n")


def test_double_quoted_arguments():
    assert one('Action: type(content="a \'b\'")').text == "a 'b'"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scroll_four_directions(direction):
    a = one(f"Action: scroll(start_box='(500,500)', direction='{direction}')")
    assert a.direction == direction


def test_scroll_v1_mobile_start_end_and_no_point():
    a = one("Action: scroll(start_box='(1,2)', end_box='(3,4)')")
    assert a.end == Coord((3, 4)) and a.direction is None
    assert one("Action: scroll(direction='down')").start is None


@pytest.mark.parametrize("text,name,check", [
    ("click(start_box='(1,2)')", "click", lambda a: a.start.values == (1, 2)),
    ("left_single(start_box='(1,2)')", "left_single", lambda a: True),
    ("left_double(start_box='(1,2)')", "left_double", lambda a: True),
    ("right_single(start_box='(1,2)')", "right_single", lambda a: True),
    ("hover(start_box='(1,2)')", "hover", lambda a: True),
    ("drag(start_box='(1,2)', end_box='(3,4)')", "drag", lambda a: a.end.values == (3, 4)),
    ("drag(start_point='<point>1 2</point>', end_point='<point>3 4</point>')", "drag",
     lambda a: a.end == Coord((3, 4), "point_tag")),
    ("select(start_box='(1,2)', end_box='(3,4)')", "select", lambda a: True),
    ("hotkey(key='ctrl shift t')", "hotkey", lambda a: a.keys == ["ctrl", "shift", "t"]),
    ("hotkey(key='Enter')", "hotkey", lambda a: a.keys == ["enter"]),
    ("press(key='ctrl')", "press", lambda a: a.keys == ["ctrl"]),
    ("release(key='ctrl')", "release", lambda a: True),
    ("keydown(key='shift')", "keydown", lambda a: True),
    ("keyup(key='shift')", "keyup", lambda a: True),
    ("wait()", "wait", lambda a: True),
    ("finished()", "finished", lambda a: a.text is None),
    ("finished(content='The price is $5.')", "finished", lambda a: a.text == "The price is $5."),
    ("call_user()", "call_user", lambda a: True),
    ("long_press(start_box='(1,2)')", "long_press", lambda a: True),
    ("long_press(start_box='(1,2)', time='')", "long_press", lambda a: a.extra == (("time", ""),)),
    ("open_app(app_name='Settings')", "open_app", lambda a: a.text == "Settings"),
    ("press_home()", "press_home", lambda a: True),
    ("press_back()", "press_back", lambda a: True),
    ("navigate(content='http://127.0.0.1:8000/')", "navigate", lambda a: a.text.startswith("http")),
    ("navigate_back()", "navigate_back", lambda a: True),
    ("error_env()", "error_env", lambda a: True),
])
def test_every_action(text, name, check):
    a = one("Thought: t\nAction: " + text)
    assert a.name == name and check(a)
    assert parse_action(str(a)) == a


def test_reference_quirks_fixed():
    # raw box tokens (the reference raises ValueError)
    assert one("Action: click(start_box='<|box_start|>(3,4)<|box_end|>')").start.values == (3, 4)
    # a bare call without "Action:" (the reference fails an assertion)
    assert one("click(start_box='(3,4)')").name == "click"
    # a code fence around the calls
    assert one("Thought: x\nAction: ```\nclick(start_box='(3,4)')\n```").name == "click"
    # the terminal action is found among several
    assert parse_response("Action: type(content='x')\n\nfinished(content='ok')").terminal == "finished"


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,reason,needle", [
    ("", "empty", "empty"),
    ("   \n", "empty", "empty"),
    ("Thought: I am thinking about it", "no_action", "max_tokens"),
    ("Sure, I can help.", "no_action", "Action"),
    ("Thought: x\nAction: ", "truncated", "empty"),
    ("Thought: x\nAction: click(start_box='(10,2", "truncated", "never closed"),
    ("Thought: x\nAction: click(start_box='(10,20", "truncated", "never closed"),
    ("Thought: x\nAction: click(start_box=(10,20", "truncated", "cut off"),
    ("Thought: x\nAction: click", "truncated", "argument list"),
    ("Thought: x\nAction: type(content='abc", "truncated", "never closed"),
    ("Action: click(start_box='=')", "bad_coordinate", "'='"),  # UI-TARS issue #78
    ("Action: click(start_box='(a,b)')", "bad_coordinate", "(a,b)"),
    ("Action: click(start_box='(1,2,3)')", "bad_coordinate", "(1,2,3)"),
    ("Action: click(point='<point>1</point>')", "bad_coordinate", "<point>"),
    ("Action: click(start_box='[1,2,3]')", "bad_coordinate", "[1,2,3]"),
    ("Action: fly(start_box='(1,2)')", "unknown_action", "fly"),
    ("Action: click()", "bad_argument", "start"),
    ("Action: click(start_box='(1,2)', color='red')", "bad_argument", "color"),
    ("Action: click('(1,2)')", "syntax", "key=value"),
    ("Action: scroll(start_box='(1,2)', direction='diagonal')", "bad_argument", "diagonal"),
    ("Action: scroll(start_box='(1,2)')", "bad_argument", "direction"),
    ("Action: drag(start_box='(1,2)')", "bad_argument", "end"),
    ("Action: hotkey(key=' ')", "bad_argument", "empty"),
    ("Action: type()", "bad_argument", "content"),
    ("Action: click(start_box='(1,2)') garbage", "syntax", "garbage"),
    ("Action: wait(end_box='(1,2)')", "bad_argument", "end_box"),
])
def test_malformed_answers_raise_typed_errors(text, reason, needle):
    with pytest.raises(ActionParseError) as info:
        parse_response(text)
    assert info.value.reason == reason
    assert needle in str(info.value)
    assert "\n" not in str(info.value)  # one line


# -- round trips -----------------------------------------------------------------------------------------
_num = st.one_of(st.integers(0, 3000), st.integers(0, 300000).map(lambda v: v / 100))


def _coord(slot_dialects=("paren", "box_tokens", "brackets", "point_tag", "bbox_tag")):
    def build(dialect):
        n = {"point_tag": 2, "bbox_tag": 4, "brackets": 4}.get(dialect)
        sizes = st.just(n) if n else st.sampled_from([2, 4])
        return sizes.flatmap(lambda k: st.tuples(*[_num] * k)).map(lambda v: Coord(v, dialect))
    return st.sampled_from(slot_dialects).flatmap(build)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_keys = st.lists(st.sampled_from(["ctrl", "alt", "shift", "c", "v", "enter", "pagedown", "f5", "a"]),
                 min_size=1, max_size=3).map(" ".join)


@st.composite
def actions(draw):
    name = draw(st.sampled_from(sorted(SCHEMA)))
    slots, arg, required = SCHEMA[name]
    kw = {}
    if any(s.startswith("start") for s in slots) and ("start" in slots or draw(st.booleans())):
        kw["start"] = draw(_coord())
    if name == "scroll":
        if draw(st.booleans()) or "start" not in kw:
            kw["direction"] = draw(st.sampled_from(DIRECTIONS))
        else:
            kw["end"] = draw(_coord(("paren", "box_tokens", "brackets", "bbox_tag")))
    elif "end" in slots:
        kw["end"] = draw(_coord())
    if arg and (required or draw(st.booleans())):
        kw["text"] = draw(_keys if arg == "key" else _text)
    return Action(name, **kw)


@settings(max_examples=150, deadline=None)
@given(actions())
def test_action_round_trip(action):
    assert parse_action(str(action)) == action


_prose = st.text(st.sampled_from(list("abcxyz ,.!?'\"()=中文")), max_size=30).map(str.strip)


@settings(max_examples=150, deadline=None)
@given(st.lists(actions(), min_size=1, max_size=4), _prose, _prose, _prose)
def test_step_round_trip(acts, thought, reflection, summary):
    step = Step(tuple(acts), thought=thought, reflection=reflection, summary=summary)
    back = parse_response(step.render())
    assert back.actions == step.actions
    assert (back.thought, back.reflection, back.summary) == (thought, reflection, summary)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_never_crashes(text):
    try:
        parse_response(text)
    except ActionParseError as exc:
        assert exc.reason in ("empty", "no_action", "truncated", "syntax", "unknown_action", "bad_argument",
                              "bad_coordinate")


def test_parse_coord_rejects_garbage():
    for bad in ["", "()", "(1)", "<point></point>", "[1,2,3,4,5]", "(1,2))", "((1,2", "1 2 3", "<bbox>1 2</bbox>"]:
        with pytest.raises(ActionParseError):
            parse_coord(bad)


# -- hostile numbers through the coordinate consumers (issues 13 and 16) ----------------------------------
_big = st.one_of(st.integers(-10 ** 500, 10 ** 500), st.integers(-200000, 200000),
                 st.floats(allow_nan=False, allow_infinity=False, width=64).map(lambda f: f"{f:.6f}"))


@settings(max_examples=200, deadline=None)
@given(_big, _big, st.sampled_from(["(%s,%s)", "<point>%s %s</point>", "[%s, %s, 10, 10]", "(%s,%s"]),
       st.sampled_from(["1.5", "1.0", "doubao"]))
def test_any_number_is_a_typed_error_or_a_point_on_screen(x, y, form, version):
    import math

    from flashtune.agent.coords import CoordinateMapper
    from flashtune.agent.executors.pyautogui_code import to_pyautogui
    from flashtune.agent.policy import Policy, PolicyError

    key = "point" if form.startswith("<point>") else "start_box"
    text = f"Action: click({key}='{form % (x, y)}')"
    try:
        step = parse_response(text)
    except ActionParseError as exc:
        assert exc.reason == "bad_coordinate" and len(str(exc)) < 400
        return
    mapper = CoordinateMapper(1920, 1080, version=version)
    (a,) = step.actions
    sx, sy = mapper.to_screen(*a.start.center, dialect=a.start.dialect)
    assert math.isfinite(sx) and math.isfinite(sy) and 0 <= sx <= 1919 and 0 <= sy <= 1079
    assert "pyautogui.click(" in to_pyautogui(step.actions, mapper)
    try:
        Policy().check_step(step.actions, mapper)
    except PolicyError as exc:
        assert "outside the screenshot" in str(exc)
