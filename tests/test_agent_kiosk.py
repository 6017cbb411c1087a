"""Pages stay off this machine's disk. In the X11 executor's kiosk Chromium window (ChromiumWindow) a page can
start a download with no click at all, and one click on an <input type=file> opens a file chooser browsing the
home folder: the window's throw-away profile turns both off, and the control run, without those preferences,
shows that the harness sees both happen. The headless browser executor refuses downloads too."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from agent_fixtures.support import PageServer

PAGE = """<html><body style="margin:0">
<input type=file style="position:fixed; left:0; top:0; width:100%; height:100%; font-size:60px">
<script>
function save(name) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob(['#!/bin/sh\\nid\\n']));
  a.download = name;
  document.body.appendChild(a);
  a.click();
}
save('on-load.sh');
document.addEventListener('click', () => save('on-click.sh'));
</script></body></html>"""


def saved(*roots) -> list[str]:
    return sorted(f for root in roots for _, _, files in os.walk(root) for f in files if ".sh" in f)


def chooser_open(display: str) -> bool:
    found = subprocess.run(["xdotool", "search", "--name", "Open File"], env=dict(os.environ, DISPLAY=display),
                           capture_output=True)
    return found.returncode == 0


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


@pytest.mark.parametrize("locked", [True, False], ids=["locked", "control"])
def test_kiosk_window_neither_downloads_nor_opens_a_file_chooser(locked, tmp_path, monkeypatch):
    from flashtune.agent.executors import x11
    from flashtune.agent.policy import Policy

    site, home = tmp_path / "site", tmp_path / "home"
    site.mkdir()
    home.mkdir()
    (site / "page.html").write_text(PAGE)
    monkeypatch.setenv("HOME", str(home))  # where Chromium would put ~/Downloads
    if not locked:
        monkeypatch.setattr(x11, "_lock_profile", lambda profile: None)
    server = PageServer(str(site))
    vd = x11.VirtualDisplay(640, 480)
    window = None
    try:
        window = x11.ChromiumWindow(vd.display, server.url(), 640, 480,
                                    policy=Policy(template="computer", start_url=server.url()))
        window.wait_until_drawn(30)
        x11.X11Executor(vd.display).click(320, 240)  # on the file input, and the page's click handler
        if locked:
            time.sleep(3)
            assert not chooser_open(vd.display)
            assert saved(home, window.profile) == []
        else:
            assert wait_for(lambda: chooser_open(vd.display), 20)
            assert wait_for(lambda: saved(home) == ["on-click.sh", "on-load.sh"], 20), saved(home)
    finally:
        if window is not None:
            window.close()
        vd.stop()
        server.close()


def test_browser_executor_saves_no_downloads(tmp_path):
    """Playwright would keep a page's downloads in its artifacts folder until the browser closes."""
    import glob
    import tempfile

    from flashtune.agent.executors.browser import BrowserExecutor
    from flashtune.agent.policy import Policy

    (tmp_path / "page.html").write_text(PAGE)
    server = PageServer(str(tmp_path))
    pattern = os.path.join(tempfile.gettempdir(), "playwright-artifacts-*", "*")
    before = set(glob.glob(pattern))
    ex = BrowserExecutor.launch(server.url(), 640, 480, policy=Policy(template="browser", start_url=server.url()))
    try:
        ex.page.mouse.click(320, 240)
        ex.page.wait_for_timeout(2000)
        assert set(glob.glob(pattern)) - before == set()
    finally:
        ex.close()
        server.close()
