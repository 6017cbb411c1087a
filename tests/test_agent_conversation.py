"""Prompt templates, the conversation builder, the OpenAI-compatible client against a fake server on
127.0.0.1 (500s, timeouts, non-JSON, unparseable answers), the loop's stop rules with a scripted model, and
the pyautogui code emitted for each action."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest

from flashtune.agent.client import ChatClient, EndpointError, Sampling, chat_url
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.executors.pyautogui_code import to_pyautogui
from flashtune.agent.fake_server import FakeModelServer
from flashtune.agent.loop import AgentConfig, run_agent
from flashtune.agent.parser import parse_response
from flashtune.agent.prompts import TEMPLATES, add_box_tokens, build_messages, fill_template
from flashtune.errors import ConfigError


def png(color=(255, 255, 255), size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def images_of(messages):
    return [p["image_url"]["url"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]


# -- templates and messages ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_templates_fill_every_placeholder(kind):
    text = fill_template(kind, "Open the {settings} page", language="Chinese")
    assert "Open the {settings} page" in text  # braces in the instruction survive
    assert not re.search(r"\{(language|instruction)\}", text)
    assert text.startswith("You are a GUI agent.")
    if kind != "grounding":
        assert "Use Chinese in `Thought` part" in text and "## Action Space" in text
        assert text.index("## Output Format") < text.index("## Action Space") < text.index("## Note") \
            < text.index("## User Instruction")
    # every action the template offers is one the parser accepts
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)\((.*)\)", line.split(" #")[0].strip())
        if m and line.strip()[0].isalpha() and "Action:" not in line:
            call = re.sub(r"x1,y1|x3,y3", "10,20", line.split(" #")[0].strip())
            call = call.replace("down or up or right or left", "down")
            parse_response("Action: " + call)


def test_mobile_template_has_mobile_actions():
    text = fill_template("mobile", "x")
    for name in ("long_press", "open_app", "press_home", "press_back"):
        assert name + "(" in text
    with pytest.raises(ConfigError):
        fill_template("tablet", "x")


@pytest.mark.parametrize("n_past", [0, 1, 3, 4, 5, 9])
def test_history_keeps_last_five_screenshots_and_every_response(n_past):
    shots = [png((i, 0, 0)) for i in range(n_past + 1)]
    responses = [f"Thought: step {i}\nAction: click(start_box='({i},{i})')" for i in range(n_past)]
    msgs = build_messages("do it", shots, responses)
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert "do it" in msgs[1]["content"][0]["text"]
    urls = images_of(msgs)
    assert len(urls) == min(n_past + 1, 5)
    sent = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
    assert sent == shots[-len(urls):]  # the most recent ones, in order, the current one last
    assert msgs[-1]["role"] == "user" and images_of([msgs[-1]]) == [urls[-1]]
    assistants = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
    assert assistants == [add_box_tokens(r) for r in responses]  # every response, in order
    for i, text in enumerate(assistants):
        assert f"<|box_start|>({i},{i})<|box_end|>" in text
    # each kept screenshot comes right before the answer given to it
    for i in range(max(0, n_past + 1 - 5), n_past):
        idx = next(k for k, m in enumerate(msgs) if m["role"] == "assistant" and f"step {i}" in
                   m["content"][0]["text"])
        assert msgs[idx - 1]["role"] == "user" and images_of([msgs[idx - 1]])


def test_build_messages_checks_counts():
    with pytest.raises(ValueError, match="one screenshot per step"):
        build_messages("x", [png()], ["Action: wait()"])


# -- client --------------------------------------------------------------------------------------------------
def test_client_request_json_and_answer():
    with FakeModelServer(["Thought: hi\nAction: wait()"]) as fake:
        client = ChatClient(fake.url, model="ui-tars-1.5-7b", api_key="k",
                            sampling=Sampling(temperature=0.0, top_p=0.7, max_tokens=77))
        text = client.complete([{"role": "user", "content": "x"}])
        req = fake.requests[0]
    assert text == "Thought: hi\nAction: wait()"
    assert req["model"] == "ui-tars-1.5-7b" and req["messages"] == [{"role": "user", "content": "x"}]
    assert (req["temperature"], req["top_p"], req["max_tokens"]) == (0.0, 0.7, 77)


def test_client_retries_5xx_and_non_json_with_backoff():
    sleeps = []
    with FakeModelServer([{"status": 500}, {"status": 503}, {"raw": "<html>oops"}, "Action: wait()"]) as fake:
        client = ChatClient(fake.url, retries=3, backoff=0.5, sleep=sleeps.append)
        assert client.complete([]) == "Action: wait()"
    assert sleeps == [0.5, 1.0, 2.0]
    assert client.requests_sent == 4


def test_client_gives_up_after_retries():
    with FakeModelServer([{"status": 500}] * 3) as fake:
        client = ChatClient(fake.url, retries=2, sleep=lambda s: None)
        with pytest.raises(EndpointError, match="failed 3 times.*HTTP 500"):
            client.complete([])


def test_client_does_not_retry_4xx():
    with FakeModelServer([{"status": 400}, "Action: wait()"]) as fake:
        client = ChatClient(fake.url, retries=3, sleep=lambda s: None)
        with pytest.raises(EndpointError, match="HTTP 400"):
            client.complete([])
        assert len(fake.requests) == 1


def test_client_timeout_then_success():
    with FakeModelServer([{"delay": 1.0, "content": "late"}, "Action: wait()"]) as fake:
        client = ChatClient(fake.url, timeout=0.2, retries=1, sleep=lambda s: None)
        assert client.complete([]) == "Action: wait()"


def test_client_unreachable():
    with FakeModelServer([]) as fake:
        url = fake.url
    with pytest.raises(EndpointError, match="failed 2 times"):
        ChatClient(url, timeout=0.5, retries=1, sleep=lambda s: None).complete([])


def test_resample_at_temperature_one_after_parse_failure(tmp_path):
    # the loop asks again (ChatClient.predict, which did the same, was removed as unused)
    with FakeModelServer(["I think I should click", "Action: click(start_box='(1,2)')"]) as fake:
        record = run_agent("task", ChatClient(fake.url), RecordingExecutor(), str(tmp_path),
                           AgentConfig(max_steps=1, settle_seconds=0), sleep=lambda s: None)
        temps = [r["temperature"] for r in fake.requests]
    assert record["steps"][0]["action_strings"] == ["click(start_box='(1,2)')"]
    assert temps == [0.0, 1.0]


def test_endpoint_validation():
    assert chat_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    with pytest.raises(ConfigError, match="endpoint"):
        ChatClient("127.0.0.1:8000")
    with pytest.raises(ConfigError, match="loopback"):
        FakeModelServer([], host="0.0.0.0")


# -- the loop with a scripted model and a recording executor ---------------------------------------------
class RecordingExecutor:
    scale_factor = 1.0

    def __init__(self):
        self.done = []

    def screenshot(self):
        return png(size=(320, 200))

    def mapper(self, width, height, version="1.5", **kw):
        return CoordinateMapper(width, height, version=version, **kw)

    def execute(self, action, mapper):
        self.done.append((action.name, mapper.coord_center_to_input(action.start) if action.start else None))


def run_scripted(tmp_path, script, **cfg):
    sleeps = []
    ex = RecordingExecutor()
    with FakeModelServer(script) as fake:
        record = run_agent("task", ChatClient(fake.url, sleep=sleeps.append), ex, str(tmp_path),
                           AgentConfig(settle_seconds=0, **cfg), sleep=sleeps.append)
    return record, ex, sleeps


def test_loop_stops_on_call_user(tmp_path):
    record, ex, _ = run_scripted(tmp_path, ["Action: click(start_box='(100,100)')", "Action: call_user()",
                                            "Action: wait()"])
    assert record["status"] == "call_user" and len(record["steps"]) == 2
    # 320x200 is below min_pixels: smart_resize scales by sqrt(78400 / 64000) and ceils to 364x224
    assert record["steps"][0]["model_size"] == [364, 224]
    assert ex.done == [("click", pytest.approx((100 / 364 * 320, 100 / 224 * 200)))]


def test_loop_step_limit_and_wait_clock(tmp_path):
    record, ex, sleeps = run_scripted(tmp_path, ["Action: wait()"] * 3, max_steps=3, wait_seconds=7)
    assert record["status"] == "max_steps" and len(record["steps"]) == 3
    assert sleeps == [7, 7, 7] and ex.done == []


def test_loop_parse_error_is_recorded(tmp_path):
    record, _, _ = run_scripted(tmp_path, ["garbage", "more garbage"], resamples=1)
    assert record["status"] == "parse_error"
    assert record["steps"][0]["responses"] == ["garbage", "more garbage"]
    assert json.loads((tmp_path / "trajectory.json").read_text())["status"] == "parse_error"


def test_loop_endpoint_error_is_recorded(tmp_path):
    record, _, _ = run_scripted(tmp_path, [{"status": 404}])
    assert record["status"] == "endpoint_error" and "404" in record["steps"][0]["error"]


def test_agent_config_round_trip_and_validation():
    cfg = AgentConfig(max_steps=3, model_version="1.0")
    assert AgentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="max_steps"):
        AgentConfig(max_steps=0)
    with pytest.raises(ConfigError, match="template"):
        AgentConfig(template="grounding")


# -- pyautogui code ------------------------------------------------------------------------------------------
def test_pyautogui_code_matches_reference_layout():
    m = CoordinateMapper(1920, 1080, version="1.0")
    step = parse_response(
        "Action: click(start_box='(500,500)')\n\nleft_double(start_box='(100,200)')\n\n"
        "right_single(start_box='(0,0)')\n\ndrag(start_box='(100,100)', end_box='(200,300)')\n\n"
        "scroll(start_box='(500,500)', direction='up')\n\nscroll(start_box='(500,500)', direction='down')\n\n"
        "scroll(start_box='(500,500)', direction='left')\n\ntype(content='hi\\n')\n\n"
        "hotkey(key='ctrl arrowleft')\n\npress(key='shift')\n\nrelease(key='shift')")
    code = to_pyautogui(step.actions, m).splitlines()
    assert code[:3] == ["import pyautogui", "import time", "import pyperclip"]
    body = [line for line in code[3:] if line != "time.sleep(1)"]
    assert body == [
        "pyautogui.click(960.0, 540.0, button='left')",
        "pyautogui.doubleClick(192.0, 216.0, button='left')",
        "pyautogui.click(0.0, 0.0, button='right')",
        "pyautogui.moveTo(192.0, 108.0)", "pyautogui.dragTo(384.0, 324.0, duration=1.0)",
        "pyautogui.scroll(5, x=960.0, y=540.0)", "pyautogui.scroll(-5, x=960.0, y=540.0)",
        "pyautogui.hscroll(-5, x=960.0, y=540.0)",
        "pyperclip.copy('hi')", "pyautogui.hotkey('ctrl', 'v')", "time.sleep(0.5)", "pyautogui.press('enter')",
        "pyautogui.hotkey('ctrl', 'left')",
        "pyautogui.keyDown('shift')", "pyautogui.keyUp('shift')",
    ]
    assert code.count("time.sleep(1)") == len(step.actions) - 1
    compile("\n".join(code), "<pyautogui>", "exec")  # valid Python


def test_pyautogui_special_answers_and_write_mode():
    m = CoordinateMapper(100, 100, version="1.0")
    assert to_pyautogui(parse_response("Action: finished(content='x')").actions, m) == "DONE"
    assert to_pyautogui(parse_response("Action: call_user()").actions, m) == "FAIL"
    assert to_pyautogui(parse_response("Action: wait()").actions, m) == "WAIT"
    code = to_pyautogui(parse_response("Action: type(content='a\\'b')").actions, m, input_swap=False)
    assert code.endswith("pyautogui.write(\"a'b\", interval=0.1)")
    assert "unsupported" in to_pyautogui(parse_response("Action: open_app(app_name='Maps')").actions, m)
