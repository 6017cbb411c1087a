"""Forms real UI-TARS outputs use (issue 16), each from the example it came from, parsed and mapped; and the
newline rule (only a trailing newline submits) on a real headless Chromium."""

from __future__ import annotations

import ast

import pytest

from agent_fixtures.support import PageServer
from flashtune.agent.actions import Coord
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.parser import ActionParseError, parse_response

ref = pytest.importorskip("ui_tars.action_parser", reason="the reference parser comes with the test extra "
                              "(make install: ui-tars==0.5.1)")


def test_official_inference_test_missing_coordinate_paren():
    # bytedance/UI-TARS codes/tests/inference_test.py: the mock response lacks the coordinate's final ')'
    text = "Thought: Click on the search bar at the top of the screen\nAction: left_single(start_box='(573,322')"
    (a,) = parse_response(text).actions
    assert a.name == "left_single" and a.start == Coord((573, 322))
    # the same screen point as the reference parser gives for it (qwen25vl, 1920x1080)
    theirs = ref.parse_action_to_structure_output(text, 1000, 1080, 1920, "qwen25vl")[0]
    x1, y1, x2, y2 = ast.literal_eval(theirs["action_inputs"]["start_box"])
    m = CoordinateMapper(1920, 1080, version="1.5")
    assert m.to_screen(*a.start.center) == pytest.approx(((x1 + x2) / 2 * 1920, (y1 + y2) / 2 * 1080))


@pytest.mark.parametrize("text,name,values", [
    # Doubao-1.6 answers whose call misses its final ')' (UI-TARS-desktop PR #942): at the end of the answer ...
    ("Thought: 点击搜索框\nAction: click(point='<point>383 502</point>'", "click", (383, 502)),
    ("Action: click(start_box='(383,502)'", "click", (383, 502)),
    # ... and before the next action
    ("Action: click(point='<point>10 20</point>'\n\ntype(content='abc')", "click", (10, 20)),
])
def test_call_missing_final_paren(text, name, values):
    step = parse_response(text)
    assert step.actions[0].name == name and step.actions[0].start.values == values


def test_type_with_start_box_from_the_training_action_space():
    (a,) = parse_response("Thought: fill the search box\nAction: type(content='flashtune\\n', "
                          "start_box='<|box_start|>(330,85)<|box_end|>')").actions
    assert a.name == "type" and a.text == "flashtune\n" and a.start == Coord((330, 85), "box_tokens")
    assert str(a) == "type(start_box='<|box_start|>(330,85)<|box_end|>', content='flashtune\\n')"


@pytest.mark.parametrize("tail", ["<|im_end|>", "<|im_end|>\n", " <|endoftext|>", "<|im_end|><|endoftext|>"])
def test_trailing_end_of_turn_token(tail):
    step = parse_response("Thought: done\nAction: finished(content='The file is saved.')" + tail)
    assert step.actions[0].text == "The file is saved." and step.raw.endswith(tail)
    assert parse_response("Action: click(start_box='(1,2)')" + tail).actions[0].start.values == (1, 2)
    with pytest.raises(ActionParseError, match="empty"):
        parse_response("<|im_end|>")


@pytest.mark.parametrize("written,expected", [
    ("He said 'hi', then left", "He said 'hi', then left"),  # the example
    ("It's done, isn't it", "It's done, isn't it"),
    ("'quoted' start", "'quoted' start"),
    ("smile :)", "smile :)"),
    ("ends with a quote'", "ends with a quote'"),
])
def test_unescaped_inner_quotes(written, expected):
    (a,) = parse_response(f"Action: type(content='{written}')").actions
    assert a.text == expected
    # a real second argument still ends the content
    (b,) = parse_response(f"Action: type(content='{written}', start_box='(1,2)')").actions
    assert b.text == expected and b.start.values == (1, 2)


def test_inner_quotes_with_following_action():
    step = parse_response("Action: type(content='He said 'hi', then left')\n\nhotkey(key='enter')")
    assert [a.name for a in step.actions] == ["type", "hotkey"] and step.actions[0].text == "He said 'hi', then left"


def test_only_a_trailing_newline_submits_in_a_real_browser():
    from playwright.sync_api import sync_playwright

    from flashtune.agent.executors.browser import BrowserExecutor, launch_chromium

    server = PageServer()
    pw = sync_playwright().start()
    try:
        browser = launch_chromium(pw, headless=True)
        page = browser.new_page(viewport={"width": 700, "height": 600})
        page.goto(server.url())
        ex = BrowserExecutor(page)
        mapper = ex.mapper(*page.viewport_size.values(), version="1.0")
        box = page.locator("#inp").bounding_box()
        x, y = mapper.from_screen(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for a in parse_response(f"Action: click(start_box='({x},{y})')\n\n"
                                "type(content='line one\\nline two')").actions:
            ex.execute(a, mapper)
        state = page.evaluate("window.state")
        assert state["enter"] == 0 and "Enter" not in state["keys"]  # a newline inside: no early submit
        assert page.input_value("#inp") == "line oneline two"  # an <input> drops the line break
        (a,) = parse_response("Action: type(content=' and done\\n')").actions
        ex.execute(a, mapper)
        assert page.evaluate("window.state.enter") == 1  # the trailing newline submits
        browser.close()
    finally:
        pw.stop()
        server.close()
