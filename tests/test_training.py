"""fit(): config validation, schedules against torch's own schedulers, clipping, accumulation equivalence,
mixed-precision oracles (SPEC §6), length bucketing. Tiny models, fp32 unless the test is about precision."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from flashtune.errors import ConfigError
from flashtune.training import TrainConfig, fit
from flashtune.training.sampler import EpochBatches
from flashtune.training.trainer import lr_multiplier
from tiny import VOCAB, random_ids, tiny_model


def _subset_trainable(model, keys=("q_proj", "v_proj")):
    for name, p in model.named_parameters():
        p.requires_grad = any(k in name for k in keys)
    return model


def _dataset(n=24, max_len=16, seed=0):
    """Variable-length examples; the loss covers all but the first 3 tokens of each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        out.append(ids)
    return out


def _collate(examples):
    width = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ config
def test_config_round_trip_and_errors():
    cfg = TrainConfig(out_dir="x", precision="bf16", lr=1e-3, max_steps=5, schedule="linear")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="precision='fp8'.*'fp32', 'bf16', 'fp16'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ConfigError, match="unknown training field 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_fit_refuses_existing_checkpoint_and_frozen_model(tmp_path):
    model = _subset_trainable(tiny_model("llama"))
    data = _dataset(8)
    fit(model, data, TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=4), _collate, progress=False)
    with pytest.raises(ConfigError, match="resume=True"):
        fit(model, data, TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=4), _collate, progress=False)
    frozen = _subset_trainable(tiny_model("llama"), keys=())
    with pytest.raises(ConfigError, match="no trainable parameters"):
        fit(frozen, data, TrainConfig(out_dir=str(tmp_path / "b"), max_steps=1), _collate, progress=False)
    half = _subset_trainable(tiny_model("llama", dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="precision='bf16'"):
        fit(half, data, TrainConfig(out_dir=str(tmp_path / "c"), max_steps=1), _collate, progress=False)


# --------------------------------------------------------------------------------------------- schedules
def _torch_schedule(kind, warmup, total, min_ratio):
    """The same schedule composed from torch's own schedulers, read off step by step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    parts, milestones = [], []
    if warmup:
        parts.append(torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, total_iters=warmup - 1))
        milestones.append(warmup)
    if kind == "cosine":
        parts.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_ratio))
    elif kind == "linear":
        parts.append(torch.optim.lr_scheduler.LinearLR(opt, 1.0, min_ratio, total_iters=total - warmup))
    else:
        parts.append(torch.optim.lr_scheduler.ConstantLR(opt, 1.0, total_iters=0))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, parts, milestones) if warmup else parts[0]
    values = []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,min_ratio", [(0, 0.0), (4, 0.0), (3, 0.1)])
def test_schedule_matches_torch_schedulers(kind, warmup, min_ratio):
    total = 17
    ours = [lr_multiplier(s, warmup, total, kind, min_ratio) for s in range(total)]
    assert ours == pytest.approx(_torch_schedule(kind, warmup, total, min_ratio), rel=1e-9, abs=1e-12)


def test_fit_logs_the_scheduled_lr(tmp_path):
    model = _subset_trainable(tiny_model("llama"))
    cfg = TrainConfig(out_dir=str(tmp_path), lr=0.01, max_steps=9, warmup_steps=3, schedule="cosine",
                      batch_size=4, log_every=1)
    res = fit(model, _dataset(16), cfg, _collate, progress=False)
    expected = [0.01 * v for v in _torch_schedule("cosine", 3, 9, 0.0)]
    assert [r["lr"] for r in res.history] == pytest.approx(expected, rel=1e-9)
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in on_disk] == [r["loss"] for r in res.history]


# --------------------------------------------------------------------------------------------- clipping
def test_clipping_logs_raw_norm_and_feeds_the_optimizer_clipped_grads(tmp_path):
    model = _subset_trainable(tiny_model("llama"))
    data = _dataset(4)
    batch = _collate(data)
    # Independent oracle: the raw gradient norm of the mean next-token CE on the one batch.
    ref = copy.deepcopy(model).train()
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    loss = loss.detach()
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    seen = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    max_norm = float(raw) / 4
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(hook)
    try:
        res = fit(model, data, TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=4,
                                           max_grad_norm=max_norm), _collate, progress=False)
    finally:
        handle.remove()
    assert res.history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert res.history[0]["grad_norm"] == pytest.approx(float(raw), rel=1e-4)
    assert seen == [pytest.approx(max_norm, rel=1e-4)]


# ------------------------------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("chunk", [0, 5])
def test_accumulation_equals_one_larger_batch(tmp_path, chunk):
    data = _dataset(24, seed=3)
    runs = {}
    for name, bs, k in (("accum", 2, 3), ("big", 6, 1)):
        model = _subset_trainable(tiny_model("llama"))
        cfg = TrainConfig(out_dir=str(tmp_path / name), lr=1e-2, max_steps=3, batch_size=bs, grad_accum=k,
                          log_every=1, ce_chunk_size=chunk)
        runs[name] = (fit(model, data, cfg, _collate, progress=False), _trainable(model))
    (acc_res, acc_w), (big_res, big_w) = runs["accum"], runs["big"]
    assert [r["loss"] for r in acc_res.history] == pytest.approx([r["loss"] for r in big_res.history], rel=1e-5)
    assert [r["grad_norm"] for r in acc_res.history] == pytest.approx([r["grad_norm"] for r in big_res.history],
                                                                      rel=1e-4)
    for n in big_w:
        torch.testing.assert_close(acc_w[n], big_w[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_step_is_close_to_fp32_step(tmp_path):
    data = _dataset(8, seed=5)
    out = {}
    for precision in ("fp32", "bf16"):
        model = _subset_trainable(tiny_model("llama"))
        before = _trainable(model)
        res = fit(model, data, TrainConfig(out_dir=str(tmp_path / precision), precision=precision, lr=1e-3,
                                           max_steps=1, batch_size=8), _collate, progress=False)
        out[precision] = (res.history[0], {n: p - before[n] for n, p in _trainable(model).items()})
    (row32, upd32), (row16, upd16) = out["fp32"], out["bf16"]
    assert row16["loss"] == pytest.approx(row32["loss"], rel=1e-2)
    assert row16["grad_norm"] == pytest.approx(row32["grad_norm"], rel=5e-2)
    # AdamW's first update is lr * g/|g| elementwise: the two runs must move the weights the same way.
    agree = torch.cat([(torch.sign(upd16[n]) == torch.sign(upd32[n])).flatten() for n in upd32]).float().mean()
    assert agree > 0.9
    for n in upd32:
        assert (upd16[n] - upd32[n]).abs().max() <= 2e-3 + 1e-6


def test_bf16_base_keeps_fp32_master_weights_and_optimizer_state(tmp_path):
    model = _subset_trainable(tiny_model("llama", dtype=torch.bfloat16))
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Updates of ~1e-6 on weights of ~0.02 are far below bf16's resolution there (~1e-4): a bf16 copy would
    # not move at all.
    fit(model, _dataset(8), TrainConfig(out_dir=str(tmp_path), precision="bf16", lr=1e-6, max_steps=2,
                                        batch_size=4), _collate, progress=False)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(((p.detach() - before[n]).abs().max() < 1e-5) for n, p in model.named_parameters()
               if p.requires_grad)
    from safetensors.torch import load_file
    opt = load_file(str(tmp_path / "checkpoints" / "step-000002" / "optimizer.safetensors"))
    assert {v.dtype for k, v in opt.items() if not k.endswith("/step")} == {torch.float32}


def test_fp16_scaler_skips_a_step_with_inf_grads_and_halves_the_scale(tmp_path, caplog):
    data = _dataset(8, seed=7)
    calls = {"n": 0}

    def loss_fn(model, batch):
        from flashtune.training.loss import causal_lm_loss_sum, count_targets
        calls["n"] += 1
        loss = causal_lm_loss_sum(model, batch) / count_targets(batch)
        return loss * float("inf") if calls["n"] == 2 else loss

    def run(steps, name, fn):
        model = _subset_trainable(tiny_model("llama"))
        cfg = TrainConfig(out_dir=str(tmp_path / name), precision="fp16", lr=1e-2, max_steps=steps,
                          batch_size=4, log_every=1, schedule="constant")
        return fit(model, data, cfg, _collate, loss_fn=fn, progress=False), _trainable(model)

    with caplog.at_level("WARNING", logger="flashtune.training"):
        res, weights = run(2, "inf", loss_fn)
    ref_res, ref_weights = run(1, "ref", None)
    rows = res.history
    assert [r["skipped"] for r in rows] == [0, 1] and res.skipped_steps == 1
    assert rows[1]["loss_scale"] == rows[0]["loss_scale"] / 2
    assert rows[0]["loss"] == pytest.approx(ref_res.history[0]["loss"], rel=1e-6)
    assert "step 2 skipped" in caplog.text
    for n in ref_weights:   # the skipped step left the weights exactly where step 1 put them
        assert torch.equal(weights[n], ref_weights[n]), n


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_epochs_are_permutations_and_bucketing_groups_lengths():
    lengths = [(i * 37) % 101 for i in range(300)]
    plain = EpochBatches(300, 8, seed=1)
    bucketed = EpochBatches(300, 8, seed=1, length_fn=lengths.__getitem__)
    for sampler in (plain, bucketed):
        for e in (0, 1):
            assert sorted(i for b in sampler.epoch(e) for i in b) == list(range(300))
        assert sampler.epoch(0) != sampler.epoch(1)
    assert EpochBatches(300, 8, seed=1).epoch(0) == plain.epoch(0)

    def spread(sampler):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in sampler.epoch(0))

    assert spread(bucketed) < spread(plain) / 5


# ------------------------------------------------------------------------------------------ speed switches
def _counting(forward, calls, i):
    def wrapped(*args, **kwargs):
        calls[i] += 1
        return forward(*args, **kwargs)
    return wrapped


def test_checkpointing_and_compiled_blocks_change_nothing_but_speed(tmp_path):
    from flashtune.training.speed import compile_blocks
    data = _dataset(8, seed=9)
    out = {}
    for name, fraction, compiled in (("plain", 0.0, False), ("half", 0.5, False), ("all", True, False),
                                     ("compiled", 0.0, True)):
        model = _subset_trainable(tiny_model("llama"))
        if compiled:
            compile_blocks(model, backend="eager")     # dynamo capture without inductor's C++ build
        calls = [0, 0]
        if not compiled:   # count MLP forwards (module hooks do not fire in checkpoint recomputes)
            for i, block in enumerate(model.model.layers):
                block.mlp.forward = _counting(block.mlp.forward, calls, i)
        cfg = TrainConfig(out_dir=str(tmp_path / name), max_steps=2, batch_size=4, log_every=1, lr=1e-2,
                          gradient_checkpointing=fraction)
        res = fit(model, data, cfg, _collate, progress=False)
        out[name] = ([r["loss"] for r in res.history], _trainable(model), calls)
    assert out["compiled"][2] == [0, 0]
    assert out["plain"][2] == [2, 2]                  # one forward per block per step
    assert out["half"][2] == [4, 2]                   # the first block is recomputed in backward
    assert out["all"][2] == [4, 4]
    for name in ("half", "all", "compiled"):
        assert out[name][0] == pytest.approx(out["plain"][0], rel=1e-6)
        for n, w in out["plain"][1].items():
            torch.testing.assert_close(out[name][1][n], w, rtol=1e-6, atol=1e-7)


def test_overwrite_starts_over_and_fit_restores_eval_mode(tmp_path):
    data = _dataset(8)
    model = _subset_trainable(tiny_model("llama"))            # tiny_model returns eval mode
    fit(model, data, TrainConfig(out_dir=str(tmp_path), max_steps=4, batch_size=4, save_every=1), _collate,
        progress=False)
    assert not model.training
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    res = fit(model, data, TrainConfig(out_dir=str(tmp_path), max_steps=2, batch_size=4, save_every=1,
                                       overwrite=True, log_every=1), _collate, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    assert [r["step"] for r in res.history] == [1, 2]


def test_resume_with_decay_and_no_decay_groups_matches_an_uninterrupted_run(tmp_path):
    """Matrices and 1-d norm weights sit in two AdamW groups; the checkpoint must map their state by name."""
    data = _dataset(16, seed=4)
    keys = ("q_proj", "input_layernorm", "v_proj", "norm.weight")
    cfg = dict(max_steps=4, batch_size=4, lr=1e-2, weight_decay=0.1, log_every=1, schedule="constant")
    ref = _subset_trainable(tiny_model("llama"), keys)
    fit(ref, data, TrainConfig(out_dir=str(tmp_path / "ref"), **cfg), _collate, progress=False)
    model = _subset_trainable(tiny_model("llama"), keys)
    fit(model, data, TrainConfig(out_dir=str(tmp_path / "run"), **{**cfg, "max_steps": 2}), _collate,
        progress=False)
    model = _subset_trainable(tiny_model("llama"), keys)      # a fresh process would start from scratch too
    fit(model, data, TrainConfig(out_dir=str(tmp_path / "run"), resume=True, **cfg), _collate, progress=False)
    for (n, a), b in zip(_trainable(ref).items(), _trainable(model).values()):
        assert torch.equal(a, b), n


def test_each_metrics_row_is_made_strict_once(tmp_path, monkeypatch):
    """_finite_row runs once per row: the row in history and the line in metrics.jsonl are the same result."""
    from flashtune.training import trainer

    calls = []
    real = trainer._finite_row
    monkeypatch.setattr(trainer, "_finite_row", lambda row: calls.append(row["step"]) or real(row))
    model = _subset_trainable(tiny_model("llama"))
    res = fit(model, _dataset(8), TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=4, log_every=1,
                                              eval_every=2), _collate,
              eval_fn=lambda m: {"x": float("nan")}, progress=False)
    assert calls == [r["step"] for r in res.history] == [1, 2, 3, 3]      # 3 training rows, the final evaluation
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == res.history and res.history[1]["eval_x"] is None
