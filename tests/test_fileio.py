import pytest

from flashtune.fileio import atomic_write, atomic_write_bytes


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_bytes(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_bytes(path, "old")

    def half_then_crash(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_json_and_safetensors_round_trip(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from flashtune.fileio import atomic_save_safetensors, atomic_write_json

    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": [2], "b": 1}
    t = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous
    atomic_save_safetensors(tmp_path / "w.safetensors", {"w": t})
    torch.testing.assert_close(load_file(str(tmp_path / "w.safetensors"))["w"], t, rtol=0, atol=0)
