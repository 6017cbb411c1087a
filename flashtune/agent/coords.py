"""Coordinate systems of UI-TARS models (arXiv 2501.12326) and Qwen2-VL's `smart_resize`.

Three frames are involved:
- model space: what the model writes. v1 (Qwen2-VL base) and Doubao use relative integers 0-1000; UI-TARS-1.5
  (Qwen2.5-VL base) uses absolute pixels of the image *after* `smart_resize`, in every dialect (`<point>` too).
- screenshot space: pixels of the screenshot we took (device pixels; a Retina page at scale 2 gives a
  screenshot twice the CSS size).
- input space: what the executor's mouse takes. Playwright works in CSS pixels (screenshot / device scale
  factor); X11 works in screenshot pixels (scale 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flashtune.errors import ConfigError, check_choice, check_range

FACTOR = 28
MIN_PIXELS = 100 * 28 * 28  # 78,400: UI-TARS' processor setting
MAX_PIXELS = 16384 * 28 * 28  # 12,845,056
MAX_RATIO = 200

VERSIONS = ("1.5", "1.0", "doubao")


def check_pixels(min_pixels, max_pixels, names: tuple[str, str] = ("min_pixels", "max_pixels")) -> None:
    """The one rule for a processor's pixel budget: whole numbers, 1 <= min_pixels <= max_pixels. `names`: how
    the caller calls them (the CLI passes its options). ConfigError otherwise."""
    check_range(names[0], min_pixels, 1, integer=True)
    check_range(names[1], max_pixels, 1, integer=True)
    if min_pixels > max_pixels:
        raise ConfigError(f"{names[0]}={min_pixels} is larger than {names[1]}={max_pixels}; give the server "
                          f"processor's values (defaults {MIN_PIXELS} and {MAX_PIXELS})")


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size (height, width) Qwen2-VL's image processor resizes an image to: both sides multiples of
    `factor`, the area within [min_pixels, max_pixels], the aspect ratio nearly kept. Python's round() rounds
    halves to even, as the server's processor does (h=1078 -> 1064, where JavaScript's Math.round gives 1092).
    """
    if height <= 0 or width <= 0:
        raise ConfigError(f"image size {width}x{height} must be positive")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ConfigError(
            f"image {width}x{height} has an aspect ratio over {MAX_RATIO}; crop or pad it before sending")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class CoordinateMapper:
    """Maps model coordinates to screenshot pixels and back, for one screenshot size and model version.

    width, height: the screenshot in pixels (device pixels). scale_factor: device pixels per input unit
    (Playwright's deviceScaleFactor; 1 on X11). min_pixels/max_pixels must equal the serving processor's.
    """

    width: int
    height: int
    version: str = "1.5"
    scale_factor: float = 1.0
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        check_choice("model_version", self.version, VERSIONS)
        check_range("width", self.width, 1, integer=True)
        check_range("height", self.height, 1, integer=True)
        check_range("scale_factor", self.scale_factor, 0, low_open=True)
        check_pixels(self.min_pixels, self.max_pixels)

    @property
    def model_size(self) -> tuple[int, int]:
        """(width, height) of the model's frame for `paren`-style coordinates."""
        if self.version == "1.5":
            h, w = smart_resize(self.height, self.width, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            return w, h
        return 1000, 1000

    def frame(self, dialect: str) -> tuple[float, float]:
        """(width, height) of the frame a coordinate of `dialect` is written in. The dialect does not change
        the frame: UI-TARS-1.5 writes `<point>` in its own resized-image frame too (the official 1.5 templates
        use `<point>`; `ui_tars` and UI-TARS-desktop read it so), v1 and Doubao write 0-1000."""
        # `dialect` unused on purpose: the frame is the version's in every dialect (test_agent_reference pins it)
        return self.model_size

    def clamp(self, x: float, y: float) -> tuple[float, float]:
        """Keep a screenshot point on the screen: [0, width-1] x [0, height-1]."""
        return min(max(x, 0.0), self.width - 1.0), min(max(y, 0.0), self.height - 1.0)

    def to_screen(self, x: float, y: float, dialect: str = "paren") -> tuple[float, float]:
        """Model (x, y) -> screenshot pixels (floats, clamped on screen)."""
        fw, fh = self.frame(dialect)
        return self.clamp(x * self.width / fw, y * self.height / fh)

    def to_input(self, x: float, y: float, dialect: str = "paren") -> tuple[float, float]:
        """Model (x, y) -> the executor's input units (screenshot pixels / scale_factor)."""
        sx, sy = self.to_screen(x, y, dialect)
        return sx / self.scale_factor, sy / self.scale_factor

    def from_screen(self, x: float, y: float, dialect: str = "paren") -> tuple[int, int]:
        """Screenshot pixels -> the integers the model would write."""
        fw, fh = self.frame(dialect)
        return round(x / self.width * fw), round(y / self.height * fh)

    def from_input(self, x: float, y: float, dialect: str = "paren") -> tuple[int, int]:
        return self.from_screen(x * self.scale_factor, y * self.scale_factor, dialect)

    def coord_center_to_input(self, coord) -> tuple[float, float]:
        """The centre of an `actions.Coord` in input units."""
        return self.to_input(*coord.center, dialect=coord.dialect)
