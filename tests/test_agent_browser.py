"""The browser executor on a real headless Chromium: model string -> parse -> execute -> DOM state.

Each case starts from a screenshot, inverts the coordinate mapping for the model version under test, writes
the model's answer by hand in one coordinate dialect, parses it, executes it and checks the page's state.
Viewports and device scale factors vary, so CSS vs device pixels and every model frame are exercised.
"""

from __future__ import annotations

import json
import os

import pytest

from agent_fixtures.support import PageServer, answer, coord_text, png_size
from flashtune.agent.executors.browser import BrowserExecutor, launch_chromium
from flashtune.agent.fake_server import FakeModelServer
from flashtune.agent.client import ChatClient
from flashtune.agent.loop import AgentConfig, run_agent
from flashtune.agent.parser import parse_response

CONFIGS = [  # width, height, device scale factor, model version, coordinate dialect
    (800, 600, 1.0, "1.5", "paren"),
    (1024, 640, 2.0, "1.0", "box_tokens"),
    (900, 700, 1.5, "doubao", "point_tag"),
    (820, 600, 2.0, "1.5", "brackets"),
    (1000, 620, 1.0, "doubao", "bbox_tag"),
]


@pytest.fixture(scope="module")
def server():
    s = PageServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = launch_chromium(pw, headless=True)
    yield b
    b.close()
    pw.stop()


class Env:
    def __init__(self, page, width, height, dsf, version, dialect):
        self.page, self.dsf, self.dialect = page, dsf, dialect
        self.ex = BrowserExecutor(page)
        png = self.ex.screenshot()
        assert png_size(png) == (round(width * dsf), round(height * dsf))  # screenshots are device pixels
        self.mapper = self.ex.mapper(*png_size(png), version=version)
        assert self.mapper.scale_factor == dsf

    def center(self, selector, dx=0.0, dy=0.0):
        """Centre of an element in screenshot pixels (device pixels)."""
        b = self.page.locator(selector).bounding_box()
        return (b["x"] + b["width"] / 2 + dx) * self.dsf, (b["y"] + b["height"] / 2 + dy) * self.dsf

    def coord(self, selector, slot="start", **kw):
        key, value = coord_text(self.dialect, self.mapper, *self.center(selector, **kw))
        if slot == "end":
            key = "end_point" if key == "point" else "end_box"
        elif key == "point" and slot == "start_pair":
            key = "start_point"
        return f"{key}='{value}'"

    def run(self, text):
        step = parse_response(text)
        for action in step.actions:
            self.ex.execute(action, self.mapper)
        return step

    def state(self):
        return self.page.evaluate("window.state")


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}@{c[2]}-v{c[3]}-{c[4]}")
def config_page(request, browser, server):
    """One page per configuration for the whole module; tests reload it."""
    width, height, dsf, version, dialect = request.param
    context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=dsf)
    page = context.new_page()
    page.goto(server.url())
    yield page, Env(page, width, height, dsf, version, dialect)
    context.close()


@pytest.fixture
def env(config_page, server):
    page, e = config_page
    page.goto(server.url())  # a fresh page state for each test
    return e


def test_click_double_right_hover(env):
    env.run(answer(f"click({env.coord('#btn')})"))
    assert env.state()["clicks"] == 1
    env.run(answer(f"left_double({env.coord('#dbl')})"))
    assert env.state()["dbl"] == 1 and env.state()["clicks"] == 1
    env.run(answer(f"right_single({env.coord('#ctx')})"))
    assert env.state()["ctx"] == 1
    env.run(answer(f"hover({env.coord('#hover')})"))
    assert env.state()["hover"] == 1


def test_click_near_edge_of_target_hits(env):
    # 15 CSS px right of the centre of a 120 px button: still inside
    env.run(answer(f"left_single({env.coord('#btn', dx=45)})"))
    assert env.state()["clicks"] == 1


def test_type_with_escapes_and_enter(env):
    text = "it\\'s \\\"ok\\\" = (a, b)\\n"  # as the model writes it: escaped quotes, a trailing \n
    env.run(answer(f"click({env.coord('#inp')})\n\ntype(content='{text}')"))
    assert env.page.input_value("#inp") == 'it\'s "ok" = (a, b)'
    assert env.state()["enter"] == 1


def test_hotkeys(env):
    env.run(answer(f"click({env.coord('#inp')})\n\ntype(content='abc')"))
    env.run(answer("hotkey(key='ctrl a')\n\ntype(content='x')"))
    assert env.page.input_value("#inp") == "x"  # ctrl+a selected everything, typing replaced it
    env.run(answer("hotkey(key='arrowleft')\n\nhotkey(key='pagedown')\n\nhotkey(key='space')\n\n"
                   "hotkey(key='Return')"))
    keys = env.state()["keys"]
    assert "Control+a" in keys
    assert keys[-4:] == ["ArrowLeft", "PageDown", " ", "Enter"]


def test_scroll_each_way(env):
    def pos():
        return env.page.evaluate("[document.getElementById('scroller').scrollLeft, "
                                 "document.getElementById('scroller').scrollTop]")

    for direction, axis, sign in [("down", 1, 1), ("up", 1, -1), ("right", 0, 1), ("left", 0, -1)]:
        before = pos()
        env.run(answer(f"scroll({env.coord('#scroller')}, direction='{direction}')"))
        env.page.wait_for_function(f"(s => s.{['scrollLeft', 'scrollTop'][axis]} != {before[axis]})"
                                   "(document.getElementById('scroller'))", timeout=10000)
        after = pos()
        assert (after[axis] - before[axis]) * sign > 0, direction
        assert after[1 - axis] == before[1 - axis], direction


def test_drag_moves_handle_to_target(env):
    start = env.coord("#handle", slot="start_pair")
    end = env.coord("#pad", slot="end", dx=150, dy=20)
    env.run(answer(f"drag({start}, {end})"))
    drops = env.state()["drops"]
    assert len(drops) == 1
    pad = env.page.locator("#pad").bounding_box()
    target = (pad["x"] + pad["width"] / 2 + 150, pad["y"] + pad["height"] / 2 + 20)
    # the model frame quantises the point: at most one model unit (<= 1.2 CSS px here) plus rounding
    tol = max(env.mapper.width / env.mapper.frame(env.dialect)[0], 1) / env.dsf + 1.5
    assert abs(drops[0][0] - target[0]) <= tol and abs(drops[0][1] - target[1]) <= tol
    handle = env.page.locator("#handle").bounding_box()
    assert abs(handle["x"] + handle["width"] / 2 - target[0]) <= tol + 1


def test_agent_loop_end_to_end(browser, server, tmp_path):
    """A scripted model drives the page through the loop: click, wait, click+type, finished."""
    context = browser.new_context(viewport={"width": 960, "height": 600}, device_scale_factor=1.0)
    page = context.new_page()
    page.goto(server.url())
    try:
        env = Env(page, 960, 600, 1.0, "1.5", "paren")
        script = [
            answer(f"click({env.coord('#btn')})", "Click the button first."),
            answer("wait()", "The page may still be loading."),
            answer(f"click({env.coord('#inp')})\n\ntype(content='done\\n')", "Type the word."),
            answer("finished(content='typed it')", "All done."),
        ]
        sleeps = []
        with FakeModelServer(script) as fake:
            client = ChatClient(fake.url, sleep=sleeps.append)
            record = run_agent("Click the button, then type done", client, env.ex, str(tmp_path),
                               AgentConfig(max_steps=8), sleep=sleeps.append, executor_name="browser")
            requests = fake.requests
        assert record["status"] == "finished" and record["answer"] == "typed it"
        assert len(record["steps"]) == 4
        assert env.state()["clicks"] == 1 and page.input_value("#inp") == "done" and env.state()["enter"] == 1
        assert 5.0 in sleeps  # wait() slept through the injected clock
        # the conversation grows: request k carries k screenshots (at most 5) and all k-1 earlier answers
        for k, req in enumerate(requests, start=1):
            images = [p for m in req["messages"] if isinstance(m["content"], list) for p in m["content"]
                      if p.get("type") == "image_url"]
            assistants = [m for m in req["messages"] if m["role"] == "assistant"]
            assert len(images) == min(k, 5) and len(assistants) == k - 1
        on_disk = json.loads((tmp_path / "trajectory.json").read_text())
        assert on_disk["status"] == "finished"
        assert on_disk["steps"][2]["action_strings"][1] == "type(content='done\\n')"
        for s in on_disk["steps"]:
            assert os.path.exists(tmp_path / s["screenshot"]) and os.path.exists(tmp_path / s["annotated"])
        html = (tmp_path / "report.html").read_text()
        assert html.count("<img ") == 4 and "step_000_annotated.png" in html and "Type the word." in html
    finally:
        context.close()
