"""`flashtune agent` sub-commands under bad input (an audit of run, ground and fake-server): each is one line on
stderr naming the problem and the fix, exit 2, no traceback; a refused command leaves every file as it was, and
what can be checked is checked before the costly part (Chromium, Xvfb, the model's answers)."""

from __future__ import annotations

import json
import os
import random
import socket

import pytest

from flashtune.agent.fake_server import FakeModelServer
from flashtune.cli import main
from tiny import readonly, snapshot

DEAD = "http://127.0.0.1:9/v1"


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `flashtune *argv` in-process; (exit code, the one stderr line), which must be the CLI's error line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("flashtune: error: "), err
    return code, lines[0]


def run_args(out, *args, endpoint=DEAD):
    return ["agent", "run", "--task", "t", "--endpoint", endpoint, "--retries", "0", "--size", "320x240",
            "--out", str(out), *args]


# -- agent run: --out ----------------------------------------------------------------------------------------

def test_run_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "existing.txt").write_text("keep me")
    before = snapshot(tmp_path)
    code, err = cli(capsys, *run_args(tmp_path / "existing.txt"))
    assert code == 2 and "--out" in err and "existing.txt" in err and "choose a folder" in err
    assert snapshot(tmp_path) == before


def test_run_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    before = snapshot(tmp_path)
    code, err = cli(capsys, *run_args(tmp_path / "f" / "run"))
    assert code == 2 and "--out" in err and "Not a directory" in err
    assert snapshot(tmp_path) == before


def test_run_out_in_a_read_only_folder(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    readonly(monkeypatch, ro)
    try:
        code, err = cli(capsys, *run_args(ro / "run"))
    finally:
        ro.chmod(0o755)
    assert code == 2 and "--out" in err and "Permission denied" in err
    assert not (ro / "run" / "trajectory.json").exists()


def _old_run(folder) -> dict:
    folder.mkdir()
    for name, data in (("trajectory.json", b'{"status": "finished"}'), ("report.html", b"<p>old</p>"),
                       ("step_000.png", b"old png")):
        (folder / name).write_bytes(data)
    return snapshot(folder)


def test_run_out_that_holds_a_run_is_refused(tmp_path, capsys):
    before = _old_run(tmp_path / "run")
    code, err = cli(capsys, *run_args(tmp_path / "run"))
    assert code == 2 and "already holds a run" in err and "choose a new --out" in err
    assert snapshot(tmp_path / "run") == before


def test_run_that_would_fail_to_start_keeps_the_old_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLASHTUNE_CHROMIUM", str(tmp_path / "no-chromium"))
    before = _old_run(tmp_path / "run")
    code, err = cli(capsys, *run_args(tmp_path / "run"))
    assert code == 2 and "already holds a run" in err
    assert snapshot(tmp_path / "run") == before


def test_record_failed_start_keeps_another_run(tmp_path):
    from flashtune.agent.loop import record_failed_start

    before = _old_run(tmp_path / "run")
    error = record_failed_start("t", str(tmp_path / "run"), RuntimeError("boom"))
    assert "boom" in str(error) and "nothing written" in str(error)
    assert snapshot(tmp_path / "run") == before


def test_default_out_does_not_reuse_a_run(tmp_path, monkeypatch):
    from flashtune.cli.agent import _default_out

    monkeypatch.chdir(tmp_path)
    first = _default_out()
    os.makedirs(first)
    assert _default_out() == first + "-2"


# -- agent run: options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["--scale-factor", "nan"], "--scale-factor"), (["--scale-factor", "0"], "--scale-factor"),
    (["--scale-factor", "-2"], "--scale-factor"), (["--startup-seconds", "-1"], "--startup-seconds"),
    (["--startup-seconds", "inf"], "--startup-seconds"), (["--executor", "x11", "--startup-seconds", "0"],
                                                          "--startup-seconds"),
    (["--display", ":0"], "--display"), (["--min-pixels", "100000", "--max-pixels", "10"], "--min-pixels"),
])
def test_run_options_refused_before_anything_starts(tmp_path, capsys, args, option):
    code, err = cli(capsys, *run_args(tmp_path / "run", *args))
    assert code == 2 and option in err
    assert not (tmp_path / "run").exists()


def test_display_only_with_x11(tmp_path, capsys):
    code, err = cli(capsys, *run_args(tmp_path / "run", "--display", ":0"))
    assert "--executor x11" in err


def _free_display() -> str:
    from flashtune.agent.executors.x11 import _libx11

    lib = _libx11()
    for _ in range(50):
        n = random.randrange(5000, 9000)
        if os.path.exists(f"/tmp/.X11-unix/X{n}"):
            continue
        dpy = lib.XOpenDisplay(f":{n}".encode())
        if not dpy:
            return f":{n}"
        lib.XCloseDisplay(dpy)
    pytest.skip("no unused X display number found")


def test_x11_display_that_does_not_exist_is_a_launch_failure(tmp_path, capsys):
    display = _free_display()
    code, err = cli(capsys, *run_args(tmp_path / "run", "--executor", "x11", "--display", display))
    assert code == 2 and f"cannot open X display '{display}'" in err and "--display" in err
    assert "trajectory.json" in err
    record = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert record["status"] == "error" and record["stage"] == "launch" and record["steps"] == []
    assert "cannot open X display" in record["error"] and (tmp_path / "run" / "report.html").exists()


# -- agent ground ---------------------------------------------------------------------------------------------

def _dataset(tmp_path, names=("a.png",), make=("a.png",)):
    from PIL import Image

    for name in make:
        Image.new("RGB", (200, 100), (250, 250, 250)).save(tmp_path / name)
    data = [{"img_filename": n, "bbox": [10, 10, 20, 20], "instruction": f"find {n}"} for n in names]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def ground(capsys, data, *args, script=("Action: click(start_box='(15,15)')",) * 4):
    """(exit code, error line, the requests the model got)."""
    with FakeModelServer(list(script)) as fake:
        code, err = cli(capsys, "agent", "ground", "--data", str(data), "--endpoint", fake.url, "--retries", "0",
                        *args)
        return code, err, fake.requests


def test_ground_data_that_is_binary(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_bytes(b"\xff\xfe\x00\x89PNG\r\n\x1a\n" + bytes(range(256)))
    code, err, requests = ground(capsys, data)
    assert code == 2 and "not UTF-8" in err and "data.json" in err and requests == []


def test_ground_missing_image_refuses_the_run_before_scoring(tmp_path, capsys):
    data = _dataset(tmp_path, names=("a.png", "gone.png", "gone2.png"))
    code, err, requests = ground(capsys, data)
    assert code == 2 and "gone.png" in err and "record 1" in err and "1 more" in err and "--images" in err
    assert requests == []


def test_ground_png_that_is_text(tmp_path, capsys):
    data = _dataset(tmp_path, names=("a.png", "fake.png"))
    (tmp_path / "fake.png").write_text("not an image")
    code, err, requests = ground(capsys, data)
    assert code == 2 and "fake.png" in err and "record 1" in err and "cannot be read as an image" in err
    assert requests == []


def test_ground_out_that_is_a_folder(tmp_path, capsys):
    data = _dataset(tmp_path)
    (tmp_path / "res").mkdir()
    before = snapshot(tmp_path)
    code, err, requests = ground(capsys, data, "--out", str(tmp_path / "res"))
    assert code == 2 and "--out" in err and "is a folder" in err and requests == []
    assert snapshot(tmp_path) == before


def test_ground_out_in_an_unwritable_place_is_refused_before_scoring(tmp_path, capsys):
    data = _dataset(tmp_path)
    (tmp_path / "f").write_text("a file")
    before = snapshot(tmp_path)
    code, err, requests = ground(capsys, data, "--out", str(tmp_path / "f" / "result.json"))
    assert code == 2 and "--out" in err and requests == []
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, option", [
    (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"),
    (["--min-pixels", "100000", "--max-pixels", "10"], "--min-pixels"), (["--min-pixels", "0"], "--min-pixels"),
])
def test_ground_options(tmp_path, capsys, args, option):
    data = _dataset(tmp_path)
    code, err, requests = ground(capsys, data, *args)
    assert code == 2 and option in err and requests == []


def test_ground_limit_scores_the_first_n(tmp_path, capsys):
    data = _dataset(tmp_path, names=("a.png", "a.png", "a.png"))
    with FakeModelServer(["Action: click(start_box='(15,15)')"] * 3) as fake:
        assert main(["agent", "ground", "--data", str(data), "--endpoint", fake.url, "--limit", "2"]) == 0
        assert len(fake.requests) == 2
    assert "/2), wrong_format 0" in capsys.readouterr().out


def test_pixel_rule_lives_in_one_place():
    from flashtune.agent.coords import CoordinateMapper, check_pixels
    from flashtune.agent.grounding import evaluate
    from flashtune.agent.loop import AgentConfig
    from flashtune.errors import ConfigError

    for make in (lambda: check_pixels(10, 5), lambda: AgentConfig(min_pixels=10, max_pixels=5),
                 lambda: CoordinateMapper(100, 100, min_pixels=10, max_pixels=5),
                 lambda: evaluate([], None, min_pixels=10, max_pixels=5)):
        with pytest.raises(ConfigError, match="min_pixels=10 is larger than max_pixels=5"):
            make()


# -- agent fake-server ----------------------------------------------------------------------------------------

def fake_server(capsys, tmp_path, *args, script=b"[]"):
    path = tmp_path / "script.json"
    path.write_bytes(script)
    return cli(capsys, "agent", "fake-server", "--script", str(path), *args)


def test_fake_server_script_that_is_binary(tmp_path, capsys):
    code, err = fake_server(capsys, tmp_path, script=b"\xff\xfe garbage \x80\x81")
    assert code == 2 and "not UTF-8" in err and "script.json" in err


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_fake_server_port_out_of_range(tmp_path, capsys, port):
    code, err = fake_server(capsys, tmp_path, "--port", port)
    assert code == 2 and "--port" in err and "65535" in err


def test_fake_server_port_in_use(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = fake_server(capsys, tmp_path, "--port", str(port))
    assert code == 2 and f"127.0.0.1:{port}" in err and "in use" in err and "another port" in err


@pytest.mark.parametrize("linger", ["-1", "nan", "inf"])
def test_fake_server_linger(tmp_path, capsys, linger):
    code, err = fake_server(capsys, tmp_path, "--linger", linger)
    assert code == 2 and "--linger" in err
