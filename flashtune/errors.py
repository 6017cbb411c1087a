"""User-facing errors.

Every error a user can cause (a bad config field, a missing file, an adapter made for another model) is a
`FlashtuneError`. Its message is one line that names the problem and the fix; the CLI prints it without a
traceback and exits with `exit_code`.
"""

import math
import os


class FlashtuneError(Exception):
    """An error caused by the user's input, with a one-line message that says how to fix it."""

    exit_code = 2


class ConfigError(FlashtuneError, ValueError):
    """A configuration field has a value outside what it allows."""


class MissingDependencyError(FlashtuneError, ImportError):
    """An optional package is not installed; the message gives the install command."""

    exit_code = 3


class AdapterLoadError(FlashtuneError):
    """An adapter file is missing, corrupt, or was made for another base model."""


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for error lines (a 5000-digit int has no repr at all)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<an integer of about {value.bit_length() * 30103 // 100000} digits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_choice(field: str, value, allowed) -> None:
    """Raise ConfigError naming `field` unless `value` is one of `allowed`."""
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{field}={value!r} is not allowed; choose one of {shown}")


def check_range(field: str, value, low=None, high=None, *, low_open=False, high_open=False,
                integer=False) -> None:
    """Raise ConfigError naming `field` unless `value` is a finite number with low <= value <= high
    (low < value when low_open, value < high when high_open); `integer` also requires an int.

    This is the one check every config's numeric fields go through (TrainConfig, the tuner configs, the
    recipes' sections), so NaN, inf, booleans and strings are refused where a value enters.
    """
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{field}={shown(value)} must be an integer")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{field}={shown(value)} must be a number")
    try:
        finite = integer or math.isfinite(value)
    except OverflowError:                     # an int too large for a float
        finite = False
    if not finite:
        raise ConfigError(f"{field}={shown(value)} must be a finite number")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        bounds = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{field}={shown(value)} is out of range; it must be {bounds}")


def check_bool(field: str, value) -> None:
    """Raise ConfigError naming `field` unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be true or false")


def check_path(field: str, value) -> str:
    """A non-empty path string (str or os.PathLike) without NUL bytes, as str; ConfigError naming `field`."""
    if not isinstance(value, (str, os.PathLike)) or not str(value) or "\x00" in str(value):
        raise ConfigError(f"{field}={value!r} must be a path (a non-empty string)")
    return str(value)
