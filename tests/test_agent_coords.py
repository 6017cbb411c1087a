"""smart_resize against transformers' Qwen2-VL image processor, pinned examples, and the model <-> screen
mapping: round trips within a model unit, monotone, always on screen, device scale factors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from flashtune.agent.coords import MAX_PIXELS, MIN_PIXELS, CoordinateMapper, smart_resize
from flashtune.errors import ConfigError


@pytest.mark.parametrize("w,h,ew,eh", [(1920, 1080, 1932, 1092), (1280, 720, 1288, 728), (2560, 1440, 2548, 1428),
                                       (3840, 2160, 3836, 2156)])
def test_documented_examples(w, h, ew, eh):
    assert smart_resize(h, w) == (eh, ew)


def test_round_half_to_even():
    # 1078 / 28 = 38.5: Python (and the server) round to 38 -> 1064; JavaScript's Math.round would give 1092
    assert smart_resize(1078, 1920)[0] == 1064
    assert smart_resize(1106, 1920)[0] == 1120  # 39.5 rounds up to the even 40 -> 1120


# sides >= 15: below that transformers (no max(28, .) step) and qwen_vl_utils (ours) differ
sizes = st.tuples(st.integers(15, 5000), st.integers(15, 5000)).filter(lambda s: max(s) / min(s) <= 200)


@settings(max_examples=300, deadline=None)
@given(sizes, st.sampled_from([(MIN_PIXELS, MAX_PIXELS), (56 * 56, 14 * 14 * 4 * 1280), (3136, 2700 * 784)]))
def test_matches_transformers_processor(size, limits):
    h, w = size
    assert smart_resize(h, w, 28, *limits) == hf_smart_resize(h, w, 28, *limits)


@settings(max_examples=300, deadline=None)
@given(sizes)
def test_properties(size):
    h, w = size
    rh, rw = smart_resize(h, w)
    assert rh % 28 == 0 and rw % 28 == 0
    assert MIN_PIXELS <= rh * rw <= MAX_PIXELS
    # the aspect ratio drifts by at most one 28-px step on each side (relative to the unrounded side)
    drift = abs((rw / rh) / (w / h) - 1)
    assert drift <= (1 + 28 / max(rw - 28, 14)) * (1 + 28 / max(rh - 28, 14)) - 1


def test_extreme_aspect_ratio_raises():
    with pytest.raises(ConfigError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ConfigError):
        smart_resize(0, 10)


def test_v1_readme_example():
    # UI-TARS README_v1: (235, 512) on 1920x1080 -> (451, 553)
    m = CoordinateMapper(1920, 1080, version="1.0")
    x, y = m.to_screen(235, 512)
    assert (round(x), round(y)) == (451, 553)


def test_v15_absolute_in_resized_frame():
    m = CoordinateMapper(1920, 1080, version="1.5")
    assert m.model_size == (1932, 1092)
    x, y = m.to_screen(966, 546)  # centre of the resized image -> centre of the screen
    assert x == pytest.approx(960) and y == pytest.approx(540)
    # <point> under 1.5 is in the same resized frame (as ui_tars and UI-TARS-desktop read it)
    assert m.to_screen(966, 546, dialect="point_tag") == pytest.approx((960.0, 540.0))
    assert CoordinateMapper(1920, 1080, version="doubao").to_screen(500, 500, dialect="point_tag") == (960.0, 540.0)


def test_v15_point_tag_in_model_frame_issue16():
    # issue 16: at 224x224, smart_resize gives a 280x280 frame (min_pixels), so <point>200 250</point> is
    # (160, 200) on the screenshot, not (44.8, 56) as the 0-1000 reading gave.
    from flashtune.agent.parser import parse_response

    a = parse_response("Action: click(point='<point>200 250</point>')").actions[0]
    m = CoordinateMapper(224, 224, version="1.5")
    assert smart_resize(224, 224) == (280, 280) and m.frame("point_tag") == (280, 280)
    assert m.to_screen(*a.start.center, dialect=a.start.dialect) == pytest.approx((160.0, 200.0))
    assert CoordinateMapper(224, 224, version="1.0").to_screen(200, 250, "point_tag") == pytest.approx((44.8, 56.0))


screens = st.tuples(st.integers(200, 4000), st.integers(200, 3000)).filter(lambda s: max(s) / min(s) <= 20)


@settings(max_examples=200, deadline=None)
@given(screens, st.sampled_from(["1.5", "1.0", "doubao"]), st.sampled_from([1.0, 1.25, 2.0]),
       st.floats(0, 1), st.floats(0, 1))
def test_screen_model_screen_round_trip(screen, version, dsf, fx, fy):
    w, h = screen
    m = CoordinateMapper(w, h, version=version, scale_factor=dsf)
    px, py = fx * (w - 1), fy * (h - 1)
    dialect = "point_tag" if version == "doubao" else "paren"
    mx, my = m.from_screen(px, py, dialect)
    bx, by = m.to_screen(mx, my, dialect)
    fw, fh = m.frame(dialect)
    # off by at most half a model unit, and 1 px when the frame is as fine as the screen
    assert abs(bx - px) <= max(0.5 * w / fw, 1.0) + 1e-9
    assert abs(by - py) <= max(0.5 * h / fh, 1.0) + 1e-9
    ix, iy = m.to_input(mx, my, dialect)
    assert ix == pytest.approx(bx / dsf) and iy == pytest.approx(by / dsf)
    assert m.from_input(ix, iy, dialect) == (mx, my)


@settings(max_examples=200, deadline=None)
@given(screens, st.sampled_from(["1.5", "1.0"]), st.integers(-500, 5000), st.integers(-500, 5000),
       st.integers(0, 300))
def test_on_screen_and_monotone(screen, version, x, y, dx):
    w, h = screen
    m = CoordinateMapper(w, h, version=version)
    sx, sy = m.to_screen(x, y)
    assert 0 <= sx <= w - 1 and 0 <= sy <= h - 1  # even for answers off the model's frame
    sx2, _ = m.to_screen(x + dx, y)
    assert sx2 >= sx


def test_bad_mapper_config():
    with pytest.raises(ConfigError, match="model_version"):
        CoordinateMapper(100, 100, version="2")
    with pytest.raises(ConfigError, match="scale_factor"):
        CoordinateMapper(100, 100, scale_factor=0)
    assert math.isclose(CoordinateMapper(800, 600, version="doubao", scale_factor=2).to_input(500, 500, "point_tag")[0],
                        200)
