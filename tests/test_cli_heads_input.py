"""Bad input to `generate`, `train-heads` and `export-heads` (audit): one line on stderr naming the option and the
fix, exit 2, no traceback, checked before the model loads, and every file left as it was.

The heads folders are tiny (a 2-layer random Llama's heads, saved once per module); the checks refuse before any
model loads (`load_base_model` is patched to fail the test if called), except the context-length check, which
needs the model and runs on the tiny Llama saved by conftest's `model_dir`."""

from __future__ import annotations

import pytest
from tiny import tiny_model

from flashtune.cli import main


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """{"medusa" | "mtp" | "parallel": folder} of tiny heads, as `train-heads` saves them."""
    from flashtune.decoding import MedusaHeads
    from flashtune.decoding.drafters.mtp import MTPModules
    from flashtune.decoding.drafters.parallel import ParallelHeads

    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("heads")
    MedusaHeads.for_model(model.lm_head.weight, num_heads=2, topk=2).save(root / "medusa")
    MTPModules.build(model, depth=1).save(root / "mtp")
    ParallelHeads.build(model, n_heads=2).save(root / "parallel")
    return {m: root / m for m in ("medusa", "mtp", "parallel")}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads its model: these refusals must come first."""
    import flashtune.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(flashtune.models, "load_base_model", refuse)


def snapshot(root):
    """{relative path: bytes (None for a folder)} of everything under root."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def refused(capsys, argv, *also_ignore: str) -> str:
    """Run the command; it must exit 2 with one stderr line (besides notes) and no traceback. Returns the line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines()
             if ln.strip() and not ln.startswith(("note: ", *also_ignore))]
    assert len(lines) == 1, err
    assert lines[0].startswith("flashtune: error: ")
    return lines[0]


# 1, 2: export-heads --out

def test_export_out_that_is_a_file_or_unwritable(heads, tmp_path, capsys, no_model):
    taken = tmp_path / "existing.txt"
    taken.write_text("keep me")
    line = refused(capsys, ["export-heads", "--heads", heads["medusa"], "--format", "vllm", "--out", taken])
    assert "--out" in line and "is a file" in line
    assert taken.read_text() == "keep me"
    line = refused(capsys, ["export-heads", "--heads", heads["medusa"], "--out", taken / "sub"])
    assert "--out" in line and "cannot write" in line


def test_export_refuses_a_non_empty_out(heads, tmp_path, capsys, no_model):
    before = {m: snapshot(d) for m, d in heads.items()}
    earlier = tmp_path / "served"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"model_type": "medusa"}')
    for argv in (["--heads", heads["mtp"], "--out", earlier],          # over an earlier export
                 ["--heads", heads["medusa"], "--out", heads["medusa"]],  # into the heads folder itself
                 ["--import", earlier, "--out", heads["parallel"]]):      # next to other heads
        line = refused(capsys, ["export-heads", *argv])
        assert "is not empty" in line and "new or empty folder" in line
    assert {m: snapshot(d) for m, d in heads.items()} == before
    assert snapshot(earlier) == {"config.json": b'{"model_type": "medusa"}'}


def test_export_into_an_empty_folder_works_and_a_failed_one_leaves_nothing(heads, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export-heads", "--heads", str(heads["medusa"]), "--out", str(empty)]) == 0
    assert (empty / "config.json").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "medusa_config.json").write_text("{not json")
    out = tmp_path / "new" / "deeper"
    refused(capsys, ["export-heads", "--heads", broken, "--out", out])
    assert not (tmp_path / "new").exists()  # the folders made for the export went with it


# 3: heads folders that already hold heads

def test_train_heads_refuses_an_out_that_holds_heads(heads, capsys, no_model):
    for method, into in (("medusa", "medusa"), ("mtp", "parallel"), ("eagle3", "mtp")):
        before = snapshot(heads[into])
        line = refused(capsys, ["train-heads", "--method", method, "--out", heads[into], "--steps", "1"])
        assert f"already holds {into} heads" in line and "choose another --out" in line
        assert snapshot(heads[into]) == before


def test_export_refuses_heads_of_two_methods(heads, tmp_path, capsys, no_model):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(heads["parallel"], mixed)
    for f in heads["mtp"].iterdir():
        shutil.copy(f, mixed / f.name)
    line = refused(capsys, ["export-heads", "--heads", mixed, "--out", tmp_path / "x"])
    assert "mtp" in line and "parallel" in line and "mtp_config.json" in line and "one method" in line
    assert not (tmp_path / "x").exists()


# 4, 5: paths and arguments checked before the model loads

def test_train_heads_out_that_is_a_file(tmp_path, capsys, no_model):
    taken = tmp_path / "existing.txt"
    taken.write_text("keep me")
    line = refused(capsys, ["train-heads", "--num-prompts", "4", "--steps", "1", "--out", taken])
    assert "--out" in line and "is a file" in line and "/train" not in line
    assert taken.read_text() == "keep me"


def test_checks_come_before_the_model_loads(tmp_path, capsys, no_model):
    line = refused(capsys, ["generate", "--prompt", "hi", "--max-new-tokens", "0"])
    assert "--max-new-tokens" in line
    line = refused(capsys, ["train-heads", "--out", tmp_path / "x", "--data", tmp_path / "missing.jsonl"])
    assert "--data" in line and "does not exist" in line
    line = refused(capsys, ["export-heads", "--heads", tmp_path / "nosuch", "--out", tmp_path / "y"])
    assert "--heads" in line and "does not exist" in line
    line = refused(capsys, ["train-heads", "--out", tmp_path / "z", "--num-prompts", "2"])
    assert "--num-prompts" in line
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


# 6: --max-new-tokens bounded

def test_max_new_tokens_is_bounded(capsys, no_model):
    line = refused(capsys, ["generate", "--prompt", "hi", "--max-new-tokens", "999999999999"])
    assert "--max-new-tokens" in line and "out of range" in line


def test_max_new_tokens_within_the_models_context(model_dir, capsys):
    line = refused(capsys, ["generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "300",
                            "--device", "cpu"], "Loading weights")
    assert "--max-new-tokens 300" in line and "context of 256" in line


# 7, 8: drafting sizes named as options

def test_draft_tokens_is_named(heads, capsys, no_model):
    line = refused(capsys, ["generate", "--prompt", "hi", "--speculative", "mtp", "--heads", heads["mtp"],
                            "--draft-tokens", "0"])
    assert "--draft-tokens 0" in line and "k=" not in line


def test_tree_size_is_bounded(heads, tmp_path, capsys, no_model):
    line = refused(capsys, ["generate", "--prompt", "hi", "--speculative", "medusa", "--heads", heads["medusa"],
                            "--tree", "100000"])
    assert "--tree 100000" in line and "512" in line
    line = refused(capsys, ["train-heads", "--out", tmp_path / "t", "--tree-nodes", "1000000"])
    assert "--tree-nodes" in line and "512" in line
    assert not (tmp_path / "t").exists()


# 9: parallel heads have no serving layout

def test_parallel_heads_export_says_why(heads, tmp_path, capsys, no_model):
    line = refused(capsys, ["export-heads", "--heads", heads["parallel"], "--format", "vllm", "--out", tmp_path / "p"])
    assert "no serving layout" in line and "choose --format" not in line and "--speculative parallel" in line
    assert not (tmp_path / "p").exists()


# 10: options that would be ignored

def test_options_that_do_not_apply(heads, tmp_path, capsys, no_model):
    line = refused(capsys, ["generate", "--prompt", "hi", "--heads", heads["medusa"]])
    assert "--speculative medusa" in line
    line = refused(capsys, ["generate", "--prompt", "hi", "--draft-tokens", "4"])
    assert "--draft-tokens" in line and "mtp" in line
    line = refused(capsys, ["generate", "--prompt", "hi", "--speculative", "medusa", "--heads", heads["medusa"],
                            "--draft-tokens", "4"])
    assert "--draft-tokens" in line and "not medusa" in line
    line = refused(capsys, ["train-heads", "--method", "medusa", "--depth", "3", "--out", tmp_path / "d"])
    assert "--depth does not apply to --method medusa" in line
    line = refused(capsys, ["export-heads", "--import", heads["medusa"], "--format", "sglang", "--out", tmp_path / "i"])
    assert "--format" in line
    assert not any((tmp_path / n).exists() for n in ("d", "i"))


def test_heads_of_another_method(heads, capsys, no_model):
    line = refused(capsys, ["generate", "--prompt", "hi", "--speculative", "medusa", "--heads", heads["mtp"]])
    assert "holds mtp heads, not medusa" in line and "--speculative mtp" in line
