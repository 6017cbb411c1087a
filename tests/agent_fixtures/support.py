"""Shared helpers for the agent tests: a loopback page server and an independent writer of model answers."""

from __future__ import annotations

import functools
import io
import os
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class PageServer:
    """Serves tests/agent_fixtures on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, root: str = HERE):
        handler = functools.partial(_Quiet, directory=root)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str = "page.html") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.size


def _marker(png: bytes, rgb) -> tuple[int, int] | None:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = im.size
    px = im.load()
    for y in range(h):
        for x in range(w):
            if px[x, y] == rgb:
                return x, y
    return None


def _colours(png: bytes, top: int = 5) -> list:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return sorted(im.convert("RGB").getcolors(maxcolors=1 << 20), reverse=True)[:top]


def find_marker(screenshot, rgb=(255, 0, 255), timeout: float = 30.0) -> tuple[int, int]:
    """Top-left pixel of the page's magenta marker on screen: where the page's (0,0) is.

    `screenshot` grabs the screen; it is called again until the marker shows, since a loaded page can
    reach the X display some frames later on a busy machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        png = screenshot()
        found = _marker(png, rgb)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"marker not on screen after {timeout:.0f} s; the screen's commonest colours "
                                 f"(count, rgb): {_colours(png)}")
        time.sleep(0.2)


def coord_text(dialect: str, mapper, x: float, y: float, half: float = 3.0) -> tuple[str, str]:
    """(keyword, quoted value) pointing the model at screenshot pixel (x, y), written by hand per dialect.

    Box dialects get a small box around the point; its centre maps back onto (x, y).
    """
    if dialect in ("paren", "box_tokens"):
        mx, my = mapper.from_screen(x, y)
        inner = f"({mx},{my})"
        return "start_box", (f"<|box_start|>{inner}<|box_end|>" if dialect == "box_tokens" else inner)
    if dialect == "point_tag":
        mx, my = mapper.from_screen(x, y, "point_tag")
        return "point", f"<point>{mx} {my}</point>"
    frame = "bbox_tag" if dialect == "bbox_tag" else "paren"
    x1, y1 = mapper.from_screen(x - half, y - half, frame)
    x2, y2 = mapper.from_screen(x + half, y + half, frame)
    if dialect == "bbox_tag":
        return "start_box", f"<bbox>{x1} {y1} {x2} {y2}</bbox>"
    return "start_box", f"[{x1}, {y1}, {x2}, {y2}]"


def answer(call: str, thought: str = "I will act on the target.") -> str:
    return f"Thought: {thought}\nAction: {call}"
