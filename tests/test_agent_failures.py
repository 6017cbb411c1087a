"""How runs end when something fails (issue 16 item 2), on the real executors and the fake model server.

- An action the executor cannot do, or that fails through the model's fault (a page that does not load), goes
  back to the model as an error to retry, boundedly; the machine's failures (a closed browser) end the run with
  status `error`. Both leave trajectory.json and report.html.
Failures before the first step are in test_agent_launch.py (a second Playwright driver in one thread is refused,
so those runs cannot share this module's browser).
"""

from __future__ import annotations

import json
import socket

import pytest

from agent_fixtures.support import PageServer
from flashtune.agent.client import ChatClient
from flashtune.agent.executors.base import ActionError
from flashtune.agent.fake_server import FakeModelServer
from flashtune.agent.loop import AgentConfig, run_agent


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(message) -> list[str]:
    return [p["text"] for p in message["content"] if isinstance(p, dict) and p.get("type") == "text"]


def run(tmp_path, script, executor, **cfg):
    with FakeModelServer(script) as fake:
        record = run_agent("task", ChatClient(fake.url, sleep=lambda s: None), executor, str(tmp_path),
                           AgentConfig(settle_seconds=0, **cfg), sleep=lambda s: None)
        requests = fake.requests
    on_disk = json.loads((tmp_path / "trajectory.json").read_text())
    assert on_disk["status"] == record["status"]
    assert record["status"] in (tmp_path / "report.html").read_text()
    return record, requests


# -- headless Chromium ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    from flashtune.agent.executors.browser import launch_chromium

    server = PageServer()
    pw = sync_playwright().start()
    browser = launch_chromium(pw, headless=True)
    try:
        yield browser, server.url()
    finally:
        browser.close()
        pw.stop()
        server.close()


@pytest.fixture
def page(chromium):
    from flashtune.agent.executors.browser import BrowserExecutor

    browser, url = chromium
    context = browser.new_context(viewport={"width": 480, "height": 360})
    p = context.new_page()
    p.goto(url)
    p.wait_for_function("window.state !== undefined")
    yield BrowserExecutor(p), p, url
    context.close()


def test_unsupported_action_goes_back_to_the_model(page, tmp_path):
    # open_app passes the mobile policy but a browser cannot do it: it ended the run with status 'error'
    ex, p, url = page
    record, requests = run(tmp_path, ["Action: click(start_box='(20,20)')\n\nopen_app(app_name='Maps')",
                                      "Action: finished(content='done')"], ex, template="mobile", start_url=url)
    assert record["status"] == "finished" and record["answer"] == "done"
    attempt = record["steps"][0]["attempts"][0]
    assert attempt["reason"] == "unsupported_action" and "open_app" in attempt["error"]
    feedback = texts(requests[1]["messages"][-1])[0]
    assert "cannot perform open_app()" in feedback and "Nothing of that step was executed" in feedback
    assert requests[1]["temperature"] == 1.0
    assert p.evaluate("window.state")["clicks"] == 0  # not even the click before it ran


def test_unsupported_action_retries_are_bounded(page, tmp_path):
    ex, p, url = page
    record, requests = run(tmp_path, ["Action: press_home()"] * 5, ex, template="mobile", start_url=url,
                           resamples=2)
    assert record["status"] == "action_error" and len(requests) == 3
    assert "press_home" in record["steps"][0]["error"] and record["steps"][0]["executed"] == []
    assert "unsupported_action" in (tmp_path / "report.html").read_text()


def test_a_page_that_does_not_load_goes_back_to_the_model(page, tmp_path):
    # before: the failed navigation was kept in executor.errors and the model was never told
    ex, p, url = page
    port = closed_port()
    dead = f"http://127.0.0.1:{port}/"
    record, requests = run(tmp_path, [f"Action: click(start_box='(20,20)')\n\nnavigate(content='{dead}')",
                                      "Action: finished(content='gave up')"], ex, template="browser",
                           start_url=url, allow_hosts=(f"127.0.0.1:{port}",))
    assert record["status"] == "finished"
    first, second = record["steps"]
    assert first["executed"] == ["click(start_box='(20,20)')"]  # the click ran, the navigation failed
    assert first["action_error"]["reason"] == "action_failed"
    assert first["action_error"]["action"] == f"navigate(content='{dead}')"
    assert "ERR_CONNECTION_REFUSED" in first["action_error"]["error"]
    sent = texts(requests[1]["messages"][-1])
    assert sent == [second["feedback"]]  # the next request says what failed, then shows the screen
    assert "ERR_CONNECTION_REFUSED" in sent[0] and "click(start_box='(20,20)')" in sent[0]
    assert requests[1]["messages"][-1]["content"][-1]["type"] == "image_url"
    assert "ERR_CONNECTION_REFUSED" in (tmp_path / "report.html").read_text()


def test_failing_steps_in_a_row_are_bounded(page, tmp_path):
    ex, p, url = page
    port = closed_port()
    dead = f"http://127.0.0.1:{port}/"
    record, requests = run(tmp_path, [f"Action: navigate(content='{dead}')"] * 5, ex, template="browser",
                           start_url=url, allow_hosts=(f"127.0.0.1:{port}",), resamples=1, stuck_after=0)
    assert record["status"] == "action_error", (record.get("error"), record["steps"][-1].get("error"))
    assert len(record["steps"]) == 2 and len(requests) == 2
    assert "2 failing steps in a row" in record["steps"][-1]["error"]


def test_a_closed_browser_is_the_machines_fault(chromium, tmp_path):
    from flashtune.agent.executors.browser import BrowserExecutor

    browser, url = chromium
    context = browser.new_context(viewport={"width": 320, "height": 240})
    p = context.new_page()
    p.goto(url)
    ex = BrowserExecutor(p)
    context.close()
    with pytest.raises(Exception) as info:  # not an ActionError: nothing for the model to fix
        ex.navigate(url)
    assert not isinstance(info.value, ActionError)
    record, requests = run(tmp_path, ["Action: finished()"], ex)
    assert record["status"] == "error" and "closed" in record["error"] and requests == []


# -- X11 --------------------------------------------------------------------------------------------------
def test_x11_unsupported_action_goes_back_to_the_model(tmp_path):
    from flashtune.agent.executors.x11 import VirtualDisplay, X11Executor

    with VirtualDisplay(320, 240) as vd:
        record, requests = run(tmp_path, ["Action: navigate(content='https://example.com/')",
                                          "Action: finished(content='ok')"], X11Executor(vd.display),
                               template="browser", start_url="https://example.com/")
    assert record["status"] == "finished"
    assert record["steps"][0]["attempts"][0]["reason"] == "unsupported_action"
    assert "X11Executor executor cannot perform navigate()" in texts(requests[1]["messages"][-1])[0]
