"""Shared helpers for the agent tests: a loopback page server and an independent writer of model answers."""

from __future__ import annotations

import functools
import io
import os
import threading
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


def find_marker(png: bytes, rgb=(255, 0, 255)) -> tuple[int, int]:
    """Top-left pixel of the page's magenta marker in a screenshot: where the page's (0,0) is on screen."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = im.size
    px = im.load()
    for y in range(h):
        for x in range(w):
            if px[x, y] == rgb:
                return x, y
    raise AssertionError("marker not found in the screenshot")


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
