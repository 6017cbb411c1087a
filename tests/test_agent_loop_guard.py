"""The agent loop under bad model output (issues 16 and 13): refusals and parse errors sent back to the model with
bounded retries, files written on every ending (executor crashes included), held keys released, the stuck guard,
and screenshots resized to the server's pixel budget so that a 4K screen maps right."""

from __future__ import annotations

import base64
import io
import json

import pytest

from flashtune.agent.client import ChatClient
from flashtune.agent.coords import CoordinateMapper, smart_resize
from flashtune.agent.fake_server import FakeModelServer
from flashtune.agent.loop import AgentConfig, run_agent
from flashtune.cli import main


def png(size=(320, 200), color=(255, 255, 255)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class Executor:
    """Records what it is asked to do; screenshots come from `frames` (the last one repeats)."""

    scale_factor = 1.0

    def __init__(self, frames=None, crash_on=None):
        self.frames = list(frames or [png()])
        self.done, self.crash_on, self.shots = [], crash_on, 0

    def screenshot(self):
        if self.crash_on == "screenshot" and self.shots:
            raise OSError("X connection lost")
        frame = self.frames[min(self.shots, len(self.frames) - 1)]
        self.shots += 1
        return frame

    def mapper(self, width, height, version="1.5", **kw):
        return CoordinateMapper(width, height, version=version, **kw)

    def execute(self, action, mapper):
        if self.crash_on == action.name:
            raise RuntimeError("Target page, context or browser has been closed")
        point = mapper.coord_center_to_input(action.start) if action.start else None
        self.done.append((action.name, action.text, point))


def run(tmp_path, script, executor=None, **cfg):
    executor = executor or Executor()
    with FakeModelServer(script) as fake:
        record = run_agent("task", ChatClient(fake.url, sleep=lambda s: None), executor, str(tmp_path),
                           AgentConfig(settle_seconds=0, **cfg), sleep=lambda s: None)
        requests = fake.requests
    on_disk = json.loads((tmp_path / "trajectory.json").read_text())
    assert on_disk["status"] == record["status"]  # the files always end the run
    assert record["status"] in (tmp_path / "report.html").read_text()
    return record, executor, requests


def texts(message):
    return [p["text"] for p in message["content"] if isinstance(p, dict) and p.get("type") == "text"]


def test_refusal_goes_back_to_the_model_and_nothing_runs(tmp_path):
    record, ex, requests = run(tmp_path, ["Action: click(start_box='(10,10)')\n\nhotkey(key='ctrl o')",
                                          "Action: hotkey(key='ctrl c')", "Action: finished(content='ok')"])
    assert record["status"] == "finished"
    assert ex.done == [("hotkey", "ctrl c", None)]  # not even the click that came before the refused chord
    first = record["steps"][0]
    assert first["attempts"][0]["reason"] == "refused" and "ctrl+o" in first["attempts"][0]["error"]
    assert first["responses"][0].endswith("hotkey(key='ctrl o')") and first["executed"] == ["hotkey(key='ctrl c')"]
    retry = requests[1]
    assert retry["temperature"] == 1.0 and requests[0]["temperature"] == 0.0
    assert retry["messages"][-2]["role"] == "assistant" and "ctrl o" in texts(retry["messages"][-2])[0]
    feedback = texts(retry["messages"][-1])[0]
    assert feedback.startswith("Error: refused hotkey") and "Nothing of that step was executed" in feedback
    # the refused answer does not enter the history of later steps
    assert not any("ctrl o" in t for m in requests[2]["messages"] for t in texts(m))


def test_ctrl_plus_c_is_a_parse_error_to_retry_not_an_error_status(tmp_path):
    # issue 16: hotkey(key='ctrl+c') ended the episode with status 'error'
    record, ex, requests = run(tmp_path, ["Action: hotkey(key='ctrl+c')", "Action: hotkey(key='ctrl c')",
                                          "Action: finished()"])
    assert record["status"] == "finished" and ex.done == [("hotkey", "ctrl c", None)]
    attempt = record["steps"][0]["attempts"][0]
    assert attempt["reason"] == "bad_argument" and "'ctrl c'" in attempt["error"]
    assert "separate keys with spaces" in texts(requests[1]["messages"][-1])[0]


def test_retries_are_bounded(tmp_path):
    record, ex, requests = run(tmp_path, ["Action: navigate(content='file:///etc/passwd')"] * 5,
                               template="browser", start_url="http://127.0.0.1:1/", resamples=2)
    assert record["status"] == "refused" and len(requests) == 3 and ex.done == []
    assert "only http and https" in record["steps"][0]["error"]
    assert "file:///etc/passwd" in (tmp_path / "report.html").read_text()  # the refusals are in the report


def test_400_digit_coordinate_ends_with_files(tmp_path):
    # issue 13: OverflowError in Coord.center, and the run ended without trajectory.json
    huge = "9" * 400
    record, ex, _ = run(tmp_path, [f"Action: click(start_box='({huge},{huge})')"] * 3)
    assert record["status"] == "parse_error" and ex.done == []
    assert all(a["reason"] == "bad_coordinate" for a in record["steps"][0]["attempts"])


def test_400_digit_coordinate_in_agent_parse(capsys):
    code = main(["agent", "parse", "--text", f"Action: click(start_box='({'9' * 400},1)')", "--screen",
                 "1920x1080"])
    err = capsys.readouterr().err
    assert code == 2 and "bad_coordinate" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and len(err) < 400


def test_ten_thousand_character_answer(tmp_path):
    record, ex, _ = run(tmp_path, ["Thought: " + "blah " * 2000] * 3, resamples=2)
    assert record["status"] == "parse_error" and ex.done == []
    assert len(record["steps"][0]["responses"]) == 3


@pytest.mark.parametrize("crash_on", ["click", "screenshot"])
def test_executor_crash_still_writes_the_files(tmp_path, crash_on):
    record, _, _ = run(tmp_path, ["Action: click(start_box='(10,10)')", "Action: finished()"],
                       executor=Executor(crash_on=crash_on))
    assert record["status"] == "error"
    assert ("RuntimeError" if crash_on == "click" else "OSError") in record["error"]


class OnDiskExecutor(Executor):
    """Reads trajectory.json before each screenshot: what a crash at that moment would leave."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir, self.on_disk = out_dir, []

    def screenshot(self):
        path = self.out_dir / "trajectory.json"
        self.on_disk.append(json.loads(path.read_text())["steps"] if path.exists() else None)
        return super().screenshot()


def test_trajectory_is_written_once_per_step(tmp_path, monkeypatch):
    from flashtune.agent import loop

    writes = []  # how many steps each write of the record holds
    real = loop.write_record
    monkeypatch.setattr(loop, "write_record", lambda out_dir, record: (writes.append(len(record["steps"])),
                                                                       real(out_dir, record)))
    ex = OnDiskExecutor(tmp_path)
    record, _, _ = run(tmp_path, ["Action: click(start_box='(10,10)')", "Action: type(content='hi')",
                                  "Action: click(start_box='(20,20)')"], executor=ex, max_steps=3)
    assert record["status"] == "max_steps" and len(ex.done) == 3
    assert writes == [1, 2, 3, 3]  # once per step, then once at the end of the run
    # before step N the file holds the N steps before it, each with what it executed
    assert ex.on_disk[0] is None
    assert [[s["executed"] for s in steps] for steps in ex.on_disk[1:]] == [
        [["click(start_box='(10,10)')"]],
        [["click(start_box='(10,10)')"], ["type(content='hi')"]]]


class BlockingExecutor(Executor):
    """A sandbox that refuses what the page tries: one request while the start page loads, and `per_click`
    more for each click (in `blocked`, as the browser executor's request guard and egress proxy list them)."""

    def __init__(self, per_click=1):
        super().__init__()
        self.per_click, self.blocked = per_click, ["http://169.254.169.254/start"]

    def execute(self, action, mapper):
        super().execute(action, mapper)
        if action.name == "click":
            n = len(self.blocked)
            self.blocked.extend(f"http://10.0.0.1/{n + i}" for i in range(self.per_click))


def test_sandbox_refusals_are_recorded_on_their_step(tmp_path):
    from flashtune.agent.loop import BLOCKED_SHOWN

    record, ex, _ = run(tmp_path, ["Action: click(start_box='(10,10)')", "Action: type(content='hi')",
                                   "Action: click(start_box='(20,20)')", "Action: finished()"],
                        executor=BlockingExecutor())
    assert record["status"] == "finished" and record["blocked"] == ["http://169.254.169.254/start"]
    assert [s.get("blocked") for s in record["steps"]] == [["http://10.0.0.1/1"], None, ["http://10.0.0.1/2"],
                                                           None]
    assert record["blocked_total"] == 3
    report = (tmp_path / "report.html").read_text()
    assert "http://10.0.0.1/2" in report and "by the start page" in report
    # a page that fires thousands: the trajectory keeps the first BLOCKED_SHOWN of each step, counts them all
    record, _, _ = run(tmp_path, ["Action: click(start_box='(10,10)')"], executor=BlockingExecutor(5000),
                       max_steps=1)
    assert record["status"] == "max_steps" and record["blocked_total"] == 5001
    assert record["steps"][0]["blocked"] == [f"http://10.0.0.1/{i}" for i in range(1, BLOCKED_SHOWN + 1)]


def test_held_keys_are_released_at_the_end_of_each_step(tmp_path):
    record, ex, _ = run(tmp_path, ["Action: press(key='ctrl')\n\nclick(start_box='(10,10)')",
                                   "Action: keydown(key='shift')\n\nkeyup(key='shift')", "Action: finished()"])
    assert record["status"] == "finished"
    assert [d[:2] for d in ex.done] == [("press", "ctrl"), ("click", None), ("release", "ctrl"),
                                        ("keydown", "shift"), ("keyup", "shift")]
    assert record["steps"][0]["released"] == ["ctrl"] and "released" not in record["steps"][1]


def test_release_also_after_a_failed_action(tmp_path):
    record, ex, _ = run(tmp_path, ["Action: press(key='ctrl')\n\nclick(start_box='(10,10)')"],
                        executor=Executor(crash_on="click"))
    assert record["status"] == "error" and ex.done[-1][:2] == ("release", "ctrl")


def test_same_action_on_unchanged_screen_is_stuck(tmp_path):
    click = "Action: click(start_box='(10,10)')"
    record, ex, _ = run(tmp_path, [click] * 6, stuck_after=3, max_steps=6)
    assert record["status"] == "stuck" and len(record["steps"]) == 3 and len(ex.done) == 2
    assert "3 times" in record["steps"][-1]["error"]


def test_stuck_guard_is_configurable_and_needs_an_unchanged_screen(tmp_path):
    click = "Action: click(start_box='(10,10)')"
    record, ex, _ = run(tmp_path / "a", [click] * 4, stuck_after=0, max_steps=4)
    assert record["status"] == "max_steps" and len(ex.done) == 4
    record, ex, _ = run(tmp_path / "b", [click] * 4, stuck_after=2, max_steps=4)
    assert record["status"] == "stuck" and len(ex.done) == 1
    changing = Executor([png(color=(i * 40, 0, 0)) for i in range(5)])
    record, ex, _ = run(tmp_path / "c", [click] * 4, executor=changing, stuck_after=2, max_steps=4)
    assert record["status"] == "max_steps" and len(ex.done) == 4
    record, ex, _ = run(tmp_path / "d", [click, "Action: scroll(direction='down')", click, click], stuck_after=2,
                        max_steps=4)
    assert record["status"] == "stuck" and len(ex.done) == 3


def test_stuck_after_flag(capsys):
    with pytest.raises(SystemExit):
        main(["agent", "run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--stuck-after", "--allow-host", "--answer-retries", "--max-type-chars", "browser"):
        assert flag in out


def test_4k_screenshot_is_resized_to_the_servers_budget(tmp_path):
    # issue 16: at 3840x2160 the screenshot went out at full size while coordinates were mapped with
    # --max-pixels, so a model x of 1000 was clicked at ~1001 instead of ~1988.
    from PIL import Image

    budget = 2700 * 28 * 28  # the desktop SDK's v1 budget
    ex = Executor([png(size=(3840, 2160), color=(30, 60, 90))])
    record, ex, requests = run(tmp_path, ["Action: click(start_box='(1000,500)')", "Action: finished()"],
                               executor=ex, max_pixels=budget)
    url = [p for p in requests[0]["messages"][-1]["content"] if p.get("type") == "image_url"][0]["image_url"]["url"]
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (1932, 1064)  # smart_resize(2160, 3840, max_pixels=2700*28*28), worked by hand
    # the server's processor (default budget) leaves that image as it is: the model's frame is the image sent
    assert smart_resize(1064, 1932) == (1064, 1932)
    assert record["steps"][0]["image_sent_size"] == [1932, 1064] and record["steps"][0]["model_size"] == [1932, 1064]
    (name, _, (x, y)), = ex.done
    assert x == pytest.approx(1000 * 3840 / 1932) and round(x) == 1988
    assert y == pytest.approx(500 * 2160 / 1064)


def test_agent_run_cli_with_a_400_digit_coordinate(tmp_path, capsys):
    # issue 13: `agent run` ended in OverflowError without trajectory.json
    from agent_fixtures.support import PageServer

    pages = PageServer()
    try:
        with FakeModelServer([f"Action: click(start_box='({'9' * 400},5)')"] * 3) as fake:
            code = main(["agent", "run", "--task", "t", "--endpoint", fake.url, "--executor", "browser",
                         "--start-url", pages.url(), "--size", "640x480", "--out", str(tmp_path)])
    finally:
        pages.close()
    captured = capsys.readouterr()
    assert code == 1 and "status: parse_error after 1 step(s)" in captured.out and "Traceback" not in captured.err
    record = json.loads((tmp_path / "trajectory.json").read_text())
    assert record["status"] == "parse_error" and (tmp_path / "report.html").exists()
    assert [a["reason"] for a in record["steps"][0]["attempts"]] == ["bad_coordinate"] * 3


@pytest.mark.parametrize("args,needle", [
    (["--start-url", "file:///etc/passwd"], "start URL"),
    (["--allow-host", "bad host"], "allow host"),
    (["--stuck-after", "1"], "stuck_after"),
    (["--max-type-chars", "0"], "max_type_chars"),
])
def test_agent_run_cli_refuses_bad_policy_options(tmp_path, capsys, args, needle):
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["agent", "run", "--task", "t", "--endpoint", "http://127.0.0.1:9/v1", "--out",
                 str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing started, nothing written
