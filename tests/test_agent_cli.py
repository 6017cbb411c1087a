"""`flashtune agent` helpers (help, parse, fake-server as a process) and the executor dispatch table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashtune.agent.client import ChatClient
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.executors.base import UnsupportedActionError, normalize_key, perform, split_typed_text
from flashtune.agent.parser import parse_response
from flashtune.cli import main
from flashtune.errors import FlashtuneError


def test_agent_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["agent", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "ground", "parse", "fake-server"):
        assert name in out
    with pytest.raises(SystemExit):
        main(["agent", "run", "--help"])
    out = capsys.readouterr().out
    assert "--executor" in out and "--start-url" in out and "--model-version" in out


def test_parse_command(capsys):
    code = main(["agent", "parse", "--text", "Thought: t\nAction: click(start_box='(500,500)')",
                 "--screen", "1920x1080", "--model-version", "1.0"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["actions"][0]["action"] == "click" and out["screen_points"] == [[960.0, 540.0]]
    assert "pyautogui.click(960.0, 540.0, button='left')" in out["pyautogui"]
    assert main(["agent", "parse", "--text", "Action: click(start_box='=')"]) == 2  # a one-line user error
    assert "bad_coordinate" in capsys.readouterr().err


def test_fake_server_command(tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps(["Action: wait()", {"status": 500}, "Action: finished()"]))
    proc = subprocess.Popen([sys.executable, "-m", "flashtune", "agent", "fake-server", "--script", str(script),
                             "--linger", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fake UI-TARS endpoint: http://127.0.0.1:")
        client = ChatClient(line.split(": ", 1)[1].strip(), sleep=lambda s: None)
        assert client.complete([]) == "Action: wait()"
        assert client.complete([]) == "Action: finished()"  # the 500 was retried
        assert proc.wait(timeout=20) == 0  # exits once the script is used up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


def run(text, mapper=None):
    rec = Recorder()
    mapper = mapper or CoordinateMapper(2000, 1000, version="1.0", scale_factor=2.0)
    for a in parse_response(text).actions:
        perform(a, mapper, rec)
    return rec.calls


def test_dispatch_to_primitives():
    # 1.0 frame on a 2000x1000 screenshot at scale 2: (500,500) -> (1000,500) px -> (500,250) input units
    assert run("Action: click(start_box='(500,500)')") == [("click", (500.0, 250.0), {"button": "left", "count": 1})]
    assert run("Action: left_double(start_box='(500,500)')")[0][2] == {"button": "left", "count": 2}
    assert run("Action: right_single(start_box='(500,500)')")[0][2] == {"button": "right", "count": 1}
    assert run("Action: drag(start_box='(0,0)', end_box='(1000,1000)')") == [
        ("drag", (0.0, 0.0, 1999 / 2, 999 / 2), {})]  # clamped to the last pixel
    assert run("Action: scroll(direction='up')") == [("scroll", (500.0, 250.0, "up", 5), {})]  # screen centre
    assert run("Action: scroll(start_box='(0,0)', end_box='(0,500)')")[0][0] == "drag"  # v1 mobile swipe
    # only a trailing newline submits; one inside the content is a line break (issue 16)
    assert run("Action: type(content='a\\nb\\n')") == [
        ("type_text", ("a",), {}), ("line_break", (), {}), ("type_text", ("b",), {}), ("hotkey", (["enter"],), {})]
    assert run("Action: type(content='a\\nb')") == [
        ("type_text", ("a",), {}), ("line_break", (), {}), ("type_text", ("b",), {})]
    # type(content=..., start_box=...) from the official training action space: focus the field, then type
    assert run("Action: type(content='hi', start_box='(500,500)')") == [
        ("click", (500.0, 250.0), {"button": "left", "count": 1}), ("type_text", ("hi",), {})]
    assert run("Action: hotkey(key='Ctrl Shift ArrowLeft')") == [("hotkey", (["ctrl", "shift", "left"],), {})]
    assert run("Action: press(key='ctrl')\n\nrelease(key='ctrl')") == [("key_down", ("ctrl",), {}),
                                                                       ("key_up", ("ctrl",), {})]
    assert run("Action: long_press(start_box='(500,500)')") == [("long_press", (500.0, 250.0), {"seconds": 1.0})]
    assert run("Action: navigate(content='http://127.0.0.1/')") == [("navigate", ("http://127.0.0.1/",), {})]
    assert run("Action: press_back()") == [("go_back", (), {})]
    assert run("Action: wait()\n\nfinished()\n\ncall_user()") == []


def test_dispatch_errors_and_keys():
    class NoNav:
        def click(self, *a, **k):
            pass

    with pytest.raises(UnsupportedActionError, match="open_app"):
        perform(parse_response("Action: open_app(app_name='Maps')").actions[0], CoordinateMapper(10, 10), NoNav())
    with pytest.raises(UnsupportedActionError, match="navigate"):
        perform(parse_response("Action: navigate(content='x')").actions[0], CoordinateMapper(10, 10), NoNav())
    with pytest.raises(FlashtuneError, match="unknown key"):
        normalize_key("hyperdrive")
    assert [normalize_key(k) for k in ("Return", "ESC", "cmd", "PgDn", "A", "F5")] == \
        ["enter", "escape", "meta", "pagedown", "a", "f5"]
    assert split_typed_text("\n\nx") == (["\n", "\n", "x"], False)
    assert split_typed_text("x\n\n") == (["x", "\n"], True)


def test_annotate_draws_at_the_mapped_point():
    import io

    from PIL import Image

    from flashtune.agent.report import COLORS, annotate

    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 10, 10)).save(buf, format="PNG")
    mapper = CoordinateMapper(400, 300, version="1.0")
    actions = parse_response("Action: click(start_box='(500,500)')\n\nhotkey(key='ctrl c')").actions
    out = Image.open(io.BytesIO(annotate(buf.getvalue(), actions, mapper))).convert("RGB")
    assert out.size == (400, 300 + 8 + 20 * 2)  # a caption strip with one line per action
    # (500,500) in the 0-1000 frame is pixel (200,150): the crosshair passes through it
    assert out.getpixel((214, 150)) == COLORS["left"] and out.getpixel((200, 164)) == COLORS["left"]
    assert out.getpixel((50, 250)) == (10, 10, 10) and out.getpixel((380, 20)) == (10, 10, 10)
