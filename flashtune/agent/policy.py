"""The policy layer between the parser and the executors: what a UI-TARS model (arXiv 2501.12326) may make the
machine do. Model output is untrusted (a page the agent visits can inject instructions), so every parsed step
is checked here before anything is executed:

- actions: only the action space of the chosen template and model version (see ACTION_SPACES);
- URLs (`navigate`): http and https only; a missing scheme becomes https; never file:, javascript:, data:,
  chrome: or any other scheme, never link-local or cloud metadata addresses, loopback only when the start URL
  is itself local, other private addresses only when allowed by name, and loopback or private addresses on the
  start URL's port or an allowed one only (the browser executor's request guard and egress proxy apply these
  rules to the addresses a name resolves to as well); hosts limited by an allow-list (default: the start URL's
  host and public hosts);
- keys: names from the fixed list of `keys.py`; chords that open OS or browser dialogs (file chooser, save,
  print, address bar, new windows, devtools, OS launcher ...) are refused, also when built from held keys;
- text: at most `max_type_chars` characters, no control characters, nothing typed while ctrl/alt/meta is held;
- coordinates: inside the model's frame of the current screenshot.

A refused step raises `PolicyError`; the loop reports it to the model as an error, records it in the
trajectory and executes none of the step's actions.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

from flashtune.agent.actions import Action
from flashtune.agent.keys import MODIFIERS, normalize_key
from flashtune.errors import ConfigError, FlashtuneError, check_range

_COMPUTER = frozenset({"click", "left_single", "left_double", "right_single", "drag", "hotkey", "type", "scroll",
                       "wait", "finished", "call_user",
                       # held keys (UI-TARS-desktop's operators); released at the end of every step
                       "press", "release", "keydown", "keyup"})
_MOBILE = frozenset({"click", "long_press", "type", "scroll", "open_app", "drag", "press_home", "press_back",
                     "finished"})
# template -> actions; the same for every model version (1.0's finished() and 1.5's finished(content) are one
# action; v1 mobile's scroll(start_box, end_box) and 1.5's scroll(direction) are one action too)
ACTION_SPACES = {
    "computer": _COMPUTER,
    "mobile": _MOBILE,
    "browser": _COMPUTER | {"navigate", "navigate_back"},
}

SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com", "metadata.packet.net"})
METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "fd20:ce::254"))
_LOCAL_SUFFIXES = (".local", ".lan", ".home.arpa", ".internal", ".intranet", ".corp", ".localdomain")


def _chord(text: str) -> frozenset:
    return frozenset(text.split())


# Chords refused on every executor (keys as in keys.py, any order). Any chord with `meta` is refused too.
REFUSED_CHORDS = frozenset(_chord(c) for c in (
    "ctrl o", "ctrl s", "ctrl shift s", "ctrl p", "ctrl shift p", "alt f4", "ctrl w", "ctrl shift w", "ctrl q",
    "ctrl n", "ctrl shift n", "ctrl t", "ctrl shift t", "ctrl l", "alt d", "f6", "ctrl k", "ctrl e", "ctrl h",
    "ctrl j", "ctrl u", "ctrl d", "ctrl shift o", "ctrl shift b", "ctrl shift delete", "ctrl shift i",
    "ctrl shift j", "ctrl shift c", "f12", "f10", "alt e", "alt f", "alt f1", "alt f2", "alt home",
    "ctrl escape", "ctrl shift escape", "ctrl alt t", "ctrl alt delete", "ctrl alt backspace", "ctrl alt l",
    "ctrl alt escape", *(f"ctrl alt f{i}" for i in range(1, 13)),
    "shift escape",  # Chromium's task manager (it can end the page's or the browser's process)
    "f1",  # a help tab on a host nobody asked for
    "f7"))  # the caret-browsing dialog
# A click while one of these is held opens the link in a new browser window (shift) or downloads it (alt).
CLICK_MODIFIERS_REFUSED = frozenset({"shift", "alt"})
_CLICKS = frozenset({"click", "left_single", "left_double", "right_single", "drag", "long_press"})


class PolicyError(FlashtuneError):
    """The model asked for something the policy refuses; nothing of the step was executed."""

    reason = "refused"


def _whatwg_ipv4(host: str):
    """The IPv4 address a browser reads in `host` ('2852039166', '0xA9FEA9FE', '0251.0376.0251.0376',
    '169.254.43518' are all 169.254.169.254 to Chromium), None when the host is a name, or raise ValueError."""
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if not parts or not re.fullmatch(r"(0[xX][0-9a-fA-F]*|[0-9]+)", parts[-1]):
        return None
    if len(parts) > 4:
        raise ValueError("too many IPv4 parts")
    nums = []
    for p in parts:
        if re.fullmatch(r"0[xX][0-9a-fA-F]*", p):
            nums.append(int(p[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]+", p):
            nums.append(int(p, 8))
        elif re.fullmatch(r"[0-9]+", p):
            nums.append(int(p))
        else:
            raise ValueError(f"bad IPv4 part {p!r}")
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise ValueError("IPv4 part out of range")
    value = nums[-1]
    for i, n in enumerate(nums[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def canonical_host(host: str) -> str:
    """`host` as a browser reads it before deciding what it is: percent escapes decoded, full-width and other
    compatibility characters mapped (NFKC: '１２７．０．０．１' is 127.0.0.1), ideographic full stops as dots,
    lower case, no trailing dot."""
    h = unicodedata.normalize("NFKC", unquote(host)).replace("\u3002", ".").replace("\uff61", ".")
    return h.lower().rstrip(".")


def host_class(host: str) -> str:
    """'never' (metadata, link-local, multicast, reserved), 'loopback', 'private' or 'public'."""
    h = canonical_host(host)
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        ip = _whatwg_ipv4(h)  # raises ValueError on a malformed numeric host
    if ip is None:
        if h in METADATA_HOSTS:
            return "never"
        if h == "localhost" or h.endswith(".localhost"):
            return "loopback"
        if "." not in h or h.endswith(_LOCAL_SUFFIXES):
            return "private"
        return "public"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_IPS or ip.is_link_local or ip.is_multicast:
        return "never"
    if ip.is_loopback or ip.is_unspecified:  # 0.0.0.0 reaches this machine in Chromium on Linux
        return "loopback"
    if ip.is_reserved:
        return "never"
    if not ip.is_global:
        return "private"
    return "public"


_RESOLVED: dict[str, tuple[str, ...]] = {}


def resolve_host(host: str) -> tuple[str, ...]:
    """The addresses `host` resolves to on this machine (none for an IP literal, or when it does not resolve:
    the browser, using the same resolver, cannot reach it either). Cached for the process."""
    h = canonical_host(host).strip("[]")
    try:
        ipaddress.ip_address(h)
        return ()
    except ValueError:
        pass
    if _whatwg_ipv4(h) is not None:
        return ()
    if h not in _RESOLVED:
        import socket

        try:
            infos = socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            infos = []
        _RESOLVED[h] = tuple(sorted({info[4][0].split("%")[0] for info in infos}))
    return _RESOLVED[h]


DEFAULT_PORTS = {"http": 80, "https": 443}


def _allow_entry(entry: str) -> tuple[str, int | None]:
    """An --allow-host entry as (host pattern, port or None): 'example.com', '*.example.com', '10.0.0.5:8080',
    '[::1]:9000'; an IPv6 address without brackets has no port."""
    m = re.fullmatch(r"\[([^\]]*)\](?::(\d+))?|([^:]*):(\d+)", entry)
    if m is None:
        return entry, None
    host, port = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    if port is not None and not 0 < int(port) < 65536:
        raise ConfigError(f"allow host {entry!r} has port {port}, outside 1-65535")
    return host, int(port) if port is not None else None


def _with_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_matches(host: str, pattern: str) -> bool:
    host, pattern = canonical_host(host), canonical_host(pattern)
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass(frozen=True)
class Policy:
    """What model output may do. `allow_hosts`: when set, navigation goes only to these hosts ('example.com',
    '*.example.com') and the start URL's host; when empty, to the start URL's host and any public host."""

    template: str = "computer"
    model_version: str = "1.5"
    start_url: str | None = None
    allow_hosts: tuple[str, ...] = ()
    max_type_chars: int = 2000
    refused_chords: frozenset = field(default=REFUSED_CHORDS)

    def __post_init__(self):
        if self.template not in ACTION_SPACES:
            raise ConfigError(f"template={self.template!r} is not allowed; choose one of "
                              f"{', '.join(repr(t) for t in ACTION_SPACES)}")
        check_range("max_type_chars", self.max_type_chars, 1, integer=True)
        for h in self.allow_hosts:
            if not isinstance(h, str) or not re.fullmatch(r"(\*\.)?[A-Za-z0-9.:\[\]-]+", h):
                raise ConfigError(f"allow host {h!r} is not a host name; write e.g. example.com, *.example.com "
                                  "or 127.0.0.1:9000")
        self._entries  # noqa: B018 - parses the entries now: a port out of range is refused here
        if self.start_url is not None:
            scheme = urlsplit(self.start_url.strip()).scheme.lower()
            if scheme not in SCHEMES or not urlsplit(self.start_url.strip()).hostname:
                raise ConfigError(f"start URL {self.start_url!r} must be an http(s) URL such as "
                                  "http://127.0.0.1:8000/page.html")

    @property
    def actions(self) -> frozenset:
        return ACTION_SPACES[self.template]

    @property
    def start_host(self) -> str | None:
        return urlsplit(self.start_url.strip()).hostname if self.start_url else None

    @functools.cached_property
    def _entries(self) -> tuple[tuple[str, int | None], ...]:
        """The allow-list as (host pattern, port or None), parsed once (cached_property writes past frozen)."""
        return tuple(map(_allow_entry, self.allow_hosts))

    @property
    def start_port(self) -> int | None:
        if not self.start_url:
            return None
        parts = urlsplit(self.start_url.strip())
        return parts.port or DEFAULT_PORTS[parts.scheme.lower()]

    @property
    def start_is_local(self) -> bool:
        host = self.start_host
        try:
            return host is not None and host_class(host) == "loopback"
        except ValueError:
            return False

    # -- URLs -------------------------------------------------------------------------------------------------
    def check_url(self, url: str, navigation: bool = True, resolve: bool = False) -> str:
        """The URL to open (a missing scheme becomes https), or raise PolicyError saying why not.

        navigation=False (a page's own sub-resource) skips the allow-list of public hosts but keeps every
        other rule. resolve=True (the browser's request guard) also applies the address rules to every address
        the host name resolves to now, so that a name pointing at a metadata, loopback or private address is
        refused early, like the address itself. That lookup is not the one the connection uses: a name whose
        answers change between the two (DNS rebinding) is stopped by the browser executor's egress proxy
        (executors/egress.py), which resolves once per connection, checks every address of that answer with
        `check_address` and connects only to one of them."""
        shown = repr(url if len(url) <= 80 else url[:80] + "...")
        u = url.strip()
        if not u or len(u) > 2048 or re.search(r"[\s\\\x00-\x1f\x7f]", u):
            raise PolicyError(f"refused URL {shown}: empty, too long, or holding spaces, backslashes or control "
                              "characters")
        m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", u)
        if m and not (u[m.end():m.end() + 2] == "//" or not re.match(r"\d", u[m.end():])):
            m = None  # 'localhost:8000/x' is a host and port, not a scheme
        if m is None:
            u = "https:" + u if u.startswith("//") else "https://" + u
        parts = urlsplit(u)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise PolicyError(f"refused URL {shown}: only http and https URLs may be opened, not {scheme}:")
        if "@" in parts.netloc:
            raise PolicyError(f"refused URL {shown}: URLs with a user name or password are not opened")
        try:
            host = parts.hostname
            port = parts.port or DEFAULT_PORTS[scheme]  # raises on a bad port
            kind = host_class(host) if host else None
        except ValueError:
            kind = None
        if kind is None:
            raise PolicyError(f"refused URL {shown}: not a valid URL (no host, or a malformed host or port)")
        allowed = self._allowed(host, port)
        self._check_address(kind, host, port, f"URL {shown}", allowed)
        if kind == "public" and navigation and self.allow_hosts and not allowed:
            raise PolicyError(f"refused URL {shown}: {host} is not in the allowed hosts "
                              f"({', '.join(self.allow_hosts)})")
        if resolve and kind != "never":
            for address in resolve_host(host):  # a public-looking name may point inside: check where it goes
                self.check_address(host, address, f"URL {shown} ({host} resolves to {address})", port)
        return u

    def _allowed(self, host: str, port: int | None = None) -> bool:
        """Whether `host` is the start URL's host or in the allow-list (which lets private addresses through);
        an allow-list entry with a port (`host:9000`) names that port only."""
        return (self.start_host is not None and _host_matches(host, self.start_host)) or \
            any(_host_matches(host, h) and p in (None, port) for h, p in self._entries)

    def check_address(self, host: str, address: str | None = None, what: str | None = None,
                      port: int | None = None) -> None:
        """Raise PolicyError when a connection to `host` (a name or an IP literal) on `port` breaks the address
        rules, or, given `address` (one that `host` resolved to), when that address does: never metadata /
        link-local; loopback only for a local start URL; other private addresses only for the start URL's host
        or an allowed one; and loopback or private addresses only on the start URL's port or an allowed one
        (see `_port_allowed`; port None skips that rule). The allow-list of public hosts is not applied here (it
        is for navigations). `what` names the request in the message (default: 'connection to HOST')."""
        what = what or f"connection to {host}"
        try:
            kind = host_class(address if address is not None else host)
        except ValueError:
            raise PolicyError(f"refused {what}: not a valid host or address") from None
        self._check_address(kind, host, port, what, self._allowed(host, port))

    def _check_address(self, kind: str, host: str, port: int | None, what: str, allowed: bool) -> None:
        if kind == "never":
            raise PolicyError(f"refused {what}: link-local and cloud metadata addresses are never opened")
        if kind == "loopback" and not self.start_is_local:
            raise PolicyError(f"refused {what}: localhost is opened only when the start URL is local")
        if kind == "private" and not allowed:
            raise PolicyError(f"refused {what}: {host} is a private address; allow it with --allow-host {host}")
        if kind in ("loopback", "private") and port is not None and not self._port_allowed(kind, host, port):
            where = "this machine" if kind == "loopback" else host
            raise PolicyError(f"refused {what}: {where} is opened on the start URL's port ({self.start_port}) and "
                              f"the allowed ones only; allow port {port} with --allow-host "
                              f"{_with_port(canonical_host(host), port)}")

    def _port_allowed(self, kind: str, host: str, port: int) -> bool:
        """Inside addresses (loopback, private) are opened on the start URL's port of its host, on a port the
        allow-list names for that host (`--allow-host 127.0.0.1:9000`), or on any port of a host it names without
        one. Every loopback name is one machine: localhost:8000 is the start URL's port when that is
        127.0.0.1:8000, and an entry naming one loopback host holds for all of them."""
        def names(pattern: str) -> bool:
            if _host_matches(host, pattern):
                return True
            try:
                return kind == "loopback" and host_class(pattern) == "loopback"
            except ValueError:
                return False

        if self.start_host is not None and names(self.start_host) and port == self.start_port:
            return True
        return any(names(h) and p in (None, port) for h, p in self._entries)

    # -- keys -------------------------------------------------------------------------------------------------
    def _check_chord(self, keys: frozenset, what: str) -> None:
        if "meta" in keys:
            raise PolicyError(f"refused {what}: keys with meta/super/win reach the operating system")
        if keys in self.refused_chords:
            raise PolicyError(f"refused {what}: {'+'.join(sorted(keys))} opens a dialog, window or browser UI "
                              "outside the page")

    # -- steps ------------------------------------------------------------------------------------------------
    def check_step(self, actions, mapper=None) -> tuple[Action, ...]:
        """The step's actions as they will be executed (URLs normalised), or raise PolicyError for the first
        refused one. `mapper` (a CoordinateMapper for the current screenshot) enables the coordinate check."""
        held: set[str] = set()
        out = []
        for a in actions:
            what = _short(a)
            if a.name not in self.actions:
                raise PolicyError(f"refused {what}: {a.name}() is not in the {self.template} action space "
                                  f"({', '.join(sorted(self.actions))})")
            if mapper is not None:
                for c in (a.start, a.end):
                    if c is None:
                        continue
                    fw, fh = mapper.frame(c.dialect)
                    x, y = c.center
                    if not (0 <= x <= fw and 0 <= y <= fh):
                        raise PolicyError(f"refused {what}: ({x:g}, {y:g}) is outside the screenshot, whose "
                                          f"frame is {fw:g}x{fh:g}")
            if a.name in _CLICKS and held & CLICK_MODIFIERS_REFUSED:
                raise PolicyError(f"refused {what}: a click while {'+'.join(sorted(held))} is held opens a new "
                                  "browser window or downloads the link; release the key first")
            if a.name in ("hotkey", "press", "keydown", "release", "keyup"):
                keys = frozenset(normalize_key(k) for k in a.keys)
                if a.name in ("release", "keyup"):
                    held -= keys
                else:
                    self._check_chord(frozenset(held | keys), what)
                    if a.name != "hotkey":
                        held |= keys
            elif a.name == "type":
                text = a.text or ""
                if len(text) > self.max_type_chars:
                    raise PolicyError(f"refused type() of {len(text)} characters; the limit is "
                                      f"{self.max_type_chars}")
                if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text):
                    raise PolicyError(f"refused {what}: control characters cannot be typed")
                if held & (MODIFIERS - {"shift"}):  # each typed character would be a shortcut
                    raise PolicyError(f"refused {what}: typing while {'+'.join(sorted(held))} is held would "
                                      "run shortcuts")
            elif a.name == "navigate":
                a = replace(a, text=self.check_url(a.text or ""))
            out.append(a)
        return tuple(out)

    def to_dict(self) -> dict:
        return {"template": self.template, "model_version": self.model_version, "start_url": self.start_url,
                "allow_hosts": list(self.allow_hosts), "max_type_chars": self.max_type_chars,
                "actions": sorted(self.actions)}


def _short(a: Action) -> str:
    s = str(a)
    return s if len(s) <= 100 else s[:100] + "...)"
