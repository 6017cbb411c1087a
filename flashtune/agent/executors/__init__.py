"""Executors that perform parsed UI-TARS actions: headless Chromium (Playwright), X11 (xdotool), pyautogui code."""

from flashtune.agent.executors.base import (ActionError, UnsupportedActionError, check_supported, normalize_key,
                                            perform)
from flashtune.agent.executors.browser import BrowserExecutor
from flashtune.agent.executors.pyautogui_code import to_pyautogui
from flashtune.agent.executors.x11 import VirtualDisplay, X11Executor

__all__ = ["BrowserExecutor", "X11Executor", "VirtualDisplay", "to_pyautogui", "perform", "normalize_key",
           "ActionError", "UnsupportedActionError", "check_supported"]
