"""The README's scripted end-to-end example: `flashtune agent run` against examples/agent/page.html with the
fake model replaying examples/agent/script.json; the page turns green only when the name was typed and the
button clicked, which the last screenshot must show."""

from __future__ import annotations

import io
import json
import os

from agent_fixtures.support import PageServer
from flashtune.agent.fake_server import FakeModelServer, load_script
from flashtune.cli import main

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "agent")


def test_example_run_browser(tmp_path, capsys):
    from PIL import Image

    pages = PageServer(EXAMPLE)
    try:
        with FakeModelServer(load_script(os.path.join(EXAMPLE, "script.json"))) as fake:
            code = main(["agent", "run", "--task", "Subscribe to the newsletter as Ada", "--endpoint", fake.url,
                         "--executor", "browser", "--start-url", pages.url("page.html"), "--size", "1280x720",
                         "--max-steps", "6", "--out", str(tmp_path)])
    finally:
        pages.close()
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0 and "status: finished after 4 step(s)" in out and "Subscribed as Ada." in out
    record = json.loads((tmp_path / "trajectory.json").read_text())
    first = Image.open(io.BytesIO((tmp_path / "step_000.png").read_bytes())).convert("RGB")
    last = Image.open(io.BytesIO((tmp_path / "step_003.png").read_bytes())).convert("RGB")
    assert first.getpixel((900, 600)) == (244, 244, 248)  # #f4f4f8 before
    assert last.getpixel((900, 600)) == (200, 247, 197)  # #c8f7c5 once subscribed
    assert record["steps"][0]["model_size"] == [1288, 728]
    # the trajectory says whether Chromium ran sandboxed, and why not (as root it cannot)
    from flashtune.agent.executors.browser import sandbox_status

    assert record["sandbox"] == sandbox_status()
    if os.geteuid() == 0:
        assert not record["sandbox"]["enabled"] and "root" in record["sandbox"]["reason"]
    if not record["sandbox"]["enabled"]:
        assert "sandbox: off" in (tmp_path / "report.html").read_text()
        assert "without its sandbox" in captured.err
    assert (tmp_path / "report.html").read_text().count("<img ") == 4


def test_example_run_x11(tmp_path, capsys):
    """The same example on a fresh Xvfb, in a kiosk Chromium window, driven by xdotool."""
    from PIL import Image

    pages = PageServer(EXAMPLE)
    try:
        with FakeModelServer(load_script(os.path.join(EXAMPLE, "script.json"))) as fake:
            code = main(["agent", "run", "--task", "Subscribe to the newsletter as Ada", "--endpoint", fake.url,
                         "--executor", "x11", "--start-url", pages.url("page.html"), "--size", "1280x720",
                         "--max-steps", "6", "--out", str(tmp_path)])
    finally:
        pages.close()
    assert code == 0 and "status: finished after 4 step(s)" in capsys.readouterr().out
    last = Image.open(io.BytesIO((tmp_path / "step_003.png").read_bytes())).convert("RGB")
    assert last.size == (1280, 720) and last.getpixel((900, 600)) == (200, 247, 197)
