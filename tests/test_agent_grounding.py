"""The grounding scorer on synthetic ScreenSpot (xywh) and ScreenSpot-Pro (xyxy + img_size) data: box centres
score 100%, a point one pixel outside 0%, edges and corners count as hits, unparseable answers are wrong_format;
and the `flashtune agent ground` command against a scripted fake server."""

from __future__ import annotations

import json

import pytest

from flashtune.agent.fake_server import FakeModelServer
from flashtune.agent.grounding import evaluate, load_samples, point_in_box
from flashtune.cli import main
from flashtune.errors import ConfigError

# (file, image size, bbox as written, format, platform, element type)
RECORDS = [
    ("web.png", (1920, 1080), [100, 200, 300, 40], "xywh", "web", "text"),
    ("ios.png", (1288, 728), [640, 300, 60, 60], "xywh", "ios", "icon"),
    ("pro.png", (2560, 1440), [1000, 700, 1200, 760], "xyxy", "windows", "icon"),
    ("pro2.png", (1288, 728), [10, 20, 300, 90], "xyxy", "macos", "text"),
]


@pytest.fixture
def dataset(tmp_path):
    from PIL import Image

    data = []
    for name, size, bbox, fmt, platform, etype in RECORDS:
        Image.new("RGB", size, (250, 250, 250)).save(tmp_path / name)
        rec = {"img_filename": name, "bbox": bbox, "instruction": f"find {name}"}
        if fmt == "xyxy":
            rec.update(img_size=list(size), platform=platform, ui_type=etype)
        else:
            rec.update(data_source=platform, data_type=etype)
        data.append(rec)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def xyxy(bbox, fmt):
    x, y, a, b = bbox
    return (x, y, x + a, y + b) if fmt == "xywh" else (x, y, a, b)


def model_frame(size, version):
    """The model's frame, computed independently: Qwen2-VL's rule for 1.5, 0-1000 otherwise."""
    if version != "1.5":
        return 1000, 1000
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(size[1], size[0], 28, 100 * 28 * 28, 16384 * 28 * 28)
    return w, h


def answer_at(px, py, size, version="1.5"):
    fw, fh = model_frame(size, version)
    return f"Action: click(start_box='({px * fw / size[0]:.6f},{py * fh / size[1]:.6f})')"


def by_name(point_fn, version="1.5"):
    table = {}
    for name, size, bbox, fmt, _, _ in RECORDS:
        table[name] = answer_at(*point_fn(xyxy(bbox, fmt)), size, version)
    return lambda s: table[s.image.rsplit("/", 1)[-1]]


def test_load_samples_both_box_formats(dataset):
    samples = load_samples(str(dataset))
    assert [s.box for s in samples] == [tuple(map(float, xyxy(b, f))) for _, _, b, f, _, _ in RECORDS]
    assert [(s.platform, s.element_type) for s in samples] == [(r[4], r[5]) for r in RECORDS]
    forced = load_samples(str(dataset), bbox_format="xywh")
    assert forced[2].box == (1000, 700, 2200, 1460)


@pytest.mark.parametrize("version", ["1.5", "1.0"])
def test_centres_score_100(dataset, version):
    result = evaluate(load_samples(str(dataset)),
                      by_name(lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), version), model_version=version)
    assert result["accuracy"] == 1.0 and result["wrong_format"] == 0 and result["n"] == 4
    assert all(row["accuracy"] == 1.0 for row in result["by_platform"].values())
    assert set(result["by_type"]) == {"text", "icon"} and result["by_type"]["icon"]["n"] == 2


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_one_pixel_outside_scores_0(dataset, side):
    def outside(b):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return {"left": (b[0] - 1, cy), "right": (b[2] + 1, cy), "top": (cx, b[1] - 1), "bottom": (cx, b[3] + 1)}[side]

    result = evaluate(load_samples(str(dataset)), by_name(outside))
    assert result["accuracy"] == 0.0 and result["correct"] == 0 and result["wrong_format"] == 0


@pytest.mark.parametrize("corner", [(0, 1), (2, 1), (0, 3), (2, 3)])
def test_edges_and_corners_hit(tmp_path, corner):
    from PIL import Image

    # 1288x728 is its own smart_resize frame, so the corner maps back exactly
    Image.new("RGB", (1288, 728)).save(tmp_path / "s.png")
    box = [100, 200, 400, 300]
    (tmp_path / "d.json").write_text(json.dumps([{"img_filename": "s.png", "bbox": box, "instruction": "x",
                                                 "img_size": [1288, 728]}]))
    px, py = box[corner[0]], box[corner[1]]
    result = evaluate(load_samples(str(tmp_path / "d.json")), lambda s: f"Action: click(start_box='({px},{py})')")
    assert result["accuracy"] == 1.0


def test_point_in_box_inclusive():
    assert point_in_box(1, 1, (1, 1, 2, 2)) and point_in_box(2, 2, (1, 1, 2, 2))
    assert not point_in_box(2.000001, 2, (1, 1, 2, 2)) and not point_in_box(0.999999, 1.5, (1, 1, 2, 2))


def test_wrong_format_and_other_answer_styles(dataset):
    answers = {"web.png": "I cannot find it.", "ios.png": "(500,500)",  # a bare point
               "pro.png": "Action: click(start_box='<bbox>0 0 1 1</bbox>')", "pro2.png": "Action: wait()"}
    result = evaluate(load_samples(str(dataset)), lambda s: answers[s.image.rsplit("/", 1)[-1]])
    assert result["wrong_format"] == 2  # no coordinate at all: the prose and wait()
    rows = {r["image"]: r for r in result["rows"]}
    assert rows["ios.png"]["point"] == pytest.approx((500, 500))  # 1.5: pixels of the 1288x728 frame
    # <bbox> under 1.5 is in the model's resized frame too, like <point> (issue 16; as ui_tars reads it)
    from PIL import Image

    from flashtune.agent.coords import smart_resize

    with Image.open(dataset.parent / "pro.png") as im:
        w, h = im.size
    fh, fw = smart_resize(h, w)
    assert rows["pro.png"]["point"] == pytest.approx((0.5 * w / fw, 0.5 * h / fh))
    doubao = evaluate(load_samples(str(dataset)), lambda s: answers[s.image.rsplit("/", 1)[-1]],
                      model_version="doubao")
    assert {r["image"]: r for r in doubao["rows"]}["pro.png"]["point"] == pytest.approx((0.5 * w / 1000,
                                                                                       0.5 * h / 1000))
    assert result["correct"] == 0


def test_bad_data_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"bbox": [1, 2, 3, 4]}]))
    with pytest.raises(ConfigError, match="img_filename"):
        load_samples(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps([{"img_filename": "x", "bbox": [1, 2], "instruction": "i"}]))
    with pytest.raises(ConfigError, match="4 numbers"):
        load_samples(str(tmp_path / "b.json"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_samples(str(tmp_path / "missing.json"))


def test_ground_command_end_to_end(dataset, tmp_path, capsys):
    script = []
    for i, (name, size, bbox, fmt, _, _) in enumerate(RECORDS):
        b = xyxy(bbox, fmt)
        hit = i % 2 == 0
        script.append(answer_at((b[0] + b[2]) / 2, (b[1] + b[3]) / 2 if hit else b[3] + 5, size))
    out = tmp_path / "result.json"
    with FakeModelServer(script) as fake:
        code = main(["agent", "ground", "--data", str(dataset), "--endpoint", fake.url, "--out", str(out)])
        req = fake.requests[0]
    assert code == 0
    assert "accuracy 0.5000 (2/4)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["by_platform"]["web"]["accuracy"] == 1.0 and result["by_platform"]["ios"]["accuracy"] == 0.0
    parts = req["messages"][0]["content"]
    assert "find web.png" in parts[0]["text"] and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_ground_command_uses_the_servers_pixel_limits(dataset, tmp_path, capsys):
    """Answers written in the frame of a server with max_pixels = 1000*28*28 score only with that flag."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    small = 1000 * 28 * 28
    script = []
    for name, size, bbox, fmt, _, _ in RECORDS:
        b = xyxy(bbox, fmt)
        h, w = smart_resize(size[1], size[0], 28, 100 * 28 * 28, small)
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        script.append(f"Action: click(start_box='({cx * w / size[0]:.4f},{cy * h / size[1]:.4f})')")
    with FakeModelServer(script * 2) as fake:
        main(["agent", "ground", "--data", str(dataset), "--endpoint", fake.url, "--max-pixels", str(small)])
        assert "accuracy 1.0000 (4/4)" in capsys.readouterr().out
        main(["agent", "ground", "--data", str(dataset), "--endpoint", fake.url])
        assert "accuracy 1.0000" not in capsys.readouterr().out
