"""`agent run` when the run fails before its first step (issue 16 item 2): Chromium or Xvfb missing, a start URL
that does not load, an endpoint that refuses. The run folder still gets trajectory.json (status and reason) and
report.html; the CLI prints one line, without a traceback, and exits with the error's code (2: the user's input,
3: a missing dependency). Options that are wrong in themselves are refused before anything is written
(test_agent_loop_guard.py)."""

from __future__ import annotations

import json
import socket

from agent_fixtures.support import PageServer
from flashtune.cli import main


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_run(tmp_path, capsys, *args, endpoint="http://127.0.0.1:9/v1"):
    out = tmp_path / "run"
    code = main(["agent", "run", "--task", "t", "--endpoint", endpoint, "--retries", "0", "--size", "320x240",
                 "--out", str(out), *args])
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if not ln.startswith("note: ")]
    assert "Traceback" not in captured.err and len(err) == 1, captured.err
    record = json.loads((out / "trajectory.json").read_text())
    report = (out / "report.html").read_text()
    assert record["error"] and record["status"] in report
    return code, err[0], record


def test_start_url_that_does_not_load(tmp_path, capsys):
    dead = f"http://127.0.0.1:{closed_port()}/"
    code, err, record = agent_run(tmp_path, capsys, "--start-url", dead)
    assert code == 2 and "start URL" in err and "ERR_CONNECTION_REFUSED" in err and "trajectory.json" in err
    assert record["status"] == "error" and record["stage"] == "launch" and record["steps"] == []
    assert "ERR_CONNECTION_REFUSED" in record["error"]


def test_x11_start_url_that_does_not_load(tmp_path, capsys, monkeypatch):
    """The kiosk window would show Chromium's own error page as if it were the task: the address is fetched
    first, and a dead one is one line before any display starts (Xvfb off PATH proves none was needed)."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    dead = f"http://127.0.0.1:{closed_port()}/"
    code, err, record = agent_run(tmp_path, capsys, "--executor", "x11", "--start-url", dead)
    assert code == 2 and "start URL" in err and "Connection refused" in err
    assert record["status"] == "error" and record["executor"] == "x11" and "Xvfb" not in record["error"]


def test_x11_start_url_check_counts_any_http_answer_as_loading():
    from flashtune.agent.executors.x11 import check_start_url

    pages = PageServer()
    try:
        check_start_url(pages.url())  # a page
        check_start_url(pages.url() + "no-such-page.html")  # a 404 renders too
    finally:
        pages.close()


def test_chromium_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLASHTUNE_CHROMIUM", str(tmp_path / "no-chromium"))
    code, err, record = agent_run(tmp_path, capsys)
    assert code == 3 and "FLASHTUNE_CHROMIUM" in err
    assert record["status"] == "error" and "no-chromium" in record["error"]


def test_xvfb_missing(tmp_path, capsys, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code, err, record = agent_run(tmp_path, capsys, "--executor", "x11")
    assert code == 3 and "Xvfb is not installed" in err
    assert record["status"] == "error" and record["executor"] == "x11" and "apt-get install xvfb" in record["error"]


def test_endpoint_that_refuses(tmp_path, capsys):
    pages = PageServer()
    try:
        code, err, record = agent_run(tmp_path, capsys, "--start-url", pages.url(),
                                      endpoint=f"http://127.0.0.1:{closed_port()}/v1")
    finally:
        pages.close()
    assert code == 2 and "endpoint" in err and "Connection refused" in err
    assert record["status"] == "endpoint_error" and "Connection refused" in record["error"]


def test_ctrl_c_while_starting(tmp_path, capsys, monkeypatch):
    from flashtune.agent.executors.browser import BrowserExecutor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BrowserExecutor, "launch", interrupted)
    code = main(["agent", "run", "--task", "t", "--endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    record = json.loads((tmp_path / "trajectory.json").read_text())
    assert record["status"] == "interrupted" and record["stage"] == "launch"
    assert (tmp_path / "report.html").exists()
