"""The browser executor's egress proxy (executors/egress.py): DNS rebinding, where a name answers a public
address to the request guard's lookup and a local one to the connection, is stopped at the connection.

Socket-level tests talk to the proxy with http.client; the last ones drive a real headless Chromium.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flashtune.agent import policy as pol
from flashtune.agent.executors.egress import EgressProxy
from flashtune.agent.policy import Policy, PolicyError

PUBLIC = "93.184.216.34"
PUBLIC_START = "https://start.example/"
PAGE = b"<html><body><h1 id='t'>local page</h1></body></html>"


class Server:
    """A loopback HTTP server that counts requests and keeps their Connection headers."""

    def __init__(self, host: str = "127.0.0.1", pages: dict | None = None):
        seen = self.seen = []
        pages = pages or {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers.get("Connection", "")))
                body = pages.get(self.path, PAGE)
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}/page.html"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Resolver:
    """Answers from a list per name, the last answer repeating (['public', 'loopback'] is a rebinding name);
    counts every lookup."""

    def __init__(self, **answers):
        self.answers = {k.replace("_", "."): v for k, v in answers.items()}
        self.calls: list[str] = []

    def __call__(self, host):
        self.calls.append(host)
        seq = self.answers.get(host)
        if seq is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return seq[min(self.calls.count(host), len(seq)) - 1]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def no_system_dns(monkeypatch):
    """Any host-name lookup through socket.getaddrinfo fails the test: the proxy may only use its resolver."""
    real = socket.getaddrinfo

    def numeric_only(host, *a, **k):
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in str(host) else socket.AF_INET, host)
        except (OSError, TypeError):
            raise AssertionError(f"system DNS lookup of {host!r}") from None
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)


def proxy_for(start_url, resolver, **kw):
    blocked = []
    p = EgressProxy(Policy(template="browser", start_url=start_url, **kw), resolver=resolver,
                    on_refused=lambda target, reason: blocked.append(target))
    return p, blocked


def get(proxy, url, header=False):
    """(status, body) of a plain-HTTP request through the proxy (absolute URI); with header=True, also the
    proxy's X-Flashtune-Egress header."""
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        c.request("GET", url)
        r = c.getresponse()
        return (r.status, r.read()) + ((r.getheader("X-Flashtune-Egress"),) if header else ())
    finally:
        c.close()


def tunnel(proxy, host, port, path="/page.html"):
    """(status, body) of a request inside a CONNECT tunnel; a refused CONNECT is (its status, b'')."""
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    c.set_tunnel(host, port)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    except OSError as exc:  # http.client: 'Tunnel connection failed: 403 Forbidden'
        return int(str(exc).split(": ")[-1].split()[0]), b""
    finally:
        c.close()


def raw_connect(proxy, target):
    """The status line's code for `CONNECT target` sent by hand (http.client drops an IPv6 host's brackets)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return int(s.recv(200).split()[1])


# -- Policy.check_address ---------------------------------------------------------------------------------
def test_check_address_applies_the_address_rules():
    public, local = Policy(start_url=PUBLIC_START), Policy(start_url="http://127.0.0.1:8000/")
    for p in (public, local):
        p.check_address("shop.example.com", PUBLIC)
        for bad in ("169.254.169.254", "fe80::1", "169.254.1.2", "::ffff:169.254.169.254", "100.100.100.200"):
            with pytest.raises(PolicyError, match="metadata"):
                p.check_address("x.example.com", bad)
        with pytest.raises(PolicyError, match="metadata"):
            p.check_address("metadata.google.internal")
        with pytest.raises(PolicyError, match="private address"):
            p.check_address("x.example.com", "10.0.0.5")
    with pytest.raises(PolicyError, match="only when the start URL is local"):
        public.check_address("x.example.com", "127.0.0.1")
    local.check_address("x.example.com", "127.0.0.1")
    Policy(allow_hosts=("intra.example.com",)).check_address("intra.example.com", "10.0.0.5")
    with pytest.raises(PolicyError, match="not a valid host"):
        public.check_address("1.2.3.4.5")


# -- the proxy at the socket level ------------------------------------------------------------------------
def test_rebinding_passes_the_url_check_but_not_the_proxy(server, monkeypatch, no_system_dns):
    dns = Resolver(rebind_example=[[PUBLIC], ["127.0.0.1"]])
    monkeypatch.setattr(pol, "resolve_host", lambda host: tuple(dns(host)))
    proxy, blocked = proxy_for(PUBLIC_START, dns)
    try:
        url = server.url("rebind.example")
        assert Policy(template="browser", start_url=PUBLIC_START).check_url(url, resolve=True) == url  # public
        status, body, named = get(proxy, url, header=True)  # the connection's lookup answers 127.0.0.1
        assert status == 403 and b"resolves to 127.0.0.1" in body and body.count(b"\n") == 1
        assert named.startswith("net::ERR_BLOCKED_BY_CLIENT; refused connection to rebind.example")
        assert tunnel(proxy, "rebind.example", server.port)[0] == 403
        assert proxy.failures[f"rebind.example:{server.port}"][0] == "net::ERR_BLOCKED_BY_CLIENT"
        assert server.seen == [] and blocked == [url, f"rebind.example:{server.port}"]
        assert dns.calls == ["rebind.example"] * 3 and len(proxy.refused) == 2
    finally:
        proxy.close()


def test_local_start_url_reaches_a_local_server_by_name(server, no_system_dns):
    dns = Resolver(app_test=[["127.0.0.1"]])
    proxy, blocked = proxy_for(server.url(), dns)
    try:
        assert get(proxy, server.url("app.test")) == (200, PAGE)
        assert tunnel(proxy, "app.test", server.port) == (200, PAGE)
        assert get(proxy, server.url()) == (200, PAGE)  # an IP literal: no lookup at all
        assert dns.calls == ["app.test"] * 2 and blocked == []
        assert server.seen[0] == ("/page.html", "close")  # origin-form, hop-by-hop headers replaced
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:  # the answer says close too
            s.sendall(f"GET {server.url('app.test')} HTTP/1.1\r\nHost: app.test\r\n"
                      "Proxy-Connection: keep-alive\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\nConnection: close") and body == PAGE
    finally:
        proxy.close()


def test_other_local_ports_are_refused_unless_allowed(server, no_system_dns):
    """A local start URL opens this machine on its port only: another local service (a second server here;
    a Docker API or a notebook in life) is refused, by address or by name, until --allow-host names its port."""
    other = Server()
    dns = Resolver(app_test=[["127.0.0.1"]])
    try:
        proxy, blocked = proxy_for(server.url(), dns)
        try:
            status, body, said = get(proxy, other.url(), header=True)
            assert status == 403 and "opened on the start URL's port" in said
            assert f"--allow-host 127.0.0.1:{other.port}" in body.decode()
            assert tunnel(proxy, "app.test", other.port)[0] == 403
            assert get(proxy, server.url("app.test")) == (200, PAGE)  # the start URL's port, by name
            assert other.seen == [] and blocked == [other.url(), f"app.test:{other.port}"]
        finally:
            proxy.close()
        proxy, blocked = proxy_for(server.url(), dns, allow_hosts=(f"localhost:{other.port}",))
        try:
            assert get(proxy, other.url()) == (200, PAGE) and tunnel(proxy, "app.test", other.port) == (200, PAGE)
        finally:
            proxy.close()
    finally:
        other.close()


@pytest.mark.parametrize("answer", [["169.254.169.254"], ["169.254.7.7"], ["fe80::1"], ["fd00:ec2::254"]])
def test_metadata_and_link_local_answers_are_refused(server, answer, no_system_dns):
    dns = Resolver(meta_example=[answer])
    proxy, blocked = proxy_for(server.url(), dns)  # even with a local start URL
    try:
        status, body = get(proxy, "http://meta.example/latest/meta-data/")
        assert status == 403 and b"metadata" in body
        assert tunnel(proxy, "meta.example", 443)[0] == 403
        assert blocked == ["http://meta.example/latest/meta-data/", "meta.example:443"]
    finally:
        proxy.close()


def test_metadata_names_and_literals_are_refused_without_a_lookup(server, no_system_dns):
    dns = Resolver()
    proxy, blocked = proxy_for(server.url(), dns)
    try:
        assert get(proxy, "http://169.254.169.254/latest/meta-data/")[0] == 403
        assert get(proxy, "http://metadata.google.internal/computeMetadata/v1/")[0] == 403
        assert tunnel(proxy, "169.254.169.254", 443)[0] == 403
        assert raw_connect(proxy, "[::ffff:169.254.169.254]:80") == 403
        assert raw_connect(proxy, "[fe80::1]:80") == 403
        assert dns.calls == [] and len(blocked) == 5
    finally:
        proxy.close()


@pytest.mark.parametrize("answer", [[PUBLIC, "10.0.0.5"], [PUBLIC, "127.0.0.1"], ["192.168.1.1", PUBLIC]])
def test_a_private_address_among_several_answers_is_refused(server, answer, no_system_dns):
    dns = Resolver(mixed_example=[answer])
    proxy, blocked = proxy_for(PUBLIC_START, dns)
    try:
        assert get(proxy, f"http://mixed.example:{server.port}/page.html")[0] == 403
        assert tunnel(proxy, "mixed.example", server.port)[0] == 403
        assert dns.calls == ["mixed.example"] * 2 and server.seen == [] and len(blocked) == 2
    finally:
        proxy.close()


def test_one_lookup_per_connection_and_only_its_addresses(no_system_dns):
    """The proxy connects to the address its one lookup answered: the server listens on 127.0.0.2 only,
    which no other lookup of the name (there is none: no_system_dns) could find."""
    other = Server("127.0.0.2")
    dns = Resolver(app_test=[["127.0.0.2"], ["169.254.169.254"]])  # a second lookup would be refused
    proxy, blocked = proxy_for(f"http://127.0.0.1:{other.port}/", dns)
    try:
        assert get(proxy, other.url("app.test")) == (200, PAGE)
        assert dns.calls == ["app.test"] and blocked == []
        assert get(proxy, other.url("app.test"))[0] == 403  # the next connection looks up again
        assert dns.calls == ["app.test"] * 2
    finally:
        proxy.close()
        other.close()


def test_refuses_itself_and_bad_requests(no_system_dns):
    proxy, blocked = proxy_for("http://127.0.0.1:1/", Resolver(), allow_hosts=("127.0.0.1",))  # any local port
    try:
        assert get(proxy, f"http://127.0.0.1:{proxy.port}/")[0] == 403
        assert get(proxy, "/page.html")[0] == 400  # not an absolute URI
        assert get(proxy, "http://unknown.test/", header=True)[::2] == (502, "net::ERR_NAME_NOT_RESOLVED; cannot "
                                                                            "resolve unknown.test: [Errno -2] "
                                                                            "Name or service not known")
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        try:
            assert get(proxy, f"http://127.0.0.1:{dead.getsockname()[1]}/", header=True)[2].startswith(
                "net::ERR_CONNECTION_REFUSED; cannot connect to 127.0.0.1:")
        finally:
            dead.close()
    finally:
        proxy.close()


def test_close_ends_threads_and_sockets(server):
    proxy, _ = proxy_for(server.url(), Resolver())
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n\r\n".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")  # an open tunnel
    proxy.close()
    assert s.recv(100) == b""  # the tunnel was cut
    s.close()
    assert [t for t in threading.enumerate() if t.name.startswith("egress-") and str(proxy.port) in t.name] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


# -- the real browser -------------------------------------------------------------------------------------
def _rebinding(monkeypatch, server):
    """This process's DNS answers a public address for rebind.example once, then 127.0.0.1; Chromium's own
    resolver answers 127.0.0.1 (--host-resolver-rules)."""
    from flashtune.agent.executors import browser

    calls = []
    real = socket.getaddrinfo

    def fake(host, *a, **k):
        if host != "rebind.example":
            return real(host, *a, **k)
        calls.append(host)
        addr = PUBLIC if len(calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, 0))]

    monkeypatch.setattr(pol, "_RESOLVED", {})
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(browser, "CHROMIUM_ARGS",
                        browser.CHROMIUM_ARGS + ["--host-resolver-rules=MAP rebind.example 127.0.0.1"])
    return calls


def test_browser_without_the_proxy_is_rebound(server, monkeypatch):
    """The gap the proxy closes: the request guard alone lets the rebinding name reach the local server."""
    from playwright.sync_api import sync_playwright

    from flashtune.agent.executors.browser import BrowserExecutor, launch_chromium

    _rebinding(monkeypatch, server)
    with sync_playwright() as pw:
        b = launch_chromium(pw, headless=True)
        try:
            ex = BrowserExecutor(b.new_page(), policy=Policy(template="browser", start_url=PUBLIC_START))
            ex.navigate(server.url("rebind.example"))
            assert ex.blocked == [] and server.seen and "local page" in ex.page.content()
        finally:
            b.close()


def test_browser_navigation_to_a_rebinding_name_is_blocked(server, monkeypatch):
    from flashtune.agent.executors.base import ActionError
    from flashtune.agent.executors.browser import BrowserExecutor

    calls = _rebinding(monkeypatch, server)
    ex = BrowserExecutor.launch(width=640, height=480, policy=Policy(template="browser", start_url=PUBLIC_START))
    proxy = ex.proxy
    try:
        url = server.url("rebind.example")
        with pytest.raises(ActionError, match="ERR_BLOCKED_BY_CLIENT .*stopped by the navigation policy: refused "
                                              "connection to rebind.example.*resolves to 127.0.0.1"):
            ex.navigate(url)  # the guard's lookup: public; the proxy's: 127.0.0.1
        assert "refused connection to rebind.example" in ex.page.content()  # the proxy's answer, not the page
        with pytest.raises(ActionError, match="ERR_BLOCKED_BY_CLIENT at https://rebind.example.*resolves to "
                                              "127.0.0.1"):  # Chromium says ERR_TUNNEL_CONNECTION_FAILED
            ex.navigate(server.url("rebind.example", "https"))
        assert server.seen == [] and url in ex.blocked and f"rebind.example:{server.port}" in ex.blocked
        assert len(calls) >= 3  # the guard once (then cached), the proxy once per connection
    finally:
        ex.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def test_browser_loopback_goes_through_the_proxy(server):
    from flashtune.agent.executors.base import ActionError
    from flashtune.agent.executors.browser import BrowserExecutor

    dns = Resolver(app_test=[["127.0.0.1"]])
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
    port = dead.getsockname()[1]
    ex = BrowserExecutor.launch(server.url(), 640, 480, resolver=dns, policy=Policy(
        template="browser", start_url=server.url(), allow_hosts=("*.test", f"127.0.0.1:{port}")))
    try:
        assert "local page" in ex.page.content()
        assert server.seen[0] == ("/page.html", "close")  # sent on by the proxy, not by Chromium directly
        ex.navigate(server.url("app.test"))  # a name only the proxy's resolver knows
        assert "local page" in ex.page.content() and "app.test" in dns.calls  # (Chromium's own traffic too)
        with pytest.raises(ActionError, match="net::ERR_NAME_NOT_RESOLVED at https://nowhere.test/"):
            ex.navigate("https://nowhere.test/")
        for _ in range(100):  # Chromium's error page lands a moment later; the next goto would be cut by it
            if ex.page.url.startswith("chrome-error://"):
                break
            ex.page.wait_for_timeout(50)
        with pytest.raises(ActionError, match="net::ERR_CONNECTION_REFUSED at http://127.0.0.1"):
            ex.navigate(f"http://127.0.0.1:{port}/")  # an allowed port: reached, and refused by the machine
        assert ex.blocked == []
    finally:
        ex.close()
        dead.close()


def test_browser_webrtc_sends_no_udp_around_the_proxy():
    """A page's WebRTC would send STUN over UDP straight to any address (the proxy carries TCP only)."""
    from flashtune.agent.executors.browser import BrowserExecutor

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    ex = BrowserExecutor.launch(width=640, height=480, policy=Policy(template="browser", start_url=PUBLIC_START))
    try:
        ex.page.set_content("<html><body>rtc</body></html>")
        candidates = ex.page.evaluate("""port => new Promise(done => {
            const pc = new RTCPeerConnection({iceServers: [{urls: 'stun:127.0.0.1:' + port}]}), found = [];
            pc.onicecandidate = e => e.candidate ? found.push(e.candidate.candidate) : done(found);
            setTimeout(() => done(found.concat(['gathering did not finish'])), 5000);
            pc.createDataChannel('x');
            pc.createOffer().then(o => pc.setLocalDescription(o));
        })""", udp.getsockname()[1])
        assert candidates == []
        with pytest.raises(BlockingIOError):
            udp.recvfrom(2048)
    finally:
        ex.close()
        udp.close()


# -- the X11 executor's kiosk window ---------------------------------------------------------------------
def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def display():
    from flashtune.agent.executors.x11 import VirtualDisplay

    vd = VirtualDisplay(640, 480)
    yield vd.display
    vd.stop()


def test_x11_window_traffic_goes_through_the_proxy(display):
    """The kiosk window's pages reach only what the address rules allow: the start page (local, so loopback is
    allowed) loads through the proxy, and its redirect to a name answering the metadata address is refused."""
    from flashtune.agent.executors.x11 import ChromiumWindow

    pages = {"/": b"<html><head><meta http-equiv='refresh' content='0; url=/hop'></head><body>start</body></html>"}
    server = Server(pages=pages)
    secret = f"http://meta.test:{server.port}/secret"
    pages["/hop"] = f"<html><head><meta http-equiv='refresh' content='0; url={secret}'></head></html>".encode()
    dns = Resolver(meta_test=[["169.254.169.254"]])
    start = f"http://127.0.0.1:{server.port}/"
    window = ChromiumWindow(display, start, 640, 480, policy=Policy(template="computer", start_url=start),
                            resolver=dns)
    try:
        assert wait_for(lambda: secret in window.blocked), (window.blocked, server.seen)
        assert [p for p, _ in server.seen if p != "/favicon.ico"] == ["/", "/hop"]
        assert all(conn == "close" for _, conn in server.seen)  # sent on by the proxy, not by Chromium directly
        assert "meta.test" in dns.calls  # (Chromium's own background requests go through it too)
    finally:
        window.close()
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", window.proxy.port), timeout=2)


def test_x11_window_loopback_refused_for_a_public_start(display, server):
    from flashtune.agent.executors.x11 import ChromiumWindow

    window = ChromiumWindow(display, server.url(), 640, 480, policy=Policy(template="computer",
                                                                           start_url=PUBLIC_START))
    try:
        assert wait_for(lambda: server.url() in window.blocked), window.blocked
        assert server.seen == []
    finally:
        window.close()


def test_x11_start_url_check_uses_the_proxy_rules(server, no_system_dns):
    from flashtune.agent.executors.x11 import check_start_url
    from flashtune.errors import FlashtuneError

    local = Policy(template="computer", start_url=server.url())
    check_start_url(server.url(), policy=local)
    assert server.seen == [("/page.html", "close")]  # fetched through the proxy
    dns = Resolver(meta_test=[["169.254.169.254"]], app_test=[["127.0.0.1"]])
    for url, why in (("http://meta.test/", "link-local and cloud metadata addresses are never opened"),
                     ("https://meta.test/", "link-local and cloud metadata addresses are never opened"),
                     (server.url("app.test"), "localhost is opened only when the start URL is local"),
                     ("https://nowhere.test/", "nowhere.test")):
        with pytest.raises(FlashtuneError, match=f"cannot open the start URL {re.escape(url)}: .*{why}"):
            check_start_url(url, policy=Policy(template="computer", start_url=url), resolver=dns)
    assert len(server.seen) == 1


def test_x11_agent_run_records_what_the_proxy_refused(tmp_path, capsys):
    """The user's path: `agent run --executor x11` starts the kiosk window behind the proxy, and the trajectory
    lists what the task page tried to reach (here an image from the metadata address)."""
    import json

    from flashtune.agent.fake_server import FakeModelServer
    from flashtune.cli import main

    secret = "http://169.254.169.254/latest/meta-data/x.png"
    server = Server(pages={"/": f"<html><body><h1>task</h1><img src='{secret}'></body></html>".encode()})
    try:
        with FakeModelServer(["Action: wait()", "Action: finished(content='done')"]) as fake:
            code = main(["agent", "run", "--task", "t", "--endpoint", fake.url, "--executor", "x11",
                         "--start-url", f"http://127.0.0.1:{server.port}/", "--size", "640x480",
                         "--out", str(tmp_path)])
    finally:
        server.close()
    record = json.loads((tmp_path / "trajectory.json").read_text())
    assert code == 0 and record["status"] == "finished", capsys.readouterr()
    seen = record.get("blocked", []) + [t for step in record["steps"] for t in step.get("blocked", [])]
    assert secret in seen and record["blocked_total"] == len(seen)
    assert secret in (tmp_path / "report.html").read_text()
