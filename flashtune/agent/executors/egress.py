"""The browser executor's egress proxy: Chromium is launched with all its traffic, loopback included, sent
through this proxy, which connects only to addresses the policy allows.

The request guard (browser.py) checks every URL and the addresses its host name resolves to, but Chromium would
resolve the name again on its own: a name whose DNS answer changes between the two lookups (DNS rebinding)
would reach an address never checked. Behind an HTTP proxy Chromium resolves nothing. For each connection the
proxy resolves the host once, holds the name and every address of that answer to `Policy.check_address`, and
connects only to one of those addresses: there is no second lookup.

Handles CONNECT (https, wss) and plain-HTTP requests with an absolute URI (sent on with `Connection: close`).
A refused connection gets a 403 with one line of text and is passed to `on_refused(target, reason)`; a host
that does not resolve or answer gets a 502. Chromium shows a plain-HTTP answer as a page and any failed CONNECT
as ERR_TUNNEL_CONNECTION_FAILED, so the failure is also named as Chromium would name it (net::ERR_...): in the
`X-Flashtune-Egress` header of the answer, and in `failures` under host:port. Threads and sockets end with
`close()`.
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import threading
from urllib.parse import urlsplit

from flashtune.agent.policy import DEFAULT_PORTS, PolicyError

MAX_HEAD = 64 * 1024
HEADER = "X-Flashtune-Egress"
_HOP_HEADERS = (b"proxy-connection:", b"proxy-authorization:", b"connection:", b"keep-alive:")


def system_resolver(host: str) -> list[str]:
    """The addresses `host` resolves to on this machine, in the resolver's order."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))


class _Reply(Exception):
    def __init__(self, code: int, text: str, net_error: str = "net::ERR_FAILED"):
        super().__init__(text)
        self.code, self.net_error = code, net_error


class EgressProxy:
    """An HTTP proxy on 127.0.0.1 (a free port) enforcing `policy`'s address rules on every connection.
    `resolver(host) -> [address, ...]` is called once per connection to a host name (not for IP literals)."""

    def __init__(self, policy, resolver=None, on_refused=None, connect_timeout: float = 10.0,
                 idle_timeout: float = 120.0):
        self.policy = policy
        self.resolver = resolver or system_resolver
        self.on_refused = on_refused
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self.refused: list[str] = []  # the reasons, one line each
        self.failures: dict[str, tuple[str, str]] = {}  # host:port -> (net::ERR_..., reason) of its last failure
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name=f"egress-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    def failure_for(self, url: str | None) -> tuple[str, str] | None:
        """(net::ERR_..., reason) of the last failure for `url`'s host and port, or None: what a client that
        only sees a refused CONNECT's status (Chromium, urllib) cannot tell."""
        if not url:
            return None
        parts = urlsplit(url)
        try:
            port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
        except ValueError:
            return None
        return self.failures.get(f"{parts.hostname}:{port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chromium_args(self) -> list[str]:
        """Flags that send all of Chromium's traffic through this proxy: `<-loopback>` removes the implicit
        bypass of localhost and link-local hosts; WebRTC may not send UDP (which an HTTP proxy cannot carry)."""
        return [f"--proxy-server={self.url}", "--proxy-bypass-list=<-loopback>",
                "--webrtc-ip-handling-policy=disable_non_proxied_udp"]

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut every open connection and wait for the proxy's threads."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:  # wake the accept loop
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self._acceptor.join(timeout)
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            _shutdown(s)
        for t in threads:
            t.join(timeout)

    # -- connections ------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                client.close()
                return
            t = threading.Thread(target=self._serve, args=(client,), name=f"egress-conn-{self.port}", daemon=True)
            with self._lock:
                self._threads.add(t)
                self._socks.add(client)
            t.start()

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.add(s)
        if self._stop.is_set():
            _shutdown(s)
        return s

    def _serve(self, client: socket.socket) -> None:
        upstream = hostport = None
        try:
            client.settimeout(self.idle_timeout)
            head, rest = _read_head(client)
            line, _, headers = head.partition(b"\r\n")
            method, target, version = _request_line(line)
            if method == "CONNECT":
                host, port = _host_port("//" + target, None)
                hostport = f"{host}:{port}"
                upstream = self._connect(host, port, target)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                if parts.scheme.lower() != "http":
                    raise _Reply(400, f"expected an absolute http:// URI, got {target[:100]!r}")
                host, port = _host_port(target, 80)
                hostport = f"{host}:{port}"
                upstream = self._connect(host, port, target[:200])
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                kept = [h for h in headers.split(b"\r\n") if h and not h.lower().startswith(_HOP_HEADERS)]
                rest = b"\r\n".join([f"{method} {path} {version}".encode("latin-1"), *kept,
                                     b"Connection: close", b"", b""]) + rest
            self.failures.pop(hostport, None)
            if rest:
                upstream.sendall(rest)
            self._relay(client, upstream, close_after=method != "CONNECT")
        except _Reply as exc:
            if hostport is not None:
                if len(self.failures) > 1000:
                    self.failures.clear()
                self.failures[hostport] = (exc.net_error, str(exc))
            _reply(client, exc.code, str(exc), exc.net_error)
        except (OSError, ValueError):
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    s.close()
                    with self._lock:
                        self._socks.discard(s)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _connect(self, host: str, port: int, target: str) -> socket.socket:
        """A socket connected to an address of `host` that the policy allows; one lookup, every address checked."""
        what = f"connection to {host}:{port}"
        try:
            self.policy.check_address(host, what=what, port=port)  # the name itself: metadata names, localhost
            try:
                addresses = [str(ipaddress.ip_address(host))]
            except ValueError:
                try:
                    addresses = list(self.resolver(host))
                except (OSError, UnicodeError) as exc:
                    raise _Reply(502, f"cannot resolve {host}: {exc}", "net::ERR_NAME_NOT_RESOLVED") from None
            if not addresses:
                raise _Reply(502, f"cannot resolve {host}: no addresses", "net::ERR_NAME_NOT_RESOLVED")
            for a in addresses:
                self.policy.check_address(host, a, f"{what} ({host} resolves to {a})", port)
                if port == self.port and ipaddress.ip_address(a).is_loopback:
                    raise PolicyError(f"refused {what}: that is the egress proxy itself")
        except PolicyError as exc:
            self.refused.append(str(exc))
            if self.on_refused is not None:
                self.on_refused(target, str(exc))
            raise _Reply(403, str(exc), "net::ERR_BLOCKED_BY_CLIENT") from None
        error = None
        for a in addresses:
            s = self._track(socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM))
            s.settimeout(self.connect_timeout)
            try:
                s.connect((a, port))
                s.settimeout(self.idle_timeout)
                return s
            except OSError as exc:
                error = exc
                s.close()
                with self._lock:
                    self._socks.discard(s)
        net_error = ("net::ERR_CONNECTION_REFUSED" if isinstance(error, ConnectionRefusedError) else
                     "net::ERR_CONNECTION_TIMED_OUT" if isinstance(error, TimeoutError) else
                     "net::ERR_CONNECTION_FAILED")
        raise _Reply(502, f"cannot connect to {host}:{port}: {error}", net_error)

    def _relay(self, a: socket.socket, b: socket.socket, close_after: bool = False) -> None:
        """Copy bytes both ways until both sides are done (half-closes passed on) or idle for idle_timeout.
        close_after: b's answer head gets `Connection: close`, so that `a` sends no second request (which could
        be for another host) on this connection."""
        peer = {a: b, b: a}
        head = b"" if close_after else None
        with selectors.DefaultSelector() as sel:
            for s in peer:
                sel.register(s, selectors.EVENT_READ)
            while sel.get_map() and not self._stop.is_set():
                events = sel.select(self.idle_timeout)
                if not events:
                    return
                for key, _ in events:
                    src = key.fileobj
                    data = out = src.recv(65536)
                    if src is b and head is not None:  # b's answer head: held until complete
                        head += data
                        if data and b"\r\n\r\n" not in head and len(head) <= MAX_HEAD:
                            continue
                        out, head = _close_after(head), None
                    if out:
                        peer[src].sendall(out)
                    if not data:
                        sel.unregister(src)
                        peer[src].shutdown(socket.SHUT_WR)


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_after(data: bytes) -> bytes:
    """An answer's head with its hop-by-hop headers replaced by `Connection: close` (data as it is without a
    complete head)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return data
    lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(_HOP_HEADERS)]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head up to the blank line, and whatever came after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise _Reply(431, "request head too large")
        data = sock.recv(65536)
        if not data:
            raise ValueError("connection closed before a request")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _Reply(400, "malformed request line")
    return parts[0].upper(), parts[1], parts[2]


def _host_port(url: str, default: int | None) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port or default
    except ValueError:
        host = port = None
    if not host or not port:
        raise _Reply(400, f"no host and port in {url.lstrip('/')[:100]!r}")
    return host, port


def _reply(sock: socket.socket, code: int, text: str, net_error: str) -> None:
    reason = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
              502: "Bad Gateway"}[code]
    line = " ".join(text.split())
    body = f"flashtune egress proxy: {line}\n".encode("utf-8", "replace")
    try:
        sock.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     f"{HEADER}: {net_error}; {line}\r\n".encode("latin-1", "replace") +
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    except OSError:
        pass
