"""Execute UI-TARS actions (arXiv 2501.12326) in Chromium through Playwright.

Screenshots are in device pixels; Playwright's mouse takes CSS pixels, so the mapper divides by the page's
device scale factor. Debian's /usr/bin/chromium is used by default (Playwright's own browser download is not
needed).
"""

from __future__ import annotations

import os
import shutil

from flashtune.agent.actions import Action
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.executors.base import SCROLL_CLICKS, ActionError, check_supported, perform
from flashtune.agent.executors.egress import HEADER as EGRESS_HEADER
from flashtune.agent.executors.egress import EgressProxy
from flashtune.errors import FlashtuneError, MissingDependencyError

CHROMIUM_ARGS = [
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
SUID_SANDBOX = ("/usr/lib/chromium/chrome-sandbox", "/opt/google/chrome/chrome-sandbox")
WHEEL_PX_PER_CLICK = 100  # CSS pixels per scroll "click"

_PW_KEYS = {
    "enter": "Enter", "escape": "Escape", "ctrl": "Control", "alt": "Alt", "shift": "Shift", "meta": "Meta",
    "space": "Space", "tab": "Tab", "backspace": "Backspace", "delete": "Delete", "up": "ArrowUp",
    "down": "ArrowDown", "left": "ArrowLeft", "right": "ArrowRight", "pageup": "PageUp", "pagedown": "PageDown",
    "home": "Home", "end": "End", "insert": "Insert", "capslock": "CapsLock",
    **{f"f{i}": f"F{i}" for i in range(1, 13)},
}


def find_chromium() -> str:
    """Path to a Chromium binary: $FLASHTUNE_CHROMIUM, else chromium / chromium-browser on PATH."""
    chosen = os.environ.get("FLASHTUNE_CHROMIUM")
    if chosen and not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
        raise MissingDependencyError(f"FLASHTUNE_CHROMIUM={chosen!r} is not an executable file; point it at a "
                                     "Chromium binary or unset it")
    path = chosen or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise MissingDependencyError("no Chromium found; install it with `apt-get install chromium` "
                                     "or set FLASHTUNE_CHROMIUM=/path/to/chrome")
    return path


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def sandbox_status() -> dict:
    """Whether Chromium can run with its sandbox here: {"enabled": bool, "reason": str}.

    The sandbox is on wherever the platform allows it. It is off when flashtune runs as root (Chromium refuses
    its sandbox for root and will not start without --no-sandbox), when the kernel allows no unprivileged user
    namespaces and no setuid chrome-sandbox helper is installed, or when FLASHTUNE_CHROMIUM_SANDBOX=0.
    """
    if os.environ.get("FLASHTUNE_CHROMIUM_SANDBOX", "").strip() == "0":
        return {"enabled": False, "reason": "turned off by FLASHTUNE_CHROMIUM_SANDBOX=0"}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return {"enabled": False, "reason": "running as root: Chromium cannot use its sandbox for root; run "
                                            "flashtune as an unprivileged user to turn it on"}
    suid = any(os.path.exists(p) and os.stat(p).st_mode & 0o4000 and os.stat(p).st_uid == 0 for p in SUID_SANDBOX)
    no_userns = (_read("/proc/sys/kernel/unprivileged_userns_clone") == "0"
                 or _read("/proc/sys/user/max_user_namespaces") == "0"
                 or _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1")
    if no_userns and not suid:
        return {"enabled": False, "reason": "the kernel allows no unprivileged user namespaces and no setuid "
                                            "chrome-sandbox is installed"}
    return {"enabled": True, "reason": "setuid chrome-sandbox" if no_userns else "user namespaces"}


def sandbox_args(status: dict | None = None) -> list[str]:
    """Extra Chromium flags for `status` (sandbox_status()): --no-sandbox only where the sandbox cannot run."""
    status = status or sandbox_status()
    return [] if status["enabled"] else ["--no-sandbox"]


def launch_chromium(playwright, headless: bool = True, env: dict | None = None, args: list[str] = (),
                    sandbox: dict | None = None):
    """Launch Chromium with the flags that keep it quiet on a closed network, sandboxed where possible."""
    sandbox = sandbox or sandbox_status()
    return playwright.chromium.launch(executable_path=find_chromium(), headless=headless,
                                      chromium_sandbox=sandbox["enabled"],
                                      args=CHROMIUM_ARGS + sandbox_args(sandbox) + list(args), env=env)


def playwright_key(key: str) -> str:
    return _PW_KEYS.get(key, key)


class BrowserExecutor:
    """Drives one Playwright `page`. Use `BrowserExecutor.launch(...)` to own a browser, or pass a page.

    With a `policy` (policy.Policy), every request the page makes is checked against its URL rules: a
    navigation outside them (a link, a redirect, a script) is aborted, and so is any request to a metadata,
    link-local or (unless the start URL is local) loopback address. `launch` also sends all of Chromium's
    traffic through an egress proxy (egress.py, passed as `proxy`) that resolves each host once and connects
    only to addresses the policy allows, so a name whose DNS answer changes after the guard's check is stopped
    there. `blocked` lists what was stopped: URLs, or host:port for a refused tunnel (https).
    """

    def __init__(self, page, *, owned=None, policy=None, sandbox: dict | None = None, proxy=None):
        self.page = page
        self._owned = owned  # (playwright context manager, browser) when we launched them
        self.sandbox = sandbox
        self.proxy = proxy
        self.blocked: list[str] = []
        self.errors: list[str] = []
        if proxy is not None:
            proxy.on_refused = lambda target, reason: self.blocked.append(target[:200])
        if policy is not None:
            self.guard(policy)

    def guard(self, policy) -> None:
        """Check every request of the page's context against `policy` (see the class docstring)."""
        from flashtune.agent.policy import PolicyError

        def handle(route, request):
            try:
                policy.check_url(request.url, navigation=request.is_navigation_request(), resolve=True)
            except PolicyError:
                self.blocked.append(request.url[:200])
                route.abort("blockedbyclient")
                return
            route.continue_()

        self.page.context.route("**/*", handle)

    @classmethod
    def launch(cls, start_url: str | None = None, width: int = 1280, height: int = 720,
               scale_factor: float = 1.0, headless: bool = True, policy=None, resolver=None) -> "BrowserExecutor":
        """Launch Chromium and open `start_url`. With a `policy`, behind the request guard and an egress proxy
        (`resolver`: the proxy's name lookup, egress.system_resolver by default)."""
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise MissingDependencyError("the browser executor needs playwright: pip install 'flashtune[agent]'") \
                from exc
        sandbox = sandbox_status()
        proxy = EgressProxy(policy, resolver=resolver) if policy is not None else None
        pw = None
        try:
            pw = sync_playwright().start()
            browser = launch_chromium(pw, headless=headless, sandbox=sandbox,
                                      args=proxy.chromium_args() if proxy else ())
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=scale_factor,
                                    accept_downloads=False)  # a page can start one without any click
            ex = cls(page, owned=(pw, browser), policy=policy, sandbox=sandbox, proxy=proxy)
            if start_url:
                ex.open_start_url(start_url)
        except BaseException:
            if pw is not None:
                pw.stop()
            if proxy is not None:
                proxy.close()
            raise
        return ex

    # -- executor interface -------------------------------------------------------------------------------
    @property
    def scale_factor(self) -> float:
        return float(self.page.evaluate("window.devicePixelRatio"))

    def screenshot(self, tries: int = 5) -> bytes:
        """A PNG of the viewport in device pixels. Chromium cannot capture a page that is still committing (just
        after a failed navigation, when its error page replaces the document): asked again after a pause."""
        from playwright.sync_api import Error as PlaywrightError

        for attempt in range(tries):
            try:
                return self.page.screenshot(type="png")
            except PlaywrightError as exc:
                if "Unable to capture screenshot" not in str(exc) or attempt == tries - 1:
                    raise
                self.page.wait_for_timeout(200)

    def mapper(self, width: int, height: int, version: str = "1.5", **kw) -> CoordinateMapper:
        return CoordinateMapper(width, height, version=version, scale_factor=self.scale_factor, **kw)

    def check(self, action: Action) -> None:
        """Raise UnsupportedActionError for an action this executor lacks (open_app, press_home ...)."""
        check_supported(action, self)

    def execute(self, action: Action, mapper: CoordinateMapper, scroll_clicks: int = SCROLL_CLICKS) -> None:
        perform(action, mapper, self, scroll_clicks)

    def close(self) -> None:
        try:
            if self._owned:
                pw, browser = self._owned
                self._owned = None
                try:
                    browser.close()
                finally:
                    pw.stop()
        finally:
            if self.proxy is not None:
                self.proxy.close()

    # -- primitives (CSS pixels) -----------------------------------------------------------------------------
    def click(self, x: float, y: float, button: str = "left", count: int = 1) -> None:
        self.page.mouse.click(x, y, button=button, click_count=count)

    def move(self, x: float, y: float) -> None:
        self.page.mouse.move(x, y)

    def drag(self, x1: float, y1: float, x2: float, y2: float) -> None:
        m = self.page.mouse
        m.move(x1, y1)
        m.down()
        m.move(x2, y2, steps=12)
        m.up()

    def type_text(self, text: str) -> None:
        self.page.keyboard.type(text)

    def line_break(self) -> None:
        """A newline inside typed content: inserted as text (a line in a textarea), never an Enter press."""
        self.page.keyboard.insert_text("\n")

    def hotkey(self, keys: list[str]) -> None:
        self.page.keyboard.press("+".join(playwright_key(k) for k in keys))

    def key_down(self, key: str) -> None:
        self.page.keyboard.down(playwright_key(key))

    def key_up(self, key: str) -> None:
        self.page.keyboard.up(playwright_key(key))

    def scroll(self, x: float, y: float, direction: str, clicks: int) -> None:
        self.page.mouse.move(x, y)
        delta = clicks * WHEEL_PX_PER_CLICK
        dx, dy = {"up": (0, -delta), "down": (0, delta), "left": (-delta, 0), "right": (delta, 0)}[direction]
        self.page.mouse.wheel(dx, dy)
        self.page.wait_for_timeout(150)  # let the smooth scroll settle before the next screenshot

    def long_press(self, x: float, y: float, seconds: float = 1.0) -> None:
        self.page.mouse.move(x, y)
        self.page.mouse.down()
        self.page.wait_for_timeout(int(seconds * 1000))
        self.page.mouse.up()

    def open_start_url(self, url: str) -> None:
        """Open the run's start URL; one that does not load is the user's to fix (FlashtuneError)."""
        try:
            self._load(lambda: self.page.goto(url), "start URL", url)
        except ActionError as exc:
            raise FlashtuneError(f"cannot open the start URL: {exc}; check the address and that the site is "
                                 "up") from None

    def navigate(self, url: str) -> None:
        """Open `url` (already checked by the policy). A page that cannot be loaded (refused, unknown host,
        blocked by the request guard or the egress proxy, too slow) is the model's to handle: ActionError, sent
        back to it."""
        self._load(lambda: self.page.goto(url), f"navigate(content='{url[:200]}')", url)

    def go_back(self) -> None:
        self._load(self.page.go_back, "navigate_back()")

    def _load(self, go, what: str, url: str | None = None) -> None:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            response = go()
        except PlaywrightError as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self.errors.append(f"{what}: {first}")
            if not isinstance(exc, PlaywrightTimeout) and "net::ERR_" not in first:
                raise  # the browser itself failed (closed, crashed): the machine's fault
            try:  # let the browser's error page finish replacing the document before the next screenshot
                self.page.wait_for_load_state(timeout=5000)
            except PlaywrightError:
                pass
            error, reason = first.split(": ", 1)[-1], ""
            failure = (self.proxy.failure_for(url) if self.proxy is not None and "ERR_TUNNEL_CONNECTION_FAILED" in
                       error else None)
            if failure:  # Chromium names every refused CONNECT so: the proxy knows why
                error, reason = f"{failure[0]} at {url[:200]}", failure[1]
            raise ActionError(f"the page did not load: {error}{_why(error, reason)}") from None
        egress = response.headers.get(EGRESS_HEADER.lower()) if response is not None else None
        if egress:  # the egress proxy's own answer to a plain-http request it could not or would not pass on
            net_error, _, reason = egress.partition("; ")
            self.errors.append(f"{what}: {net_error} (egress proxy)")
            error = f"{net_error} at {response.url[:200]}"
            raise ActionError(f"the page did not load: {error}{_why(error, reason)}")



def _why(error: str, reason: str) -> str:
    if "ERR_BLOCKED_BY_CLIENT" not in error:
        return ""
    return f" (stopped by the navigation policy: {reason})" if reason else " (stopped by the navigation policy)"
