"""Prompt templates and the multi-turn conversation layout for UI-TARS (arXiv 2501.12326).

The templates follow the documented layout (role line, output format, action space, notes, instruction); the
wording is our own. The conversation follows OSWorld's UI-TARS agent: a system message, the filled template,
then for each earlier step its screenshot (only for the most recent ones, so that at most `history_n` images
are sent, the current one included) and the model's response, and last the current screenshot.
"""

from __future__ import annotations

import base64
import re

from flashtune.errors import check_choice, check_range

_HEAD = ("You are a GUI agent. You are given a task and your action history, with screenshots. "
         "You need to perform the next action to complete the task.")

_FORMAT = """## Output Format
```
Thought: ...
Action: ...
```"""

_NOTE = """## Note
- Use {language} in `Thought` part.
- Write a small plan and finally summarize your next action (with its target element) in one sentence in `Thought` part."""

COMPUTER_ACTIONS = """## Action Space
click(start_box='<|box_start|>(x1,y1)<|box_end|>')
left_double(start_box='<|box_start|>(x1,y1)<|box_end|>')
right_single(start_box='<|box_start|>(x1,y1)<|box_end|>')
drag(start_box='<|box_start|>(x1,y1)<|box_end|>', end_box='<|box_start|>(x3,y3)<|box_end|>')
hotkey(key='ctrl c') # Lower-case keys separated by spaces, at most 3 keys in one hotkey.
type(content='xxx') # Escape single quotes, double quotes and newlines (\\', \\", \\n). End the content with \\n to submit the input.
scroll(start_box='<|box_start|>(x1,y1)<|box_end|>', direction='down or up or right or left') # Scroll the area around the point in one direction.
wait() # Wait 5 seconds and take a new screenshot to see what changed.
finished(content='xxx') # The task is done; say what you found or did, escaping quotes and newlines.
call_user() # Ask the user for help: the task cannot be solved, or it needs a human."""

# computer + the browser operator's navigation actions (UI-TARS-desktop); the policy limits the URLs
BROWSER_ACTIONS = COMPUTER_ACTIONS + """
navigate(content='https://example.com/') # Open a web address (http or https only) in the current tab.
navigate_back() # Go back to the previous page."""

MOBILE_ACTIONS = """## Action Space
click(start_box='<|box_start|>(x1,y1)<|box_end|>')
long_press(start_box='<|box_start|>(x1,y1)<|box_end|>')
type(content='') # Escape quotes and newlines; end with \\n to submit.
scroll(start_box='<|box_start|>(x1,y1)<|box_end|>', direction='down or up or right or left')
open_app(app_name='')
drag(start_box='<|box_start|>(x1,y1)<|box_end|>', end_box='<|box_start|>(x3,y3)<|box_end|>')
press_home()
press_back()
finished(content='xxx') # The task is done; say what you found or did, escaping quotes and newlines."""

_INSTRUCTION = """## User Instruction
{instruction}"""

TEMPLATES = {
    "computer": "\n\n".join([_HEAD, _FORMAT, COMPUTER_ACTIONS, _NOTE, _INSTRUCTION]),
    "mobile": "\n\n".join([_HEAD, _FORMAT, MOBILE_ACTIONS, _NOTE, _INSTRUCTION]),
    "browser": "\n\n".join([_HEAD, _FORMAT, BROWSER_ACTIONS, _NOTE, _INSTRUCTION]),
    "grounding": ("You are a GUI agent. You are given a task and a screenshot of the screen. "
                  "You need to perform a single click on the element the task describes.\n\n"
                  "## Output Format\n\nAction: click(start_box='<|box_start|>(x1,y1)<|box_end|>')\n\n"
                  "## User Instruction\n{instruction}"),
}
SYSTEM = "You are a helpful assistant."
HISTORY_N = 5


def fill_template(kind: str, instruction: str, language: str = "English") -> str:
    """The template `kind` ('computer' | 'mobile' | 'browser' | 'grounding') with the instruction and language filled in."""
    check_choice("template", kind, tuple(TEMPLATES))
    # str.replace, not str.format: the action space itself contains braces-free examples, but the
    # instruction may contain "{...}" and must be left alone.
    return TEMPLATES[kind].replace("{language}", language).replace("{instruction}", instruction)


def image_mime(data: bytes) -> str:
    """The MIME type of PNG / JPEG / WebP bytes (PNG when unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def image_part(image: bytes) -> dict:
    """An OpenAI chat content part holding an image as a data URL."""
    url = f"data:{image_mime(image)};base64," + base64.b64encode(image).decode()
    return {"type": "image_url", "image_url": {"url": url}}


_BOX = re.compile(r"(start_box|end_box)=(['\"])(\(.*?\))\2")


def add_box_tokens(response: str) -> str:
    """Put `<|box_start|>...<|box_end|>` back around (x,y) coordinates, as the model wrote them in training."""
    return _BOX.sub(lambda m: f"{m.group(1)}={m.group(2)}<|box_start|>{m.group(3)}<|box_end|>{m.group(2)}",
                    response)


def build_messages(instruction: str, screenshots: list[bytes], responses: list[str], *, template="computer",
                   language="English", history_n: int = HISTORY_N, system: str | None = SYSTEM,
                   box_tokens: bool = True) -> list[dict]:
    """OpenAI chat messages for the next step.

    screenshots: one PNG per step so far, the current one last (len(responses) + 1 of them).
    responses: the model's raw answers to the earlier steps, oldest first; all are kept as text.
    Only the last `history_n` screenshots are sent (the current one included).
    """
    check_range("history_n", history_n, 1, integer=True)
    if len(screenshots) != len(responses) + 1:
        raise ValueError(f"need one screenshot per step: {len(screenshots)} screenshots, "
                         f"{len(responses)} earlier responses")
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    prompt = fill_template(template, instruction, language)
    messages.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
    first_image = len(screenshots) - history_n  # steps before this one lose their image
    for i, response in enumerate(responses):
        if i >= first_image:
            messages.append({"role": "user", "content": [image_part(screenshots[i])]})
        text = add_box_tokens(response) if box_tokens else response
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    messages.append({"role": "user", "content": [image_part(screenshots[-1])]})
    return messages


def grounding_messages(instruction: str, screenshot: bytes) -> list[dict]:
    """A single-turn grounding request: the grounding template, then the screenshot."""
    prompt = fill_template("grounding", instruction)
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, image_part(screenshot)]}]
