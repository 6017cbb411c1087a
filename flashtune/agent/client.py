"""A small OpenAI-compatible chat client for UI-TARS servers (vLLM, TGI, ...), standard library only.

Retries connection errors, timeouts, 429 and 5xx answers with exponential backoff; other 4xx answers are a
user error. Answers that do not parse are asked again by the loop (`loop.run_agent`), at temperature 1.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from flashtune.errors import ConfigError, FlashtuneError, check_range


class EndpointError(FlashtuneError):
    """The model server could not be reached or kept failing after all retries."""


@dataclass
class Sampling:
    """Sampling settings sent with each request (OSWorld's UI-TARS-1.5 defaults)."""

    temperature: float = 0.0
    top_p: float = 0.9
    max_tokens: int = 1000
    frequency_penalty: float = 1.0

    def __post_init__(self):
        check_range("temperature", self.temperature, 0, 2)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        check_range("max_tokens", self.max_tokens, 1, integer=True)
        check_range("frequency_penalty", self.frequency_penalty, -2, 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sampling":
        return cls(**d)


def chat_url(endpoint: str) -> str:
    """'http://host:8000/v1' or '.../v1/chat/completions' -> the chat completions URL."""
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint={endpoint!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
    url = endpoint.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class ChatClient:
    """POSTs chat requests to an OpenAI-compatible endpoint.

    retries: extra attempts after the first; backoff: seconds before the first retry, doubled each time.
    `sleep` is injectable so tests do not wait.
    """

    def __init__(self, endpoint: str, model: str = "ui-tars", api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, sampling: Sampling | None = None, sleep=time.sleep):
        self.url = chat_url(endpoint)
        check_range("timeout", timeout, 0, low_open=True)
        check_range("retries", retries, 0, integer=True)
        check_range("backoff", backoff, 0)
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self.sampling = sampling or Sampling()
        self.requests_sent = 0

    def complete(self, messages: list[dict], **overrides) -> str:
        """One chat completion; returns the assistant's text."""
        body = {"model": self.model, "messages": messages, **self.sampling.to_dict(), **overrides}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests_sent += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:200]
                if exc.code == 429 or exc.code >= 500:
                    last = f"HTTP {exc.code}: {detail}"
                    continue
                raise EndpointError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                continue
            except json.JSONDecodeError:
                last = "the answer is not JSON"
                continue
            try:
                return payload["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise EndpointError(f"{self.url} answered without choices[0].message.content") from None
        raise EndpointError(f"{self.url} failed {self.retries + 1} times; last error: {last}")
