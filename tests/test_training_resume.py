"""Exact resume: a run killed with SIGKILL part-way and resumed ends bitwise-equal to a run never interrupted
(trainable weights, optimizer moments, loss log); SIGTERM finishes the step, saves and exits with 143.

The training runs are subprocesses executing this file (`python tests/test_training_resume.py OUT [KILL]`):
a tiny Llama with LoRA (dropout on, so the restored RNG state matters) on variable-length padded batches,
2 micro-batches per step, checkpoints every 3 steps. The child kills itself from inside the collate function
at a chosen micro-batch, which puts the kill at a known point after a checkpoint and mid-step. The SIGTERM
run is the same function called in this process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import snapshot

HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 12, 3


def _child(out_dir: str, kill_at: int, signum: int) -> int:
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from flashtune.training import TrainConfig, TrainingInterrupted, fit
    from flashtune.tuners import LoraConfig, attach
    from test_training import _collate, _dataset
    from tiny import tiny_model

    model = tiny_model("llama")
    torch.manual_seed(1)
    attach(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                             init_lora_weights=False))
    calls = {"n": 0}

    def collate(examples):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signum)
        return _collate(examples)

    cfg = TrainConfig(out_dir=out_dir, lr=5e-3, max_steps=STEPS, batch_size=3, grad_accum=2, warmup_steps=2,
                      save_every=SAVE_EVERY if signum == signal.SIGKILL else 0, log_every=1, seed=11,
                      resume=True, eval_every=4)
    data = _dataset(20, seed=2)
    try:
        fit(model, data, cfg, collate, eval_fn=lambda m: {"rand": float(torch.rand(()))}, progress=False)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    return 0


def _spawn(out_dir, kill_at=0, signum=signal.SIGKILL):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(out_dir), str(kill_at),
                             str(int(signum))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _log(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rows]


def _final(out_dir, name):
    return load_file(str(Path(out_dir) / "checkpoints" / f"step-{STEPS:06d}" / name))


def _assert_same_run(a, b):
    assert _log(a) == _log(b)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        wa, wb = _final(a, name), _final(b, name)
        assert wa.keys() == wb.keys() and len(wa) > 0
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference and the two interrupted runs, started together (2 cores)."""
    root = tmp_path_factory.mktemp("resume")
    # Micro-batch 17 is the first of step 9: steps 7 and 8 are logged but the last checkpoint is step 6.
    # Micro-batch 10 is the second of step 5: the step completes, is saved, and the process exits 128+15.
    procs = {"ref": _spawn(root / "ref"), "killed": _spawn(root / "killed", kill_at=17)}
    results = {name: _finish(p) for name, p in procs.items()}
    assert results["ref"][0] == 0, results["ref"][1]
    return root, results


def test_sigkill_then_resume_is_bitwise_identical(runs):
    root, results = runs
    ref, killed = root / "ref", root / "killed"
    assert results["killed"][0] == -signal.SIGKILL
    assert json.loads((killed / "latest.json").read_text())["step"] == 6
    assert max(r["step"] for r in _log(killed)) == 8          # rows past the checkpoint, to be redone
    assert _log(killed) != _log(ref)
    rc, err = _finish(_spawn(killed))
    assert rc == 0, err
    _assert_same_run(ref, killed)
    assert any("eval_rand" in r for r in _log(ref))
    # The uninterrupted run's checkpoints were replaced atomically: only the newest two remain, no temp dirs.
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["step-000009", "step-000012"]


def test_sigterm_saves_a_checkpoint_and_resume_continues(runs, capsys):
    """In this process (fit's handler lives in the main thread), single-threaded like the reference run."""
    root, _ = runs
    ref, termed = root / "ref", root / "termed"
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:
        assert _child(str(termed), 10, signal.SIGTERM) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM after step 5" in capsys.readouterr().err
        assert json.loads((termed / "latest.json").read_text())["step"] == 5
        assert max(r["step"] for r in _log(termed)) == 5
        assert _child(str(termed), 0, signal.SIGTERM) == 0
    finally:
        torch.set_num_threads(threads)
    assert signal.getsignal(signal.SIGTERM) == handler          # fit put the previous handler back
    _assert_same_run(ref, termed)



# ------------------------------------------------------------------------- issue 13: hostile input, old work
def _strict_rows(out_dir):
    """metrics.jsonl parsed as strict JSON: NaN / Infinity tokens are an error."""
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token} in metrics.jsonl")
    text = (Path(out_dir) / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _small_fit(out_dir, *, loss_fn=None, model=None, **overrides):
    from flashtune.training import TrainConfig, fit
    from test_training import _collate, _dataset, _subset_trainable
    from tiny import tiny_model

    model = model or _subset_trainable(tiny_model("llama"))
    cfg = dict(out_dir=str(out_dir), max_steps=4, batch_size=4, lr=1e-2, log_every=1, save_every=1,
               schedule="constant")
    return fit(model, _dataset(8, seed=3), TrainConfig(**{**cfg, **overrides}), _collate, loss_fn=loss_fn,
               progress=False), model


def _inf_from(call):
    from flashtune.training.loss import causal_lm_loss_sum, count_targets
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = causal_lm_loss_sum(model, batch) / count_targets(batch)
        return loss * float("inf") if calls["n"] >= call else loss
    return loss_fn


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from flashtune.training.trainer import NonFiniteTraining
    from test_training import _subset_trainable
    from tiny import tiny_model

    model = _subset_trainable(tiny_model("llama"))
    with pytest.raises(NonFiniteTraining) as exc:
        _small_fit(tmp_path, loss_fn=_inf_from(3), model=model)
    msg = str(exc.value)
    assert "\n" not in msg and "step 3" in msg and "step-000002" in msg
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    saved = load_file(str(tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert [r["step"] for r in _strict_rows(tmp_path)] == [1, 2]


def test_non_finite_step_is_caught_one_step_later_at_most(tmp_path):
    """Without per-step logging or saving the flag is read during the next step: still named exactly."""
    from flashtune.training.trainer import NonFiniteTraining

    with pytest.raises(NonFiniteTraining) as exc:
        _small_fit(tmp_path, loss_fn=_inf_from(3), max_steps=8, log_every=100, save_every=0)
    assert "step 3:" in str(exc.value) and "no checkpoint was saved" in str(exc.value)
    assert not (tmp_path / "checkpoints").exists() and _strict_rows(tmp_path) == []


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_non_finite_gradient_of_a_finite_loss_stops_training_with_or_without_clipping(tmp_path, max_grad_norm):
    """The gradient norm is what finds a NaN gradient under a finite loss: it is computed on every step
    (fp32/bf16) even when clipping is off (max_grad_norm=0), where nothing else reads it."""
    from flashtune.training.loss import causal_lm_loss_sum, count_targets
    from flashtune.training.trainer import NonFiniteTraining

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = causal_lm_loss_sum(model, batch) / count_targets(batch)
        if calls["n"] >= 3:          # forward: + 0; backward: 0 * d sqrt(-1) = NaN into a trainable weight
            w = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + torch.where(torch.tensor(False), torch.sqrt(w.sum() * 0 - 1), torch.zeros(()))
        return loss

    with pytest.raises(NonFiniteTraining) as exc:
        _small_fit(tmp_path, loss_fn=loss_fn, max_grad_norm=max_grad_norm)
    assert "step 3: the gradient norm is nan" in str(exc.value) and "step-000002" in str(exc.value)
    assert [r["step"] for r in _strict_rows(tmp_path)] == [1, 2]


def test_huge_learning_rate_never_reaches_a_checkpoint_or_the_log(tmp_path):
    from flashtune.training.trainer import NonFiniteTraining

    from flashtune.tuners import LoraConfig, attach
    from tiny import tiny_model

    model = attach(tiny_model("llama"), LoraConfig(r=2, lora_alpha=1e30, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(NonFiniteTraining, match="lower train.lr"):
        _small_fit(tmp_path, model=model, max_steps=6)
    for d in (tmp_path / "checkpoints").glob("step-*"):
        for t in load_file(str(d / "trainable.safetensors")).values():
            assert torch.isfinite(t).all(), d
    _strict_rows(tmp_path)


def test_fp16_tolerates_scaler_skips_but_not_a_loss_that_stays_infinite(tmp_path):
    from flashtune.training.trainer import MAX_FP16_SKIPS_IN_A_ROW, NonFiniteTraining

    with pytest.raises(NonFiniteTraining) as exc:
        _small_fit(tmp_path, loss_fn=_inf_from(2), precision="fp16", max_steps=60, save_every=0)
    bad_step = 2 + MAX_FP16_SKIPS_IN_A_ROW
    assert f"step {bad_step}:" in str(exc.value) and "no checkpoint was saved" in str(exc.value)
    rows = _strict_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, bad_step))
    assert sum(r["skipped"] for r in rows) == bad_step - 2      # every step after the first was skipped


def _bare_training_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return [("w", p)], opt, sched, torch.amp.GradScaler("cpu", enabled=False)


def test_pruning_orders_by_step_number_past_999999(tmp_path):
    from flashtune.training import checkpoint as ckpt

    trainable, opt, sched, scaler = _bare_training_state()
    extra = {"position": [0, 0], "log_acc": {}}
    for step in (999_998, 999_999, 1_000_000):
        ckpt.save_checkpoint(tmp_path, step, trainable, opt, sched, scaler, extra, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1000000", "step-999999"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1000000"


def _host_bytes(t):
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def test_to_host_packs_every_dtype_and_shape_into_one_transfer_with_the_same_bytes(monkeypatch):
    """checkpoint.to_host: `.contiguous().cpu()` of each tensor, byte for byte, in one copy per max_bytes.
    Tensors on the CPU take the packed path here (_on_host forced False), as a GPU's would."""
    from flashtune.training import checkpoint as ckpt

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = [base, base.t(), base[:, 1:4], torch.tensor(3.0), torch.empty(0, 4), torch.tensor([float("nan"), -0.0]),
               base.to(torch.bfloat16), base.half(), torch.arange(7), base > 0, torch.randn(3, generator=g).double(),
               torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g)]
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(self.numel()) or real_cpu(self, *a, **k))
    ckpt.to_host(tensors)
    assert calls == []                                # on the host: nothing moves
    monkeypatch.setattr(ckpt, "_on_host", lambda t: False)
    for max_bytes, transfers in ((1 << 30, 1), (64, None)):
        calls.clear()
        out = ckpt.to_host(tensors, max_bytes=max_bytes)
        assert len(calls) == transfers if transfers else len(calls) > 2
        for t, h in zip(tensors, out):
            assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous() and h.device.type == "cpu"
            assert torch.equal(_host_bytes(h), _host_bytes(t))


def test_checkpoint_files_are_the_same_bytes_with_one_transfer(tmp_path, monkeypatch):
    """save_checkpoint brings the weights and AdamW state to the host in one transfer (it was one `.cpu()`
    per tensor) and writes exactly the bytes of the per-tensor `.contiguous().cpu()` files."""
    from safetensors.torch import save_file

    from flashtune.training import checkpoint as ckpt

    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5)),
          torch.nn.Parameter(torch.randn(3, 2).t())]                       # a non-contiguous one too
    trainable = [(f"p{i}", p) for i, p in enumerate(ps)]
    opt = torch.optim.AdamW(ps, lr=0.1)
    sum((p ** 2).sum() for p in ps).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    extra = {"position": [0, 0], "log_acc": {}}
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file({n: p.detach().contiguous().cpu() for n, p in trainable}, str(ref / "trainable.safetensors"))
    flat, _ = ckpt._optimizer_to_flat(opt, ckpt._optimizer_indices(opt, trainable))
    save_file({k: v.contiguous().cpu() for k, v in flat.items()}, str(ref / "optimizer.safetensors"))

    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real_cpu(self, *a, **k))
    plain = ckpt.save_checkpoint(tmp_path / "plain", 1, trainable, opt, sched, scaler, extra)
    assert calls == []                                # CPU tensors: written as they are
    monkeypatch.setattr(ckpt, "_on_host", lambda t: False)
    packed = ckpt.save_checkpoint(tmp_path / "packed", 1, trainable, opt, sched, scaler, extra)
    assert len(calls) == 1                            # a device's tensors: one transfer for both files
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert (plain / name).read_bytes() == (packed / name).read_bytes() == (ref / name).read_bytes(), name


def test_finite_weights_check_reads_the_device_once(monkeypatch):
    """Before a checkpoint the trainable weights are checked to be finite: one host read for all of them."""
    from flashtune.training.trainer import _all_finite

    tensors = [torch.randn(3, 3) for _ in range(12)]
    reads = []
    for name in ("__bool__", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real: reads.append(1) or _real(self))
    assert _all_finite(tensors) is True and len(reads) == 1
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [t.clone() for t in tensors]
        broken[-1][2, 1] = bad
        reads.clear()
        assert _all_finite(broken) is False and len(reads) == 1
    assert _all_finite([]) is True


def test_stale_temp_folders_are_removed_when_a_run_starts(tmp_path):
    stale = tmp_path / "checkpoints" / ".step-000003-x1y2"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"half")

    def crash(model, batch):
        raise RuntimeError("crash before the first save")
    with pytest.raises(RuntimeError, match="crash before"):
        _small_fit(tmp_path, loss_fn=crash)
    assert not stale.exists()


@pytest.fixture
def two_runs(tmp_path):
    _small_fit(tmp_path / "a", max_steps=2)
    _small_fit(tmp_path / "b", max_steps=3)
    return tmp_path / "a", tmp_path / "b"


def _latest(run, text):
    (run / "latest.json").write_text(text)


@pytest.mark.parametrize("case", ["absolute", "dotdot", "not_checkpoints", "garbage", "not_object", "state", "weights",
                                  "optimizer"])
def test_bad_checkpoint_on_resume_is_one_line_and_changes_nothing(two_runs, case):
    from flashtune.errors import FlashtuneError
    from test_training import _subset_trainable
    from tiny import tiny_model

    a, b = two_runs
    ckdir = a / "checkpoints" / "step-000002"
    named = {"absolute": ("latest.json", "outside the run folder"), "dotdot": ("latest.json", "outside"),
             "not_checkpoints": ("latest.json", "points outside this run"),
             "garbage": ("latest.json", "corrupt"), "not_object": ("latest.json", "corrupt"),
             "state": ("state.json", "corrupt"), "weights": ("trainable.safetensors", "corrupt"),
             "optimizer": ("optimizer.safetensors", "corrupt")}[case]
    if case == "absolute":        # another run's checkpoint, by absolute path
        _latest(a, json.dumps({"checkpoint": str(b / "checkpoints" / "step-000003"), "step": 3}))
    elif case == "dotdot":
        _latest(a, json.dumps({"checkpoint": "../b/checkpoints/step-000003", "step": 3}))
    elif case == "not_checkpoints":  # inside the run folder, but not one of its checkpoints/
        shutil.copytree(ckdir, a / "adapter" / "step-000002")
        _latest(a, json.dumps({"checkpoint": "adapter/step-000002", "step": 2}))
    elif case == "garbage":
        _latest(a, '{"checkpoint": ')
    elif case == "not_object":
        _latest(a, "[1, 2]")
    elif case == "state":
        (ckdir / "state.json").write_text("{ not json")
    else:
        f = ckdir / named[0]
        f.write_bytes(f.read_bytes()[:40])
    before = snapshot(a)
    model = _subset_trainable(tiny_model("llama"))
    weights = _weights(model)
    with pytest.raises(FlashtuneError) as exc:
        _small_fit(a, model=model, resume=True)
    msg = str(exc.value)
    assert "\n" not in msg and named[0] in msg and named[1] in msg, msg
    assert snapshot(a) == before
    for n, p in _weights(model).items():
        assert torch.equal(p, weights[n]), n


def test_resume_with_changed_hyper_parameters_names_each_difference(tmp_path):
    from flashtune.errors import ConfigError

    _small_fit(tmp_path, max_steps=2)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as exc:
        _small_fit(tmp_path, resume=True, lr=0.5, batch_size=2, max_steps=4)
    msg = str(exc.value)
    assert "\n" not in msg and "lr=0.5 (the checkpoint has 0.01)" in msg and "batch_size=2" in msg
    assert "max_steps" not in msg                      # extending a run is what resume is for
    assert snapshot(tmp_path) == before
    res, _ = _small_fit(tmp_path, resume=True, max_steps=4)
    assert res.step == 4



def test_resume_reads_state_json_once(tmp_path, monkeypatch):
    _small_fit(tmp_path, max_steps=2)
    reads, read_text = [], Path.read_text

    def counting(self, *args, **kwargs):
        reads.extend([self.name] if self.name == "state.json" else [])
        return read_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", counting)
    res, _ = _small_fit(tmp_path, resume=True, max_steps=3)
    assert res.step == 3 and reads == ["state.json"]


def test_out_dir_under_a_file_is_one_line(tmp_path):
    from flashtune.errors import FlashtuneError

    (tmp_path / "f").write_text("a file")
    with pytest.raises(FlashtuneError) as exc:
        _small_fit(tmp_path / "f" / "run")
    assert "\n" not in str(exc.value) and "out_dir=" in str(exc.value)
    assert (tmp_path / "f").read_text() == "a file"


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(tmp_path):
    _small_fit(tmp_path, max_steps=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')                 # the kill came mid-write
    res, _ = _small_fit(tmp_path, resume=True, max_steps=3)
    assert [r["step"] for r in _strict_rows(tmp_path)] == [1, 2, 3] and res.step == 3


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), signal.Signals(int(sys.argv[3]))))
