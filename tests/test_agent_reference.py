"""Differential tests against ByteDance's reference parser (the `ui-tars` wheel, UI-TARS arXiv 2501.12326)
on the answers it handles correctly: same actions, same arguments, same normalised coordinates, same
smart_resize. The cases where the reference is known to be wrong are pinned in test_agent_parser.py."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given, settings, strategies as st

from flashtune.agent.actions import DIRECTIONS, Action, Coord, Step
from flashtune.agent.coords import CoordinateMapper, smart_resize
from flashtune.agent.parser import parse_response

ref = pytest.importorskip("ui_tars.action_parser", reason="the reference parser comes with the test extra "
                              "(make install: ui-tars==0.5.1)")

SCREENS = [(1920, 1080), (1280, 720), (2560, 1440), (1000, 1000), (390, 844)]
_safe = st.text(st.sampled_from(list("abcXYZ019 .,!?-")), min_size=1, max_size=20).map(str.strip).filter(bool)
_key = st.lists(st.sampled_from(["ctrl", "alt", "shift", "c", "v", "enter", "tab"]), min_size=1,
                max_size=3).map(" ".join)


@st.composite
def case(draw):
    (w, h) = draw(st.sampled_from(SCREENS))
    version = draw(st.sampled_from(["1.5", "1.0", "doubao"]))
    mapper = CoordinateMapper(w, h, version=version)
    # <point> under 1.5 is read in the model's resized frame, as the reference reads it (issue 16)
    dialect = "point_tag" if version == "doubao" else draw(st.sampled_from(
        ["paren", "point_tag"] if version == "1.5" else ["paren"]))
    fw, fh = mapper.frame(dialect)
    # stay inside the screen so clamping (ours, on purpose) does not differ from the reference
    xs = st.integers(0, int((w - 1) * fw / w))
    ys = st.integers(0, int((h - 1) * fh / h))

    def coord():
        return Coord((draw(xs), draw(ys)), dialect)

    actions = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["click", "left_double", "right_single", "hover", "drag", "hotkey", "type",
                                     "scroll", "wait", "finished", "call_user", "long_press", "open_app",
                                     "press_home", "press_back"]))
        if name in ("click", "left_double", "right_single", "hover", "long_press"):
            actions.append(Action(name, start=coord()))
        elif name == "drag":
            actions.append(Action(name, start=coord(), end=coord()))
        elif name == "scroll":
            actions.append(Action(name, start=coord(), direction=draw(st.sampled_from(DIRECTIONS))))
        elif name == "hotkey":
            actions.append(Action(name, text=draw(_key)))
        elif name in ("type", "finished", "open_app"):
            actions.append(Action(name, text=draw(_safe)))
        else:
            actions.append(Action(name))
    return (w, h), version, mapper, Step(tuple(actions), thought=draw(_safe))


@settings(max_examples=150, deadline=None)
@given(case())
def test_same_actions_as_reference_parser(c):
    (w, h), version, mapper, step = c
    text = step.render()
    model_type, factor = {"1.5": ("qwen25vl", 28), "1.0": ("qwen2vl", 1000), "doubao": ("doubao", 1000)}[version]
    theirs = ref.parse_action_to_structure_output(text, factor, h, w, model_type)
    ours = parse_response(text)
    assert len(theirs) == len(ours.actions)
    for t, a in zip(theirs, ours.actions):
        assert t["action_type"] == a.name
        assert t["thought"] == ours.thought
        inputs = t["action_inputs"]
        for slot, key in (("start", "start_box"), ("end", "end_box")):
            c = getattr(a, slot)
            if c is None:
                assert key not in inputs
                continue
            x1, y1, x2, y2 = ast.literal_eval(inputs[key])  # fractions of the screen
            sx, sy = mapper.to_screen(*c.center, dialect=c.dialect)
            assert sx == pytest.approx((x1 + x2) / 2 * w, abs=1e-6)
            assert sy == pytest.approx((y1 + y2) / 2 * h, abs=1e-6)
        for key in ("content", "key", "app_name", "direction"):
            if key in inputs:
                assert inputs[key] == (a.direction if key == "direction" else a.text)


@settings(max_examples=300, deadline=None)
@given(st.integers(15, 6000), st.integers(15, 6000))
def test_same_smart_resize_as_reference(h, w):
    if max(h, w) / min(h, w) > 200:
        return
    assert smart_resize(h, w) == ref.smart_resize(h, w, 28, 100 * 28 * 28, 16384 * 28 * 28)
