"""Paste text on an X display through the CLIPBOARD selection (ICCCM), with libX11 through ctypes.

UI-TARS' reference executor types by pasting (pyperclip, then ctrl+v, UI-TARS arXiv 2501.12326): a newline
inside the content then becomes a line in a text area and a space in a one-line field, and never an Enter
that submits a form early. xdotool can only press keys, so flashtune serves the text itself: a 1x1 window
owns CLIPBOARD while the paste chord is pressed, and answers the requests (TARGETS, UTF8_STRING, STRING).
"""

from __future__ import annotations

import ctypes
import threading
import time

from flashtune.errors import FlashtuneError

_SELECTION_REQUEST, _SELECTION_NOTIFY = 30, 31
_XA_ATOM, _XA_STRING = 4, 31


class _XSelectionRequestEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("owner", ctypes.c_ulong), ("requestor", ctypes.c_ulong),
                ("selection", ctypes.c_ulong), ("target", ctypes.c_ulong), ("property", ctypes.c_ulong),
                ("time", ctypes.c_ulong)]


class _XSelectionEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("requestor", ctypes.c_ulong), ("selection", ctypes.c_ulong),
                ("target", ctypes.c_ulong), ("property", ctypes.c_ulong), ("time", ctypes.c_ulong)]


class _XEvent(ctypes.Union):
    _fields_ = [("type", ctypes.c_int), ("request", _XSelectionRequestEvent), ("pad", ctypes.c_long * 24)]


def _lib(lib):
    lib.XCreateSimpleWindow.restype = ctypes.c_ulong
    lib.XCreateSimpleWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                                        ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong, ctypes.c_ulong]
    lib.XInternAtom.restype = ctypes.c_ulong
    lib.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.XSetSelectionOwner.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    lib.XGetSelectionOwner.restype = ctypes.c_ulong
    lib.XGetSelectionOwner.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
    lib.XPending.argtypes = [ctypes.c_void_p]
    lib.XNextEvent.argtypes = [ctypes.c_void_p, ctypes.POINTER(_XEvent)]
    lib.XChangeProperty.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                               ctypes.POINTER(_XSelectionEvent)]
    lib.XFlush.argtypes = [ctypes.c_void_p]
    lib.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.XDestroyWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
    return lib


class ClipboardServer:
    """Owns CLIPBOARD on `display` with `text` until `close()`; `served` counts answered data requests."""

    def __init__(self, lib, display: str, text: str, timeout: float = 5.0):
        self.lib, self.data = _lib(lib), text.encode("utf-8")
        self.served = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._serve, args=(display,), daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            self.close()
            raise FlashtuneError(f"cannot own the X clipboard on {display!r}: {self._error or 'no answer'}")

    def _serve(self, display: str) -> None:
        lib = self.lib
        dpy = lib.XOpenDisplay(display.encode())
        if not dpy:
            self._error = "cannot open the display"
            self._ready.set()
            return
        try:
            root = lib.XDefaultRootWindow(dpy)
            win = lib.XCreateSimpleWindow(dpy, root, 0, 0, 1, 1, 0, 0, 0)
            atom = {name: lib.XInternAtom(dpy, name.encode(), 0) for name in ("CLIPBOARD", "UTF8_STRING",
                                                                                "TARGETS", "TEXT")}
            lib.XSetSelectionOwner(dpy, atom["CLIPBOARD"], win, 0)
            lib.XFlush(dpy)
            if lib.XGetSelectionOwner(dpy, atom["CLIPBOARD"]) != win:
                self._error = "another client kept the selection"
                self._ready.set()
                return
            self._ready.set()
            event = _XEvent()
            while not self._stop.is_set():
                if not lib.XPending(dpy):
                    time.sleep(0.005)
                    continue
                lib.XNextEvent(dpy, ctypes.byref(event))
                if event.type == _SELECTION_REQUEST:
                    self._answer(dpy, event.request, atom)
            # Give the selection up before the window goes: requests already on their way still get an
            # answer (a refusal), so no client is left waiting for one (Chromium would stall on it).
            lib.XSetSelectionOwner(dpy, atom["CLIPBOARD"], 0, 0)
            lib.XSync(dpy, 0)
            self.data = b""
            while lib.XPending(dpy):
                lib.XNextEvent(dpy, ctypes.byref(event))
                if event.type == _SELECTION_REQUEST:
                    self._answer(dpy, event.request, atom, refuse=True)
            lib.XDestroyWindow(dpy, win)
            lib.XSync(dpy, 0)
        finally:
            lib.XCloseDisplay(dpy)

    def _answer(self, dpy, req: _XSelectionRequestEvent, atom: dict, refuse: bool = False) -> None:
        lib = self.lib
        prop = req.property or req.target  # an obsolete client may pass None
        if refuse:
            prop = 0
        elif req.target == atom["TARGETS"]:
            targets = (ctypes.c_ulong * 4)(atom["TARGETS"], atom["UTF8_STRING"], _XA_STRING, atom["TEXT"])
            lib.XChangeProperty(dpy, req.requestor, prop, _XA_ATOM, 32, 0, targets, 4)
        elif req.target in (atom["UTF8_STRING"], _XA_STRING, atom["TEXT"]):
            buf = ctypes.create_string_buffer(self.data, len(self.data))
            kind = _XA_STRING if req.target == _XA_STRING else atom["UTF8_STRING"]
            lib.XChangeProperty(dpy, req.requestor, prop, kind, 8, 0, buf, len(self.data))
            self.served += 1
        else:
            prop = 0  # refuse targets we do not have
        reply = _XSelectionEvent(type=_SELECTION_NOTIFY, serial=0, send_event=1, display=dpy,
                                 requestor=req.requestor, selection=req.selection, target=req.target,
                                 property=prop, time=req.time)
        lib.XSendEvent(dpy, req.requestor, 0, 0, ctypes.byref(reply))
        lib.XFlush(dpy)

    def wait_served(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.served:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
