"""Distributed fit on the CPU: 2 torchrun workers with gloo, a tiny Llama with LoRA, 6 steps.

Oracles: the same training in one process without torchrun (same global batch: 2 micro-batches of 3 per step,
accumulated in one process, one per rank on two), PEFT's own loader for the saved adapter, and an
uninterrupted 2-rank run for the kill-and-resume checks. The workers are this file run by torchrun
(`python -m torch.distributed.run ... tests/test_distributed.py JOB ROOT`), launched with the command that
`flashtune.training.launch` builds for `--nproc-per-node`.

Measured (fp32, torch 2.13 CPU, one thread per process): DDP and FSDP2 on 2 ranks with grad_accum 1 end with
weights and AdamW state bitwise equal to one process with grad_accum 2 (max |diff| 0.0); with grad_accum 2 on
2 ranks vs 4 in one process, where gradients are added in another order, within 6e-8; the logged losses within
5.3e-8 relative (rank sums are added in float64, one process adds float32). The resumes 2 -> 1 (FSDP2 shards
read by one process) and 1 -> 2 (a one-process checkpoint into FSDP2 shards) ended bitwise equal. The asserts
allow reduction-order rounding (1e-7 / 1e-6 absolute, 1e-6 relative for losses), except 2 -> 2: bitwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY, BATCH = 6, 2, 3
KILL_AT = 4          # rank 1 dies in its 4th micro-batch: inside step 4, the last checkpoint is step 2


def _mean_ce(model, batch):
    """A custom loss_fn (as the head-training recipes pass): each micro-batch's own mean cross-entropy."""
    from flashtune.training import causal_lm_loss_sum
    from flashtune.training.loss import count_targets

    return causal_lm_loss_sum(model, batch, None) / count_targets(batch)


def _train(out, strategy="auto", accum=1, kill_at=0, signum=signal.SIGKILL, save_adapter=False, loss_fn=None):
    """One training run of the tiny model (the same in every process); returns fit's result."""
    sys.path.insert(0, str(HERE))
    from flashtune.training import TrainConfig, TrainingInterrupted, causal_lm_loss_sum, distributed, fit
    from flashtune.training.loss import count_targets
    from flashtune.tuners import LoraConfig, attach
    from test_training import _collate, _dataset
    from tiny import tiny_model

    model = tiny_model("llama")
    torch.manual_seed(1)
    attach(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             init_lora_weights=False))
    calls = {"n": 0}

    def collate(examples):
        calls["n"] += 1
        if calls["n"] == kill_at and os.environ.get("RANK", "1") == "1":
            (Path(out) / "killed_at").write_text(str(time.time()))
            os.kill(os.getpid(), signum)
        return _collate(examples)

    cfg = TrainConfig(out_dir=str(out), lr=5e-3, max_steps=STEPS, batch_size=BATCH, grad_accum=accum,
                      warmup_steps=2, save_every=SAVE_EVERY, log_every=1, seed=11, resume=True,
                      strategy=strategy, weight_decay=0.01, eval_every=3)
    held_out = _collate(_dataset(4, seed=9))

    def eval_fn(m):           # through the model's own forward: under FSDP2 the root's weights must be whole
        return {"loss": float(causal_lm_loss_sum(m, held_out, None)) / count_targets(held_out)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # as the torchrun workers: same kernels, same rounding
    try:
        result = fit(model, _dataset(40, seed=2), cfg, collate, eval_fn=eval_fn, loss_fn=loss_fn, progress=False)
    except TrainingInterrupted:
        return None
    finally:
        torch.set_num_threads(threads)
    if save_adapter:
        assert distributed.is_sharded(model) == (strategy == "fsdp" and "RANK" in os.environ)
        distributed.save_adapter(model, Path(out) / "adapter")
    return result


def _worker(job: str, root: Path) -> int:
    torch.set_num_threads(1)
    if job == "fresh":       # uninterrupted DDP and FSDP2 runs (adapters saved from rank 0), then a killed FSDP2
        _train(root / "ddp", "ddp", save_adapter=True)
        _train(root / "fsdp", "fsdp", save_adapter=True)
        _train(root / "ddp_lossfn", "ddp", accum=2, loss_fn=_mean_ce)     # accumulation on 2 ranks: global 12
        _train(root / "fsdp_accum", "fsdp", accum=2)
        _train(root / "killed", "fsdp", kill_at=KILL_AT)
    elif job == "resume":    # 2 -> 2 (FSDP2) and 1 -> 2 (a one-process checkpoint into FSDP2 shards)
        _train(root / "killed", "fsdp")
        _train(root / "from1", "fsdp")
    return 0


def _torchrun(job, root, timeout=240):
    from flashtune.training.launch import torchrun_command

    cmd = torchrun_command(2, [str(Path(__file__).resolve()), job, str(root)], module=None)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "FLASHTUNE_DIST_TIMEOUT": "60"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def _rows(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rows]


def _state(out, step=STEPS):
    """{"param/<name>": .., "optim/<name>/<key>": ..} of a checkpoint, whatever its format, as full tensors."""
    path = Path(out) / "checkpoints" / f"step-{step:06d}"
    if (path / "trainable.safetensors").is_file():
        out = {f"param/{k}": v for k, v in load_file(str(path / "trainable.safetensors")).items()}
        out.update({f"optim/{k}": v for k, v in load_file(str(path / "optimizer.safetensors")).items()})
        return out
    from safetensors import safe_open

    pieces = {}                                                    # rank-sharded: stitch the shards
    for f in sorted((path / "shards").glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            info = json.loads(fh.metadata()["DCP_SHARDING_INFO"])
            for k in fh.keys():
                pieces.setdefault(k, []).append((info[k]["saved_offsets"], fh.get_tensor(k)))
    out = {}
    for k, parts in pieces.items():
        shape = [max(offs[d] + t.shape[d] for offs, t in parts) for d in range(parts[0][1].ndim)]
        out[k] = torch.zeros(shape, dtype=parts[0][1].dtype)
        for offs, t in parts:
            out[k][tuple(slice(o, o + n) for o, n in zip(offs, t.shape))] = t
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two torchrun launches (2 workers each) and five short runs in this process, once per session even under
    pytest-xdist (the first worker runs them under a file lock, the others read its results)."""
    import fcntl

    # One folder per test session, shared by its xdist workers (their basetemps are popen-gwN under the
    # session's); without xdist the session's own basetemp (its parent would be shared by every session).
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "distributed-runs"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done.json").is_file():
            (root / "done.json").write_text(json.dumps(_run_all(root)))
    return root, tuple(json.loads((root / "done.json").read_text()))


def _run_all(root: Path) -> list:
    rc, log, _ = _torchrun("fresh", root)
    assert (root / "fsdp" / "adapter").is_dir(), log[-3000:]
    ended = time.time()
    latest = json.loads((root / "killed" / "latest.json").read_text())["step"]
    stale = [p.name for p in (root / "killed" / "checkpoints").glob(".step-*")]
    _train(root / "single", "ddp", accum=2)                      # the oracle: one process, same global batch
    _train(root / "single_lossfn", "ddp", accum=4, loss_fn=_mean_ce)
    _train(root / "single_accum", "ddp", accum=4)
    shutil.copytree(root / "killed", root / "killed1")             # for the resume on one process
    shutil.copytree(root / "killed", root / "twice1")              # for two resumes on one process
    _train(root / "killed1", "ddp", accum=1)                     # 2 -> 1: grad_accum becomes 2 from the checkpoint
    # 2 -> 1 stopped at step 3 (SIGTERM in its first micro-batch), then 1 -> 1 with the same user's grad_accum=1.
    assert _train(root / "twice1", "ddp", accum=1, kill_at=1, signum=signal.SIGTERM) is None
    from flashtune.errors import ConfigError
    try:
        _train(root / "twice1", "ddp", accum=1)
    except ConfigError as exc:                                     # recorded for the test, not the fixture's end
        (root / "twice1" / "refused.txt").write_text(str(exc))
    # The 1 -> 2 case: one process stopped (SIGTERM: the step finishes and is saved) at step 3.
    assert _train(root / "from1", "ddp", accum=2, kill_at=6, signum=signal.SIGTERM) is None
    rc2, log2, _ = _torchrun("resume", root)
    assert rc2 == 0, log2[-3000:]
    return [rc, log[-20000:], ended - float((root / "killed" / "killed_at").read_text()), latest, stale]


def _close(a: dict, b: dict, atol):
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


def test_ddp_and_fsdp_match_one_process(runs):
    root, _ = runs
    single = _rows(root / "single")
    for strategy in ("ddp", "fsdp"):
        rows = _rows(root / strategy)
        assert [r["step"] for r in rows] == [r["step"] for r in single] == list(range(1, STEPS + 1))
        for r, s in zip(rows, single):
            assert r["loss"] == pytest.approx(s["loss"], rel=1e-6), (strategy, r["step"])
            assert ("eval_loss" in r) == ("eval_loss" in s)
            if "eval_loss" in s:                # evaluated through the model's own forward (FSDP2: gathered)
                assert r["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-6), (strategy, r["step"])
            assert r["lr"] == s["lr"]
        _close(_state(root / strategy), _state(root / "single"), 1e-7)
    assert sum("eval_loss" in r for r in single) == 2
    # The weights actually moved (the comparison is not between two copies of the initial weights).
    moved = _state(root / "single", STEPS - SAVE_EVERY)
    assert max(float((moved[k] - v).abs().max()) for k, v in _state(root / "single").items()) > 1e-3


def test_accumulation_on_ranks_and_a_custom_loss_fn(runs):
    """grad_accum 2 on 2 ranks (gradients reduced after the last micro-batch only) = grad_accum 4 in one
    process, with the default loss (FSDP2) and with a custom loss_fn averaged over micro-batches (DDP)."""
    root, _ = runs
    for ours, single in (("fsdp_accum", "single_accum"), ("ddp_lossfn", "single_lossfn")):
        rows, ref = _rows(root / ours), _rows(root / single)
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
        _close(_state(root / ours), _state(root / single), 1e-7)
    # A per-micro-batch mean is another loss than the global-batch token mean: the runs must differ.
    other, ours = _state(root / "ddp_lossfn"), _state(root / "single_accum")
    assert max(float((other[k] - ours[k]).abs().max()) for k in ours) > 1e-6


def test_adapter_saved_once_from_rank_0_loads_in_peft(runs):
    from peft import PeftModel

    sys.path.insert(0, str(HERE))
    from tiny import tiny_model

    root, _ = runs
    final = _state(root / "fsdp")
    for strategy in ("ddp", "fsdp"):
        adapter = root / strategy / "adapter"
        assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(adapter))
        lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
        assert len(lora) == 2 * 3 * 2                        # 2 blocks x 3 targets x (A, B)
        ours = {k.removeprefix("param/"): v for k, v in final.items() if k.startswith("param/")}
        for n, p in lora.items():
            key = n.removeprefix("base_model.model.").replace(".default.", ".default.")
            match = [v for k, v in ours.items() if k.replace(".default", "") == key.replace(".default", "")]
            assert len(match) == 1, n
            torch.testing.assert_close(p.detach(), match[0], rtol=0, atol=1e-7)


def test_dead_rank_ends_the_job_and_keeps_the_last_checkpoint(runs):
    root, (rc, log, secs, latest, stale) = runs
    assert rc != 0
    assert secs < 30                                       # from the kill to torchrun's exit: no hang
    assert "rank 1" in log.replace("local_rank: 1", "rank 1")
    assert latest == SAVE_EVERY and not stale


def test_resume_on_two_ranks_is_bitwise_and_across_world_sizes_is_close(runs):
    root, _ = runs
    ref = _state(root / "fsdp")
    resumed = _state(root / "killed")                      # FSDP2: killed on 2, resumed on 2
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
    assert _rows(root / "killed") == _rows(root / "fsdp")
    _close(_state(root / "killed1"), ref, 1e-6)           # FSDP2 shards of 2 ranks -> one process
    _close(_state(root / "from1"), _state(root / "ddp"), 1e-6)   # one process -> FSDP2 shards on 2 ranks
    for out in ("killed1", "from1"):
        assert [r["step"] for r in _rows(root / out)] == list(range(1, STEPS + 1))


def test_resume_twice_after_a_world_size_change(runs):
    """2 ranks -> 1 (grad_accum recomputed 1 -> 2) stopped at step 3, then 1 -> 1 again with the user's
    grad_accum=1: accepted, and bitwise the single 2 -> 1 resume. The checkpoints keep the user's config."""
    root, _ = runs
    refused = root / "twice1" / "refused.txt"
    assert not refused.exists(), refused.read_text()
    ours, ref = _state(root / "twice1"), _state(root / "killed1")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert _rows(root / "twice1") == _rows(root / "killed1")
    for step in (STEPS - SAVE_EVERY, STEPS):                           # (step 3's was pruned; resumed from)
        state = json.loads((root / "twice1" / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert state["config"]["grad_accum"] == 1                          # what the user asked for
        assert state["distributed"]["world"] == 1 and state["distributed"]["global_batch"] == 2 * BATCH


def test_take_shard_keeps_the_global_order():
    from flashtune.training.sampler import EpochBatches

    one = EpochBatches(23, 3, seed=5)
    pos, seq = (0, 0), []
    for _ in range(12):
        idx, pos = one.take(pos)
        seq.append(idx)
    for world in (2, 3, 4):
        got, p = [], (0, 0)
        while len(got) < 12:
            shards = [one.take_shard(p, r, world) for r in range(world)]
            assert len({s[1] for s in shards}) == 1              # every rank agrees on the next position
            got += [s[0] for s in shards]
            p = shards[0][1]
        assert got[:12] == seq


def test_launch_command_and_bad_input():
    from flashtune.errors import ConfigError
    from flashtune.training.launch import check_launch, strip_nproc, torchrun_command

    cmd = torchrun_command(2, ["finetune", "--nproc-per-node", "2", "--config", "x.toml", "--nproc-per-node=2"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flashtune",
                       "finetune", "--config", "x.toml"]
    assert strip_nproc(["a", "--nproc-per-node", "4", "b"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="nproc-per-node"):
        check_launch(0)
    with pytest.raises(ConfigError, match="strategy"):
        check_launch(2, "zero3")


def test_auto_strategy_and_rank_named_errors(monkeypatch):
    sys.path.insert(0, str(HERE))
    from flashtune.errors import ConfigError, FlashtuneError
    from flashtune.training import distributed
    from flashtune.tuners import LoraConfig, attach
    from tiny import tiny_model

    model = tiny_model("llama")
    attach(model, LoraConfig(r=4, target_modules=["q_proj"]))
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert distributed.training_bytes(model, "fp32") == 4 * n_all + 12 * n_train
    cpu = torch.device("cpu")
    assert distributed.resolve_strategy("auto", model, cpu, "fp32", 2) == "ddp"
    assert distributed.resolve_strategy("auto", model, cpu, "fp32", 2, headroom=1e-9) == "fsdp"
    assert distributed.resolve_strategy("auto", model, cpu, "fp32", 1) == "single"
    assert distributed.resolve_strategy("fsdp", model, cpu, "fp32", 2, under_torchrun=False) == "single"
    with pytest.raises(ConfigError, match="strategy"):
        distributed.resolve_strategy("zero3", model, cpu, "fp32", 2)
    with pytest.raises(ConfigError, match="cpu_offload=True needs GPUs"):    # FSDP2 would fail to pin memory
        distributed.shard_fsdp(model, cpu, "fp32", cpu_offload=True)

    @distributed.name_rank_errors
    def fails(exc):
        raise exc

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FlashtuneError, match=r"^rank 1/2: batch_size=0 is bad$"):
        fails(ConfigError("batch_size=0 is bad"))
    with pytest.raises(FlashtuneError, match=r"^rank 1/2: lost contact with another rank \(Connection closed by peer"):
        fails(RuntimeError("Connection closed by peer [127.0.0.1]:1234\nmore"))
    with pytest.raises(KeyError):                          # a bug keeps its traceback
        fails(KeyError("x"))


def test_resume_keeps_the_global_batch_or_says_why_not(tmp_path):
    from flashtune.errors import ConfigError
    from flashtune.training import TrainConfig
    from flashtune.training.distributed import Runtime

    state = {"distributed": {"world": 2, "strategy": "ddp", "batch_size": 3, "global_batch": 12}}
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=3, grad_accum=2, resume=True)
    assert Runtime(world=1).adapt_config(cfg, state).grad_accum == 4
    assert Runtime(world=4).adapt_config(cfg, state).grad_accum == 1
    assert Runtime(world=1).adapt_config(TrainConfig(**{**cfg.to_dict(), "resume": False}), state).grad_accum == 2
    with pytest.raises(ConfigError, match="3 ranks cannot share evenly; resume on a world size that divides 4"):
        Runtime(world=3).adapt_config(cfg, state)
    with pytest.raises(ConfigError, match="batch_size=4 but the checkpoint was trained with batch_size=3"):
        Runtime(world=2).adapt_config(TrainConfig(**{**cfg.to_dict(), "batch_size": 4}), state)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], Path(sys.argv[2])))
