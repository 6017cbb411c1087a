"""The policy layer between parser and executors (issue 16): action spaces, URL and host rules, key chords,
typed text and coordinates, checked without a browser; the loop's handling of refusals lives in
test_agent_loop_guard.py and the real executors in test_agent_hostile.py."""

from __future__ import annotations

import ipaddress

import pytest

from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.executors.browser import sandbox_args, sandbox_status
from flashtune.agent.parser import parse_response
from flashtune.agent.policy import ACTION_SPACES, Policy, PolicyError, host_class
from flashtune.errors import ConfigError

LOCAL = "http://127.0.0.1:8765/page.html"
PUBLIC = "https://shop.example.com/start"


def check(text, policy=None, mapper=None):
    return (policy or Policy(template="browser", start_url=LOCAL)).check_step(parse_response(text).actions, mapper)


# -- action spaces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1.5", "1.0", "doubao"])
@pytest.mark.parametrize("template", ["computer", "mobile"])
def test_navigate_is_in_no_ui_tars_action_space(template, version):
    # issue 16: navigate(file:///etc/passwd) was accepted under every template and model version
    policy = Policy(template=template, model_version=version, start_url=LOCAL)
    with pytest.raises(PolicyError, match="not in the .* action space"):
        check("Action: navigate(content='file:///etc/passwd')", policy)
    with pytest.raises(PolicyError, match="navigate"):
        check("Action: navigate(content='https://example.com/')", policy)


def test_action_spaces_follow_the_templates():
    from flashtune.agent.prompts import TEMPLATES

    for template, space in ACTION_SPACES.items():
        listed = {line.split("(")[0] for line in TEMPLATES[template].split("## Action Space\n")[1]
                  .split("\n\n")[0].splitlines()}
        assert listed <= space, template  # everything the prompt offers is allowed ...
        extra = space - listed
        assert extra <= {"left_single", "press", "release", "keydown", "keyup"}, extra  # ... and little else
    assert check("Action: click(start_box='(10,10)')\n\nleft_single(start_box='(5,5)')",
                 Policy(template="computer"))
    for bad in ("open_app(app_name='Terminal')", "hover(start_box='(1,1)')", "press_home()", "error_env()"):
        with pytest.raises(PolicyError, match="action space"):
            check(f"Action: {bad}", Policy(template="computer"))
    with pytest.raises(PolicyError, match="action space"):
        check("Action: hotkey(key='ctrl c')", Policy(template="mobile"))


# -- URLs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,why", [
    ("file:///etc/passwd", "only http and https"),
    ("FILE:///etc/passwd", "only http and https"),
    ("javascript:alert(document.cookie)", "only http and https"),
    ("data:text/html,<script>alert(1)</script>", "only http and https"),
    ("chrome://settings", "only http and https"),
    ("view-source:http://127.0.0.1/", "only http and https"),
    ("about:blank", "only http and https"),
    ("ftp://example.com/x", "only http and https"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://169.254.170.2/v2/credentials", "metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[fe80::1]/", "metadata"),
    ("http://2852039166/", "metadata"),  # 169.254.169.254 written as one number, as Chromium reads it
    ("http://0xA9FEA9FE/", "metadata"),
    ("http://0251.0376.0251.0376/", "metadata"),
    ("http://169.254.43518/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://METADATA.google.internal./", "metadata"),
    ("http://100.100.100.200/latest/meta-data/", "metadata"),
    ("http://169.254.169.%32%35%34/", "metadata"),  # Chromium decodes escapes in the host
    ("http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/", "metadata"),  # full-width digits
    ("http://169\u3002254\u3002169\u3002254/", "metadata"),  # ideographic full stops
    ("http://127.0.0.%31:9/", "start URL's port"),
    ("http://\uff11\uff12\uff17.0.0.1:9/", "--allow-host 127.0.0.1:9"),
    ("http://10.0.0.5/admin", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://router.lan/", "private"),
    ("http://intranet/", "private"),
    ("http://user:pw@example.com/", "user name"),
    ("http://example.com@169.254.169.254/", "user name"),
    ("http://exa mple.com/", "spaces"),
    ("http://example.com\\@169.254.169.254/", "backslash"),
    ("http://1.2.3.999/", "not a valid URL"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http:///nohost", "not a valid URL"),
    ("", "empty"),
])
def test_refused_urls(url, why):
    with pytest.raises(PolicyError, match=why):
        Policy(template="browser", start_url=LOCAL).check_url(url)


def test_localhost_only_when_the_start_url_is_local():
    public = Policy(template="browser", start_url=PUBLIC)
    for url in ("http://localhost:8000/", "http://127.0.0.1:22/", "http://[::1]/", "http://0.0.0.0:8000/",
                "http://app.localhost/", "http://2130706433/", "localhost:8000/admin"):
        with pytest.raises(PolicyError, match="localhost"):
            public.check_url(url)
    local = Policy(template="browser", start_url=LOCAL)
    assert local.check_url("http://127.0.0.1:8765/x") == "http://127.0.0.1:8765/x"  # the start URL's port
    assert local.check_url("http://localhost:8765/x")  # every loopback name is this machine
    for url in ("http://127.0.0.1:9999/x", "localhost:8000/admin", "http://127.0.0.1/", "http://[::1]:2375/"):
        with pytest.raises(PolicyError, match=r"opened on the start URL's port \(8765\).*--allow-host"):
            local.check_url(url)
    ports = Policy(template="browser", start_url=LOCAL, allow_hosts=("localhost:9999", "[::1]:8000"))
    assert ports.check_url("http://127.0.0.1:9999/x") and ports.check_url("localhost:8000/admin")
    with pytest.raises(PolicyError, match="allow port 9998 with --allow-host 127.0.0.1:9998"):
        ports.check_url("http://127.0.0.1:9998/x")
    assert Policy(template="browser", start_url=LOCAL, allow_hosts=("127.0.0.1",)).check_url("http://[::1]:1/")
    assert Policy(template="browser").check_url("https://example.org/") == "https://example.org/"  # no start URL
    with pytest.raises(PolicyError, match="localhost"):
        Policy(template="browser").check_url("http://localhost/")


def test_missing_scheme_becomes_https():
    # issue 16: navigate(content='www.example.com') threw
    (a,) = check("Action: navigate(content='www.example.com')")
    assert a.text == "https://www.example.com"
    assert Policy().check_url("example.com:8443/a?b=1") == "https://example.com:8443/a?b=1"
    assert Policy().check_url("//example.com/x") == "https://example.com/x"
    assert Policy().check_url("  HTTP://Example.com/  ") == "HTTP://Example.com/"


def test_allow_list_and_its_default():
    default = Policy(template="browser", start_url="http://10.1.2.3:8080/app")
    assert default.check_url("https://news.example.net/") == "https://news.example.net/"  # public: yes
    assert default.check_url("http://10.1.2.3:8080/other")  # the start URL's own (private) host and port: yes
    with pytest.raises(PolicyError, match="10.1.2.3 is opened on the start URL's port"):
        default.check_url("http://10.1.2.3:9000/other")  # another port of it: no
    with pytest.raises(PolicyError, match="private"):
        default.check_url("http://10.1.2.4/")
    host = Policy(template="browser", start_url="http://10.1.2.3:8080/app", allow_hosts=("10.1.2.3", "nas.lan:5000"))
    assert host.check_url("http://10.1.2.3:9000/") and host.check_url("http://nas.lan:5000/")  # any port; 5000
    with pytest.raises(PolicyError, match="nas.lan is a private address"):  # the entry names port 5000 only
        host.check_url("http://nas.lan/")
    port = Policy(template="browser", start_url=PUBLIC, allow_hosts=("docs.python.org:8443",))
    assert port.check_url("https://docs.python.org:8443/")
    with pytest.raises(PolicyError, match="not in the allowed hosts"):
        port.check_url("https://docs.python.org/")
    with pytest.raises(ConfigError, match="outside 1-65535"):
        Policy(allow_hosts=("example.com:70000",))
    listed = Policy(template="browser", start_url=PUBLIC, allow_hosts=("*.example.org", "docs.python.org"))
    assert listed.check_url("https://a.b.example.org/") and listed.check_url("https://docs.python.org/3/")
    assert listed.check_url("https://shop.example.com/cart")  # the start host stays allowed
    with pytest.raises(PolicyError, match="not in the allowed hosts"):
        listed.check_url("https://example.net/")
    assert listed.check_url("https://cdn.example.net/x.js", navigation=False)  # a page's own sub-resource
    with pytest.raises(PolicyError, match="metadata"):  # never, whatever the list says
        Policy(template="browser", allow_hosts=("169.254.169.254",)).check_url("http://169.254.169.254/")
    with pytest.raises(PolicyError, match="metadata"):
        listed.check_url("http://169.254.169.254/", navigation=False)
    with pytest.raises(ConfigError, match="allow host"):
        Policy(allow_hosts=("exa mple.com",))
    with pytest.raises(ConfigError, match="start URL"):
        Policy(start_url="file:///tmp/page.html")


def test_host_class_agrees_with_ipaddress():
    for addr in ("8.8.8.8", "1.1.1.1", "2606:4700::1111"):
        assert host_class(addr) == "public" and ipaddress.ip_address(addr).is_global
    assert host_class("127.0.0.5") == host_class("::1") == "loopback"
    assert host_class("172.16.0.1") == host_class("fc00::1") == "private"
    assert host_class("224.0.0.1") == host_class("169.254.1.1") == "never"


# -- keys -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", ["ctrl o", "ctrl s", "ctrl p", "alt f4", "ctrl l", "alt d", "f6", "ctrl n",
                                  "ctrl shift n", "ctrl t", "ctrl w", "ctrl q", "ctrl shift i", "f12", "ctrl j",
                                  "ctrl alt t", "ctrl alt f2", "super", "meta r", "win d", "cmd space", "alt f2",
                                  "O ctrl", "Control o", "f10", "shift escape", "f1", "f7"])
def test_dialog_chords_refused(keys):
    with pytest.raises(PolicyError, match="refused hotkey"):
        check(f"Action: hotkey(key='{keys}')")


def test_chords_built_from_held_keys_are_refused():
    with pytest.raises(PolicyError, match="ctrl\\+o"):
        check("Action: press(key='ctrl')\n\nhotkey(key='o')\n\nrelease(key='ctrl')")
    with pytest.raises(PolicyError, match="typing while ctrl is held"):
        check("Action: keydown(key='ctrl')\n\ntype(content='o')")
    with pytest.raises(PolicyError, match="alt\\+f4"):
        check("Action: press(key='alt')\n\npress(key='f4')")
    # released before: fine
    assert len(check("Action: press(key='ctrl')\n\nrelease(key='ctrl')\n\nhotkey(key='o')")) == 3


@pytest.mark.parametrize("key", ["shift", "alt", "Option"])
@pytest.mark.parametrize("act", ["click(start_box='(10,10)')", "left_double(start_box='(10,10)')",
                                 "right_single(start_box='(10,10)')",
                                 "drag(start_box='(10,10)', end_box='(20,20)')"])
def test_clicks_with_shift_or_alt_held_are_refused(key, act):
    """In a browser they open the link in a new window (with an address bar) or download it."""
    with pytest.raises(PolicyError, match="new browser window or downloads"):
        check(f"Action: keydown(key='{key}')\n\n{act}")
    assert len(check(f"Action: keydown(key='{key}')\n\nkeyup(key='{key}')\n\n{act}")) == 3
    assert len(check(f"Action: keydown(key='ctrl')\n\n{act}\n\nkeyup(key='ctrl')")) == 3  # ctrl+click selects


@pytest.mark.parametrize("keys", ["ctrl c", "ctrl v", "ctrl a", "ctrl z", "ctrl shift z", "enter", "tab",
                                  "shift tab", "alt left", "pagedown", "ctrl f", "escape", "f5"])
def test_everyday_chords_pass(keys):
    (a,) = check(f"Action: hotkey(key='{keys}')")
    assert a.text == keys


def test_typed_text_limits():
    assert check("Action: type(content='hello world\\n')")[0].text == "hello world\n"
    with pytest.raises(PolicyError, match="10000 characters"):
        check("Action: type(content='" + "a" * 10000 + "')")
    assert Policy(max_type_chars=20000).check_step(parse_response("Action: type(content='" + "a" * 10000 + "')")
                                                   .actions)
    with pytest.raises(PolicyError, match="control characters"):
        check("Action: type(content='a\x0fb')")  # xdotool would type ^O: the file chooser


def test_coordinates_outside_the_frame_are_refused():
    m = CoordinateMapper(1920, 1080, version="1.5")  # frame 1932x1092
    assert check("Action: click(start_box='(1932,1092)')", mapper=m)
    for bad in ("(1933,10)", "(-1,10)", "(10,99999)"):
        with pytest.raises(PolicyError, match="outside the screenshot"):
            check(f"Action: click(start_box='{bad}')", mapper=m)
    with pytest.raises(PolicyError, match="outside"):
        check("Action: drag(start_box='(1,1)', end_box='(5000,5)')", mapper=m)
    m10 = CoordinateMapper(1920, 1080, version="1.0")
    with pytest.raises(PolicyError, match="1000x1000"):
        check("Action: click(start_box='(1001,5)')", mapper=m10)


# -- Chromium's sandbox ----------------------------------------------------------------------------------
def test_sandbox_decision(monkeypatch):
    import flashtune.agent.executors.browser as browser

    monkeypatch.delenv("FLASHTUNE_CHROMIUM_SANDBOX", raising=False)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 0)
    root = sandbox_status()
    assert not root["enabled"] and "root" in root["reason"] and sandbox_args(root) == ["--no-sandbox"]
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(browser, "_read", lambda path: None)
    user = sandbox_status()
    assert user["enabled"] and sandbox_args(user) == []
    monkeypatch.setattr(browser, "_read", lambda path: "0" if path.endswith("max_user_namespaces") else None)
    monkeypatch.setattr(browser, "SUID_SANDBOX", ())
    no_ns = sandbox_status()
    assert not no_ns["enabled"] and "namespaces" in no_ns["reason"]
    monkeypatch.setattr(browser, "_read", lambda path: None)
    monkeypatch.setenv("FLASHTUNE_CHROMIUM_SANDBOX", "0")
    assert not sandbox_status()["enabled"]

    class FakeChromium:
        def launch(self, **kw):
            self.kw = kw

    class FakePlaywright:
        chromium = FakeChromium()

    monkeypatch.delenv("FLASHTUNE_CHROMIUM_SANDBOX")
    monkeypatch.setattr(browser, "find_chromium", lambda: "/usr/bin/chromium")
    pw = FakePlaywright()
    browser.launch_chromium(pw)
    assert pw.chromium.kw["chromium_sandbox"] is True and "--no-sandbox" not in pw.chromium.kw["args"]
    browser.launch_chromium(pw, sandbox={"enabled": False, "reason": "root"})
    assert pw.chromium.kw["chromium_sandbox"] is False and "--no-sandbox" in pw.chromium.kw["args"]


def _resolver(monkeypatch, table: dict):
    """socket.getaddrinfo answering from `table` (name -> addresses); other names do not resolve."""
    import socket

    from flashtune.agent import policy as pol

    def getaddrinfo(host, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(f"{host} does not resolve")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0))
                for ip in table[host]]

    monkeypatch.setattr(pol, "_RESOLVED", {})
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_names_that_resolve_inside_are_refused_like_the_addresses(monkeypatch):
    """The request guard (resolve=True) applies the address rules to what a name resolves to: a public-looking
    name pointing at the metadata service, this machine or a private network is refused; without resolving,
    the name alone passes (which is what the model's navigate check sees)."""
    _resolver(monkeypatch, {"meta.example": ["169.254.169.254"], "loop.example": ["127.0.0.1"],
                            "v6loop.example": ["::1"], "lan.example": ["93.184.216.34", "10.1.2.3"],
                            "site.example": ["93.184.216.34"]})
    policy = Policy(template="browser", start_url="https://start.example/")
    assert policy.check_url("http://site.example/", resolve=True) == "http://site.example/"
    for name, why in (("meta.example", "metadata"), ("loop.example", "localhost"), ("v6loop.example", "localhost"),
                      ("lan.example", "private")):
        with pytest.raises(PolicyError, match=why) as exc:
            policy.check_url(f"http://{name}/x", resolve=True)
        assert name in str(exc.value) and "resolves to" in str(exc.value)
        policy.check_url(f"http://{name}/x")
    policy.check_url("http://nowhere.example/", resolve=True)  # resolves to nothing: the browser fails too
    allowed = Policy(template="browser", start_url="https://start.example/", allow_hosts=("lan.example",))
    allowed.check_url("http://lan.example/", resolve=True)  # a private address behind a host allowed by name
    local = Policy(template="browser", start_url=LOCAL)
    local.check_url("http://loop.example:8765/", resolve=True)  # loopback is fine when the start URL is local
    with pytest.raises(PolicyError, match="loop.example resolves to 127.0.0.1.*start URL's port"):
        local.check_url("http://loop.example/", resolve=True)  # on its port
