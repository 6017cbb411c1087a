"""User-facing errors.

Every error a user can cause (a bad config field, a missing file, an adapter made for another model) is a
`FlashtuneError`. Its message is one line that names the problem and the fix; the CLI prints it without a
traceback and exits with `exit_code`.
"""


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


def check_choice(field: str, value, allowed) -> None:
    """Raise ConfigError naming `field` unless `value` is one of `allowed`."""
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{field}={value!r} is not allowed; choose one of {shown}")


def check_range(field: str, value, low=None, high=None, *, low_open=False, integer=False) -> None:
    """Raise ConfigError naming `field` unless low <= value <= high (low < value when low_open)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{field}={value!r} must be an integer")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{field}={value!r} must be a number")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(f"{field}={value!r} is out of range; it must be {' and '.join(x for x in (lo, hi) if x)}")
