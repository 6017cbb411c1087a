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
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), signal.Signals(int(sys.argv[3]))))
