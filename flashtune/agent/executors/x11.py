"""Execute UI-TARS actions (arXiv 2501.12326) on an X11 display with `xdotool`; screenshots via libX11.

`VirtualDisplay` starts an `Xvfb` on a free display number (Xvfb picks it through -displayfd, so parallel test
workers never collide). The device scale factor on X11 is 1: model -> screenshot pixels -> xdotool.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import random
import select
import shutil
import subprocess
import tempfile
import time

from flashtune.agent.actions import Action
from flashtune.agent.coords import CoordinateMapper
from flashtune.agent.executors.base import SCROLL_CLICKS, ActionError, check_supported, perform
from flashtune.errors import FlashtuneError, MissingDependencyError

# canonical key name -> X keysym, as xdotool takes it
KEYSYMS = {
    "enter": "Return", "escape": "Escape", "ctrl": "ctrl", "alt": "alt", "shift": "shift", "meta": "super",
    "space": "space", "tab": "Tab", "backspace": "BackSpace", "delete": "Delete", "up": "Up", "down": "Down",
    "left": "Left", "right": "Right", "pageup": "Prior", "pagedown": "Next", "home": "Home", "end": "End",
    "insert": "Insert", "capslock": "Caps_Lock", **{f"f{i}": f"F{i}" for i in range(1, 13)},
    # single characters that are not their own keysym name
    " ": "space", ",": "comma", ".": "period", "/": "slash", "-": "minus", "=": "equal", ";": "semicolon",
    "'": "apostrophe", "[": "bracketleft", "]": "bracketright", "\\": "backslash", "`": "grave", "+": "plus",
}
SCROLL_BUTTONS = {"up": 4, "down": 5, "left": 6, "right": 7}
MOUSE_BUTTONS = {"left": 1, "middle": 2, "right": 3}


def keysym(key: str) -> str:
    return KEYSYMS.get(key, key)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise MissingDependencyError(f"{tool} is not installed; run `apt-get install {package}` (or `make sysdeps`)")
    return path


class VirtualDisplay:
    """An Xvfb server of `width` x `height` x 24 on a free display number; use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 720, timeout: float = 10.0):
        self.width, self.height = width, height
        xvfb = _need("Xvfb", "xvfb")
        # Lock files are per file system but abstract X sockets are per network namespace, so a number that
        # looks free can still be taken: try numbers from a random start until one server comes up.
        self._last_error = ""
        for _ in range(2):  # a loaded machine can refuse a burst of servers: one more round after a pause
            first = random.randrange(100, 800)
            for number in range(first, first + 40):
                if os.path.exists(f"/tmp/.X{number}-lock") or os.path.exists(f"/tmp/.X11-unix/X{number}"):
                    continue
                if self._try_start(xvfb, number, timeout):
                    self.display = f":{number}"
                    return
            time.sleep(1.0)
        why = f" (Xvfb said: {self._last_error})" if self._last_error else ""
        raise FlashtuneError(f"could not start Xvfb on any display number{why}; is another X server hogging them?")

    def _try_start(self, xvfb: str, number: int, timeout: float) -> bool:
        read_fd, write_fd = os.pipe()
        with tempfile.TemporaryFile() as log:  # the server's complaints, for the error if every number fails
            self.proc = subprocess.Popen(
                [xvfb, f":{number}", "-displayfd", str(write_fd), "-screen", "0", f"{self.width}x{self.height}x24",
                 "-nolisten", "tcp"],
                pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=log)
            os.close(write_fd)
            try:
                ready, _, _ = select.select([read_fd], [], [], timeout)
                answer = os.read(read_fd, 64).decode().strip() if ready else ""
            finally:
                os.close(read_fd)
            if answer != str(number):  # EOF: the server exited (number taken); nothing: it hangs
                self.stop()
                log.seek(0)
                lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
                self._last_error = lines[-1][:200] if lines else ("no answer" if not ready else "exited")
                return False
        lib, deadline = _libx11(), time.monotonic() + timeout
        while True:
            dpy = lib.XOpenDisplay(f":{number}".encode())
            if dpy:
                lib.XCloseDisplay(dpy)
                return True
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                return False
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "VirtualDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _XImage(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_int), ("height", ctypes.c_int), ("xoffset", ctypes.c_int), ("format", ctypes.c_int),
        ("data", ctypes.c_void_p), ("byte_order", ctypes.c_int), ("bitmap_unit", ctypes.c_int),
        ("bitmap_bit_order", ctypes.c_int), ("bitmap_pad", ctypes.c_int), ("depth", ctypes.c_int),
        ("bytes_per_line", ctypes.c_int), ("bits_per_pixel", ctypes.c_int), ("red_mask", ctypes.c_ulong),
        ("green_mask", ctypes.c_ulong), ("blue_mask", ctypes.c_ulong),
    ]


def _libx11():
    name = ctypes.util.find_library("X11")
    if not name:
        raise MissingDependencyError("libX11 is missing; run `apt-get install libx11-6`")
    lib = ctypes.CDLL(name)
    lib.XOpenDisplay.restype = ctypes.c_void_p
    lib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    lib.XDefaultRootWindow.restype = ctypes.c_ulong
    lib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
    lib.XDisplayWidth.argtypes = lib.XDisplayHeight.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.XGetImage.restype = ctypes.POINTER(_XImage)
    lib.XGetImage.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                              ctypes.c_uint, ctypes.c_ulong, ctypes.c_int]
    lib.XFree.argtypes = [ctypes.c_void_p]
    lib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    return lib


def check_display(display: str) -> None:
    """Open and close `display` once: an X server that is not there is one line now, not a failed first step."""
    lib = _libx11()
    dpy = lib.XOpenDisplay(display.encode())
    if not dpy:
        raise FlashtuneError(f"cannot open X display {display!r} (no X server there, or no access); check --display "
                             "or drop it to start a virtual display")
    lib.XCloseDisplay(dpy)


def grab_screen(display: str) -> bytes:
    """A PNG of the whole root window of `display` (24/32-bit TrueColor)."""
    from PIL import Image

    lib = _libx11()
    dpy = lib.XOpenDisplay(display.encode())
    if not dpy:
        raise FlashtuneError(f"cannot open X display {display!r}")
    try:
        w, h = lib.XDisplayWidth(dpy, 0), lib.XDisplayHeight(dpy, 0)
        img_p = lib.XGetImage(dpy, lib.XDefaultRootWindow(dpy), 0, 0, w, h, 0xFFFFFFFF, 2)  # 2 = ZPixmap
        if not img_p:
            raise FlashtuneError(f"XGetImage failed on {display!r}")
        img = img_p.contents
        try:
            if img.bits_per_pixel != 32:
                raise FlashtuneError(f"unsupported X visual: {img.bits_per_pixel} bits per pixel (need 32)")
            raw = ctypes.string_at(img.data, img.bytes_per_line * h)
            # little-endian 0x00RRGGBB pixels are bytes B, G, R, X
            pil = Image.frombuffer("RGB", (w, h), raw, "raw", "BGRX", img.bytes_per_line, 1)
        finally:
            lib.XFree(ctypes.c_void_p(img.data))
            lib.XFree(ctypes.cast(img_p, ctypes.c_void_p))
    finally:
        lib.XCloseDisplay(dpy)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


class X11Executor:
    """Drives the mouse and keyboard of an X display through xdotool (screen pixels, scale factor 1).
    `sandbox` describes the Chromium sandbox of the window it drives, and `blocked` lists what that window's
    egress proxy refused, when flashtune started one."""

    scale_factor = 1.0
    sandbox: dict | None = None
    blocked: list[str] | tuple = ()  # what its Chromium window's egress proxy refused, when flashtune started one

    def __init__(self, display: str | None = None, type_delay_ms: int = 8):
        self.display = display or os.environ.get("DISPLAY")
        if not self.display:
            raise FlashtuneError("no X display: pass --display :N or set DISPLAY (or use a VirtualDisplay)")
        self.xdotool = _need("xdotool", "xdotool")
        check_display(self.display)
        self.type_delay_ms = type_delay_ms

    def _run(self, *args: str) -> None:
        env = dict(os.environ, DISPLAY=self.display)
        res = subprocess.run([self.xdotool, *args], env=env, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise FlashtuneError(f"xdotool {' '.join(args)} failed: {res.stderr.strip()}")

    # -- executor interface -------------------------------------------------------------------------------
    def screenshot(self) -> bytes:
        return grab_screen(self.display)

    def mapper(self, width: int, height: int, version: str = "1.5", **kw) -> CoordinateMapper:
        return CoordinateMapper(width, height, version=version, scale_factor=1.0, **kw)

    def check(self, action: Action) -> None:
        """Raise UnsupportedActionError for an action this executor lacks (navigate, open_app ...)."""
        check_supported(action, self)

    def execute(self, action: Action, mapper: CoordinateMapper, scroll_clicks: int = SCROLL_CLICKS) -> None:
        perform(action, mapper, self, scroll_clicks)

    def close(self) -> None:
        pass

    # -- primitives (screen pixels) -----
    # No `mousemove --sync`: xdotool then waits ~15 s when the pointer is already at the target.--------------------------------------------------------------------
    @staticmethod
    def _xy(x: float, y: float) -> tuple[str, str]:
        return str(int(round(x))), str(int(round(y)))

    def click(self, x: float, y: float, button: str = "left", count: int = 1) -> None:
        self._run("mousemove", *self._xy(x, y), "sleep", "0.03", "click", "--repeat", str(count), "--delay", "60",
                  str(MOUSE_BUTTONS[button]))

    def move(self, x: float, y: float) -> None:
        self._run("mousemove", *self._xy(x, y), "sleep", "0.03")

    def drag(self, x1: float, y1: float, x2: float, y2: float) -> None:
        steps = []
        for i in range(1, 9):  # intermediate motion so pages see a drag, not a jump
            steps += ["mousemove", *self._xy(x1 + (x2 - x1) * i / 8, y1 + (y2 - y1) * i / 8), "sleep", "0.02"]
        self._run("mousemove", *self._xy(x1, y1), "sleep", "0.03", "mousedown", "1", "sleep", "0.05", *steps,
                  "mouseup", "1")

    def type_text(self, text: str) -> None:
        self._run("type", "--delay", str(self.type_delay_ms), "--", text)

    def paste_text(self, text: str) -> None:
        """Enter text that holds newlines by pasting it (ctrl+v), as the reference executor does: a newline
        becomes a line in a text area and a space in a one-line field, never an Enter that submits a form
        (only a trailing newline submits, see base.split_typed_text). The display's clipboard is replaced."""
        from flashtune.agent.executors.x11_clipboard import ClipboardServer

        server = ClipboardServer(_libx11(), self.display, text)
        try:
            self._run("key", "--clearmodifiers", "ctrl+v")
            if not server.wait_served(5.0):
                raise ActionError("no window took the typed text (pasted with ctrl+v) within 5 s; click the "
                                  "text field first")
            time.sleep(0.3)  # clients may ask again (Chromium polls TARGETS after a paste)
        finally:
            server.close()

    def hotkey(self, keys: list[str]) -> None:
        self._run("key", "--clearmodifiers", "+".join(keysym(k) for k in keys))

    def key_down(self, key: str) -> None:
        self._run("keydown", keysym(key))

    def key_up(self, key: str) -> None:
        self._run("keyup", keysym(key))

    def scroll(self, x: float, y: float, direction: str, clicks: int) -> None:
        self._run("mousemove", *self._xy(x, y), "sleep", "0.03", "click", "--repeat", str(clicks), "--delay", "30",
                  str(SCROLL_BUTTONS[direction]))
        time.sleep(0.15)

    def long_press(self, x: float, y: float, seconds: float = 1.0) -> None:
        self._run("mousemove", *self._xy(x, y), "sleep", "0.03", "mousedown", "1", "sleep", str(seconds), "mouseup", "1")


def _lock_profile(profile: str) -> None:
    """Preferences for the kiosk window's throw-away profile that keep pages off this machine's disk: no file
    chooser (an <input type=file> click would open a dialog browsing the home folder), no downloads (a page
    can start one without any click, into ~/Downloads), and a download folder inside the profile regardless."""
    import json

    downloads = os.path.join(profile, "Downloads")
    os.makedirs(os.path.join(profile, "Default"))
    with open(os.path.join(profile, "Local State"), "w") as f:
        json.dump({"select_file_dialogs": {"allowed": False}}, f)
    with open(os.path.join(profile, "Default", "Preferences"), "w") as f:
        json.dump({"download_restrictions": 3,  # 3: block every download
                   "download": {"default_directory": downloads, "prompt_for_download": False},
                   "savefile": {"default_directory": downloads}}, f)


def check_start_url(url: str, timeout: float = 15.0, policy=None, resolver=None) -> None:
    """Fetch an http(s) start URL once before the kiosk window opens: a kiosk Chromium shows its own error page
    for an address that does not load, which would look like a task screen. Any HTTP answer counts as loading
    (the page renders); no answer (refused, unknown host, too slow) is the user's to fix (FlashtuneError).
    With a `policy`, the fetch goes through an egress proxy as the window's traffic will (ChromiumWindow), so
    an address the proxy would refuse is named here too."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    from flashtune.agent.executors.egress import HEADER, EgressProxy

    if urlsplit(url).scheme not in ("http", "https"):
        return
    proxy = None if policy is None else EgressProxy(policy, resolver=resolver)
    route = {} if proxy is None else {"http": proxy.url, "https": proxy.url}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(route))  # as Chromium reaches it
    try:
        opener.open(urllib.request.Request(url, headers={"User-Agent": "flashtune"}), timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        said = exc.headers.get(HEADER) if proxy is not None else None
        if said is None:
            return  # the site's answer: the page shows it
        reason = said.split("; ", 1)[-1]
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if proxy is not None:  # a refused https tunnel: urllib names only the status
            reason = (proxy.failure_for(url) or (None, reason))[1]
    else:
        return
    finally:
        if proxy is not None:
            proxy.close()
    raise FlashtuneError(f"cannot open the start URL {url[:200]}: {reason}; check the address and that the site is "
                         f"up")


class ChromiumWindow:
    """A full-screen (kiosk) Chromium showing `url` on an X display, in a throw-away profile.

    With a `policy` (policy.Policy), all of the window's traffic goes through an egress proxy (egress.py) that
    connects only to addresses the policy's address rules allow, as the browser executor's does: a link the
    model clicks to the metadata service, this machine (unless the start URL is local) or an unlisted private
    network gets the proxy's one-line refusal as its page. `blocked` lists what was refused (a URL, or host:port
    for an https tunnel); `resolver` is the proxy's name lookup (egress.system_resolver by default).
    """

    def __init__(self, display: str, url: str, width: int, height: int, policy=None, resolver=None):
        from flashtune.agent.executors.browser import CHROMIUM_ARGS, find_chromium, sandbox_args, sandbox_status
        from flashtune.agent.executors.egress import EgressProxy

        self.sandbox = sandbox_status()
        self.display = display
        self.blocked: list[str] = []
        self.proxy = None if policy is None else EgressProxy(
            policy, resolver=resolver, on_refused=lambda target, reason: self.blocked.append(target[:200]))
        self.profile = tempfile.mkdtemp(prefix="flashtune-chromium-")
        try:
            _lock_profile(self.profile)
            self.proc = subprocess.Popen(
                [find_chromium(), *CHROMIUM_ARGS, *sandbox_args(self.sandbox),
                 *(self.proxy.chromium_args() if self.proxy else ()), "--kiosk", f"--user-data-dir={self.profile}",
                 "--window-position=0,0", f"--window-size={width},{height}", "--no-default-browser-check", url],
                env=dict(os.environ, DISPLAY=display), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            self._release()
            raise

    def wait_until_drawn(self, timeout: float = 30.0, interval: float = 0.3) -> None:
        """Block until the screen shows more than one colour and two grabs in a row are identical."""
        from PIL import Image

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FlashtuneError(f"Chromium exited with code {self.proc.returncode} on {self.display}")
            png = grab_screen(self.display)
            with Image.open(io.BytesIO(png)) as im:
                drawn = im.convert("RGB").getcolors(maxcolors=1) is None  # None: more than one colour
            if drawn and png == last:
                return
            last = png if drawn else None
            time.sleep(interval)
        raise FlashtuneError(f"the Chromium window on {self.display} did not finish drawing in {timeout:.0f} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._release()

    def _release(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        shutil.rmtree(self.profile, ignore_errors=True)
