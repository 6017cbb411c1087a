"""The X11 executor for real: Xvfb on a free display, the test page in a (non-headless) Chromium window on it,
driven by xdotool from parsed model answers; the page's state is read back through Playwright.

The page's origin on screen is found in the X screenshot itself (a magenta marker at the page's (0, 0)), so
the test does not assume anything about the window's decorations.
"""

from __future__ import annotations

import pytest

from agent_fixtures.support import PageServer, answer, coord_text, find_marker, png_size
from flashtune.agent.executors.browser import launch_chromium
from flashtune.agent.executors.x11 import KEYSYMS, VirtualDisplay, X11Executor, keysym
from flashtune.agent.parser import parse_response

SCREEN = (1024, 768)


@pytest.fixture(scope="module")
def desk():
    from playwright.sync_api import sync_playwright

    server = PageServer()
    vd = VirtualDisplay(*SCREEN)
    pw = sync_playwright().start()
    try:
        browser = launch_chromium(pw, headless=False, env={"DISPLAY": vd.display},
                                  args=["--window-position=0,0", f"--window-size={SCREEN[0]},{SCREEN[1]}"])
        context = browser.new_context(no_viewport=True)
        page = context.new_page()
        yield server, vd, page
        browser.close()
    finally:
        pw.stop()
        vd.stop()
        server.close()


class Desk:
    def __init__(self, page, ex, version, dialect):
        self.page, self.ex, self.dialect = page, ex, dialect
        self.origin = find_marker(ex.screenshot)
        png = ex.screenshot()
        assert png_size(png) == SCREEN
        self.mapper = ex.mapper(*png_size(png), version=version)

    def center(self, selector, dx=0.0, dy=0.0):
        b = self.page.locator(selector).bounding_box()
        return self.origin[0] + b["x"] + b["width"] / 2 + dx, self.origin[1] + b["y"] + b["height"] / 2 + dy

    def coord(self, selector, end=False, pair=False, **kw):
        key, value = coord_text(self.dialect, self.mapper, *self.center(selector, **kw))
        if end:
            key = "end_point" if key == "point" else "end_box"
        elif key == "point" and pair:
            key = "start_point"
        return f"{key}='{value}'"

    def run(self, text):
        for action in parse_response(text).actions:
            self.ex.execute(action, self.mapper)

    def state(self):
        return self.page.evaluate("window.state")


@pytest.fixture(params=[("1.5", "paren"), ("1.0", "box_tokens"), ("doubao", "point_tag")],
                ids=lambda p: f"v{p[0]}-{p[1]}")
def x(request, desk):
    server, vd, page = desk
    page.goto(server.url())
    page.wait_for_function("window.state !== undefined")
    return Desk(page, X11Executor(vd.display), *request.param)


def test_keysym_table():
    assert keysym("enter") == "Return" and keysym("pagedown") == "Next" and keysym("pageup") == "Prior"
    assert keysym("left") == "Left" and keysym("backspace") == "BackSpace" and keysym("a") == "a"
    assert all(v for v in KEYSYMS.values())


def test_clicks_and_hover(x):
    x.run(answer(f"click({x.coord('#btn')})"))
    x.run(answer(f"left_double({x.coord('#dbl')})"))
    x.run(answer(f"right_single({x.coord('#ctx')})"))
    x.run(answer(f"hover({x.coord('#hover')})"))
    x.page.wait_for_function("window.state.hover >= 1", timeout=10000)
    s = x.state()
    assert (s["clicks"], s["dbl"], s["ctx"], s["hover"]) == (1, 1, 1, 1)


def test_type_enter_and_hotkeys(x):
    x.run(answer(f"click({x.coord('#inp')})\n\ntype(content='it\\'s (a, b)\\n')"))
    x.page.wait_for_function("window.state.enter >= 1", timeout=10000)
    assert x.page.input_value("#inp") == "it's (a, b)"
    x.run(answer("hotkey(key='ctrl a')\n\ntype(content='z')"))
    x.page.wait_for_function("document.getElementById('inp').value == 'z'", timeout=10000)
    x.run(answer("hotkey(key='arrowleft')\n\nhotkey(key='space')\n\nhotkey(key='pagedown')"))
    x.page.wait_for_function("window.state.keys.includes('PageDown')", timeout=10000)
    keys = x.state()["keys"]
    assert "Control+a" in keys and keys[-3:] == ["ArrowLeft", " ", "PageDown"]


def test_newline_inside_content_never_submits(x):
    # issue 16: a newline inside content was pressed as Enter; X11 pastes such text, as the reference does
    x.run(answer(f"click({x.coord('#inp')})\n\ntype(content='line one\\nline two')"))
    x.page.wait_for_function("document.getElementById('inp').value.length > 0", timeout=10000)
    assert x.page.input_value("#inp") == "line one line two"  # a one-line field makes the break a space
    x.run(answer(f"click({x.coord('#area')})\n\ntype(content='a\\nb\\n')"))
    x.page.wait_for_function("window.state.keys.includes('Enter')", timeout=10000)
    assert x.page.input_value("#area") == "a\nb\n"  # the line break pasted, the trailing newline pressed
    assert x.state()["enter"] == 0 and x.state()["keys"].count("Enter") == 1


def test_scroll_each_way(x):
    def pos():
        return x.page.evaluate("[document.getElementById('scroller').scrollLeft, "
                               "document.getElementById('scroller').scrollTop]")

    for direction, axis, sign in [("down", 1, 1), ("up", 1, -1), ("right", 0, 1), ("left", 0, -1)]:
        before = pos()
        x.run(answer(f"scroll({x.coord('#scroller')}, direction='{direction}')"))
        x.page.wait_for_function(f"(s => s.{['scrollLeft', 'scrollTop'][axis]} != {before[axis]})"
                                 "(document.getElementById('scroller'))", timeout=10000)
        after = pos()
        assert (after[axis] - before[axis]) * sign > 0, direction
        assert after[1 - axis] == before[1 - axis], direction


def test_drag(x):
    start = x.coord("#handle", pair=True)
    end = x.coord("#pad", end=True, dx=120, dy=30)
    x.run(answer(f"drag({start}, {end})"))
    x.page.wait_for_function("window.state.drops.length == 1", timeout=10000)
    drop = x.state()["drops"][0]
    pad = x.page.locator("#pad").bounding_box()
    target = (pad["x"] + pad["width"] / 2 + 120, pad["y"] + pad["height"] / 2 + 30)
    tol = SCREEN[0] / x.mapper.frame(x.dialect)[0] + 1.5  # one model unit plus rounding
    assert abs(drop[0] - target[0]) <= tol and abs(drop[1] - target[1]) <= tol
