"""A scripted OpenAI-compatible chat server on loopback, for tests and demos without a UI-TARS model.

The script is a list; each request consumes the next entry:
- "text"                         -> a 200 answer with that assistant text;
- {"content": "text", "delay": s} -> the same after sleeping s seconds (to provoke client timeouts);
- {"status": 500}                -> that HTTP error (retried by the client when 429 or 5xx);
- {"raw": "not json"}            -> a 200 answer whose body is not JSON.
When the script is used up the server answers 410 Gone. Every request body is kept in `requests`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flashtune.errors import ConfigError, FlashtuneError, check_range


def load_script(path: str) -> list:
    """A script file: a JSON list of entries (see the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            script = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the fake-server script {path!r}: {exc}") from None
    except UnicodeDecodeError as exc:  # binary, or another encoding
        raise ConfigError(f"cannot read the fake-server script {path!r}: it is not UTF-8 text ({exc.reason} at "
                          f"byte {exc.start}); give a JSON list of answers") from None
    if not isinstance(script, list):
        raise ConfigError(f"{path}: the script must be a JSON list of answers")
    return script


class FakeModelServer:
    """Serves POST /v1/chat/completions on 127.0.0.1 from a script. Use as a context manager."""

    def __init__(self, script: list, host: str = "127.0.0.1", port: int = 0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"host={host!r}: the fake server only listens on loopback")
        self.script = list(script)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, b'{"error": "only /v1/chat/completions"}')
                with server._lock:
                    try:
                        server.requests.append(json.loads(body))
                    except json.JSONDecodeError:
                        return self._send(400, b'{"error": "body is not JSON"}')
                    entry = server.script.pop(0) if server.script else None
                if entry is None:
                    return self._send(410, b'{"error": "the script is used up"}')
                if isinstance(entry, str):
                    entry = {"content": entry}
                if entry.get("delay"):
                    time.sleep(float(entry["delay"]))
                if "status" in entry:
                    return self._send(int(entry["status"]), json.dumps({"error": "scripted failure"}).encode())
                if "raw" in entry:
                    return self._send(200, str(entry["raw"]).encode(), "text/plain")
                answer = {
                    "id": f"fake-{len(server.requests)}", "object": "chat.completion", "model": "fake-ui-tars",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": entry["content"]}}],
                }
                self._send(200, json.dumps(answer).encode())

        check_range("port", port, 0, 65535, integer=True)
        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # in use, or a privileged port
            raise FlashtuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another port "
                                 "(0 picks a free one)") from None
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeModelServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
