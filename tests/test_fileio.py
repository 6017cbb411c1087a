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


def test_new_files_follow_the_umask_and_existing_files_keep_their_mode(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new.txt", "x")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
        (tmp_path / "new.txt").chmod(0o604)
        atomic_write_bytes(tmp_path / "new.txt", "y")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o604
        os.umask(0o002)
        atomic_write_bytes(tmp_path / "other.txt", "z")
        assert stat.S_IMODE((tmp_path / "other.txt").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_checkpoint_folders_and_files_follow_the_umask(tmp_path):
    import os
    import stat

    import torch

    from flashtune.training import checkpoint as ckpt

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    old = os.umask(0o022)
    try:
        final = ckpt.save_checkpoint(tmp_path, 1, [("w", p)], opt, sched, torch.amp.GradScaler("cpu", enabled=False),
                                     {"position": [0, 0], "log_acc": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    for f in [*final.iterdir(), tmp_path / "latest.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
