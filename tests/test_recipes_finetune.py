"""The finetune recipe: reproducible runs, device defaults, method changes, resume checks (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from flashtune.errors import ConfigError
from flashtune.recipes.finetune import (FinetuneConfig, check_run_folder, config_differences, load_config,
                                        resolve_runtime, run_finetune)
from test_data import char_tokenizer
from tiny import tiny_model

# Timing columns differ from run to run by nature; everything else in metrics.jsonl must not.
TIMING = {"tokens_per_s", "step_time_s"}


def _small(out, **train):
    return load_config(None, [
        (["out_dir"], str(out)), (["data", "num_examples"], 24), (["data", "val_size"], 4),
        (["eval", "max_new_tokens"], 6), (["method", "lora_dropout"], 0.1), (["method", "r"], 4),
        (["train"], {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "log_every": 1, "eval_every": 2, **train})])


def _run(out, rng=0, **train):
    model, tok = tiny_model("llama", seed=0), char_tokenizer()
    torch.manual_seed(rng)            # the global RNG as another process would find it: the run must not care
    return run_finetune(_small(out, **train), log=lambda *a: None, progress=False, model=model, tokenizer=tok,
                        device="cpu")


def _rows(path):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def test_same_config_and_seed_give_bit_identical_adapter_metrics_and_samples(tmp_path):
    from safetensors.torch import load_file

    a, b = _run(tmp_path / "a", rng=1), _run(tmp_path / "b", rng=2)
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert any("lora_B" in k and wa[k].abs().sum() > 0 for k in wa)          # it trained
    assert _rows(tmp_path / "a" / "metrics.jsonl") == _rows(tmp_path / "b" / "metrics.jsonl")
    sa = (tmp_path / "a" / "report" / "samples.jsonl").read_bytes()
    assert sa == (tmp_path / "b" / "report" / "samples.jsonl").read_bytes()
    keep = ("eval_loss", "bleu", "rouge_l", "nist", "steps")
    assert {k: a["metrics"][k] for k in keep} == {k: b["metrics"][k] for k in keep}
    # The seed matters: another seed gives another adapter (the test could fail).
    _run(tmp_path / "c", seed=1)
    wc = load_file(tmp_path / "c" / "adapter" / "adapter_model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_gpu_defaults_fast_path_and_bf16_unless_the_config_says_otherwise():
    cfg = FinetuneConfig()
    gpu = resolve_runtime(cfg, "cuda")
    assert gpu.train == {"precision": "bf16", "fused_lora": True, "ce_chunk_size": 4096, "compile": False}
    assert gpu.model.dtype == "bfloat16"
    cpu = resolve_runtime(cfg, "cpu")
    assert cpu.train == {} and cpu.model.dtype == "float32"
    assert cpu.train_config().precision == "fp32"
    plain = resolve_runtime(cfg, "cuda", fast=False)
    assert plain.train == {"precision": "bf16", "fused_lora": False, "ce_chunk_size": 0, "compile": False}
    mine = load_config(None, ["train.precision=fp16", "train.compile=false", "model.dtype=float32"])
    got = resolve_runtime(mine, "cuda")
    assert (got.train["precision"], got.train["compile"], got.model.dtype) == ("fp16", False, "float32")
    assert cfg.train == {} and cfg.model.dtype == "auto"                   # the input is not changed


def test_resolve_device_refuses_unknown_and_absent_devices():
    from flashtune.models import resolve_device

    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad, words in (("tpu", "not a device"), ("cuda:99", "cuda"), ("meta", "not supported")):
        with pytest.raises(ConfigError, match=words) as exc:
            resolve_device(bad)
        assert "\n" not in str(exc.value) and "cpu" in str(exc.value)


def test_changing_the_method_drops_the_other_tuners_fields():
    from pathlib import Path

    import flashtune

    path = Path(flashtune.__file__).parent / "configs" / "e2e_lora.toml"
    cfg = load_config(path, [(["method", "name"], "houlsby"), "method.bottleneck_size=8"])
    assert cfg.method == {"name": "houlsby", "bottleneck_size": 8}
    assert cfg.tuner_config().adapter_type == "houlsby"
    same = load_config(path, [(["method", "name"], "lora")])                 # same tuner: fields kept
    assert same.method["r"] == 16
    with pytest.raises(ConfigError, match="'method.r' for method 'houlsby'"):   # set explicitly: a clear error
        load_config(path, ["method.r=4", (["method", "name"], "houlsby")])


def test_resume_compares_hyper_parameters_with_the_run(tmp_path):
    old = _small(tmp_path)
    (tmp_path / "finetune.json").write_text(json.dumps(old.to_dict()))
    assert check_run_folder(old, resume=True) == "resume"
    longer = _small(tmp_path, max_steps=9, log_every=3)                     # how long / how often: allowed
    assert config_differences(old, longer) == []
    changed = _small(tmp_path, lr=0.5, batch_size=8)
    diffs = config_differences(old, changed)
    assert diffs == ["train.batch_size=4 in the run, now 8", "train.lr=0.01 in the run, now 0.5"]
    with pytest.raises(ConfigError, match="train.batch_size=4 in the run, now 8; train.lr=0.01"):
        check_run_folder(changed, resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_folder(old)
    assert check_run_folder(old, overwrite=True) == "overwrite"
    assert check_run_folder(_small(tmp_path / "new")) == "fresh"


def test_resume_refuses_exactly_the_training_fields_the_trainer_refuses(tmp_path):
    # One rule: a [train] field the recipe lets through must not be refused later by fit, and the reverse.
    from flashtune.training.trainer import RESUME_MUST_MATCH

    old = _small(tmp_path)
    changed = {"lr": 0.5, "weight_decay": 0.1, "batch_size": 8, "grad_accum": 2, "max_grad_norm": 0.5,
               "warmup_steps": 1, "schedule": "linear", "min_lr_ratio": 0.1, "seed": 1, "drop_last": True,
               "precision": "bf16", "max_steps": 9, "epochs": 2.0, "eval_every": 1, "save_every": 1,
               "log_every": 2, "keep_checkpoints": 3, "resume": True, "overwrite": True, "ce_chunk_size": 0,
               "gradient_checkpointing": 1.0, "compile": True, "fused_lora": False, "fused_norm_mlp": True,
               "strategy": "ddp", "cpu_offload": True}
    assert set(changed) == set(old.train_config().to_dict()) - {"out_dir"}        # every field is tried
    refused = {k for k, v in changed.items() if config_differences(old, _small(tmp_path, **{k: v}))}
    assert refused == set(RESUME_MUST_MATCH)


@pytest.mark.gpu
def test_on_a_gpu_finetune_defaults_to_cuda_bf16_and_the_fast_path(tmp_path):
    import math

    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    cfg = load_config(None, ["model.name=" + str(model_dir)], base=_small(tmp_path / "gpu").to_dict())
    res = run_finetune(cfg, log=lambda *a: None, progress=False)                           # no device given
    saved = json.loads((tmp_path / "gpu" / "finetune.json").read_text())
    assert saved["train"]["precision"] == "bf16" and saved["train"]["compile"] is False
    assert saved["model"]["dtype"] == "bfloat16"
    assert next(res["model"].parameters()).device.type == "cuda"
    assert {p.dtype for p in res["model"].parameters() if not p.requires_grad} == {torch.bfloat16}
    assert math.isfinite(res["metrics"]["eval_loss"])
    weights = load_file(tmp_path / "gpu" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
