"""Bad input to the CLI (issue 13): every probe is a clean refusal and nothing on disk changes.

Each probe runs `python -m flashtune ARGS` in a process of its own, and must exit 2 with exactly one line on
stderr, no traceback, and leave every file that was there before byte-identical (its own work folder, the
tiny model folders, the finished run and the adapters it reads).

To stay fast on 2 cores, the probes share one subprocess that imports torch / transformers / flashtune once
and then forks one child per probe; the child runs the `flashtune` module as `python -m flashtune` does
(`runpy`, `sys.exit(main())`, Python's own traceback on an uncaught exception), in the probe's folder, with
its stdout and stderr captured. The fixtures build one tiny model folder (random Llama, character tokenizer)
and one finished tiny run per session, and copy the run for each probe that corrupts it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import snapshot

HERE = Path(__file__).resolve().parent
SMALL = ["--set", "data.num_examples=24", "--set", "data.val_size=4", "--set", "eval.max_new_tokens=2",
         "--set", "eval.max_inputs=2", "--max-steps", "2", "--batch-size", "4", "--set", "train.lr=1e-2", "--quiet"]


# ---------------------------------------------------------------------------------------------- world
def _model_folder(path: Path) -> Path:
    from test_data import char_tokenizer
    from tiny import tiny_model

    tiny_model("llama", seed=0).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _bad_models(root: Path, good: Path) -> dict[str, Path]:
    out = {}
    for kind in ("not_a_model", "no_weights", "corrupt_weights", "pickle_only", "corrupt_config"):
        path = root / f"model-{kind}"
        shutil.copytree(good, path)
        out[kind] = path
    for f in out["not_a_model"].iterdir():
        f.unlink()
    (out["not_a_model"] / "notes.txt").write_text("not a model")
    (out["no_weights"] / "model.safetensors").unlink()
    blob = (out["corrupt_weights"] / "model.safetensors").read_bytes()
    (out["corrupt_weights"] / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    (out["pickle_only"] / "model.safetensors").unlink()
    (out["pickle_only"] / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle flashtune must never open")
    (out["corrupt_config"] / "config.json").write_text('{"model_type": "llama", "hidden_')
    return out


def _adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    from flashtune.models import load_base_model
    from flashtune.tuners import LoraConfig, attach, save_adapter

    model, _ = load_base_model(model_dir)
    attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = {}
    for kind, change in (("nan", lambda t: torch.full_like(t, float("nan"))), ("int32", lambda t: t.to(torch.int32))):
        path = save_adapter(model, root / f"adapter-{kind}")
        file = path / "adapter_model.safetensors"
        save_file({k: change(v) for k, v in load_file(str(file)).items()}, str(file))
        out[kind] = path
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from flashtune.cli import main

    root = tmp_path_factory.mktemp("bad-input")
    model_dir = _model_folder(root / "model")
    paths = {"model": model_dir, **{f"model-{k}": v for k, v in _bad_models(root, model_dir).items()},
             **{f"adapter-{k}": v for k, v in _adapters(root, model_dir).items()}}
    finished = root / "finished"
    finished.mkdir()
    cwd = os.getcwd()
    os.chdir(finished)              # the run is "run", relative, so that its copies record the same out_dir
    try:
        assert main(["finetune", "--model", str(model_dir), "--out", "run", *SMALL]) == 0
    finally:
        os.chdir(cwd)
    paths["finished"] = finished / "run"
    return root, paths


# --------------------------------------------------------------------------------------------- probes
def _finetune(*extra):
    return ["finetune", "--model", "{model}", "--out", "out", *SMALL, *extra]


def _resume(*extra):
    return ["finetune", "--model", "{model}", "--out", "run", *SMALL, "--resume", *extra]


def _latest(text):
    return lambda run, paths: (run / "latest.json").write_text(text(paths) if callable(text) else text)


def _truncate(name):
    def corrupt(run, paths):
        f = next((run / "checkpoints").glob("step-*")) / name
        f.write_bytes(f.read_bytes()[:30])
    return corrupt


# id: (argv with {placeholders}, what the one error line must contain, how to corrupt a copy of the finished
# run (None: no run copy), files the probe may rewrite with the same bytes only (see below))
PROBES = {
    "epochs_nan": (_finetune("--set", "train.epochs=nan"), "train.epochs=nan", None),
    "epochs_inf": (_finetune("--set", "train.epochs=inf"), "train.epochs=inf", None),
    "lr_nan": (_finetune("--set", "train.lr=nan"), "train.lr=nan", None),
    "lr_inf": (_finetune("--set", "train.lr=inf"), "train.lr=inf", None),
    "lr_flag_inf": (_finetune("--lr", "inf"), "train.lr=inf", None),
    "lr_flag_huge": (_finetune("--lr", "1e300"), "train.lr=1e+300", None),
    "val_size_nan": (_finetune("--set", "data.val_size=nan"), "val_size=nan", None),
    "lora_alpha_inf": (_finetune("--set", "method.lora_alpha=inf"), "method.lora_alpha=inf", None),
    "lora_dropout_one": (_finetune("--set", "method.lora_dropout=1.0"), "method.lora_dropout=1.0", None),
    "grad_norm_nan": (_finetune("--set", "train.max_grad_norm=nan"), "train.max_grad_norm=nan", None),
    "model_name_int": (["finetune", "--set", "model.name=5", "--out", "out", *SMALL], "model name 5", None),
    "model_not_a_model": (_finetune("--model", "{model-not_a_model}"), "no config.json", None),
    "model_no_weights": (_finetune("--model", "{model-no_weights}"), "no weights", None),
    "model_corrupt_weights": (_finetune("--model", "{model-corrupt_weights}"), "model.safetensors", None),
    "model_pickle_only": (_finetune("--model", "{model-pickle_only}"), "pytorch_model.bin", None),
    "model_corrupt_config": (_finetune("--model", "{model-corrupt_config}"), "config.json is corrupt", None),
    "resume_latest_garbage": (_resume(), "latest.json is corrupt", _latest('{"checkpoint": ')),
    "resume_latest_elsewhere": (_resume(), "points outside this run", _latest(lambda p: json.dumps(
        {"checkpoint": str(next((p["finished"] / "checkpoints").glob("step-*"))), "step": 2}))),
    "resume_state_corrupt": (_resume(), "state.json is corrupt", _truncate("state.json")),
    "resume_weights_corrupt": (_resume(), "trainable.safetensors", _truncate("trainable.safetensors")),
    "resume_changed_lr": (_resume("--lr", "0.5"), "train.lr=0.01 in the run, now 0.5", lambda run, p: None),
    "resume_changed_batch": (_resume("--batch-size", "2"), "train.batch_size=4 in the run, now 2",
                             lambda run, p: None),
    "generate_nan_adapter": (["generate", "--model", "{model}", "--adapter", "{adapter-nan}", "--prompt", "hi",
                              "--device", "cpu", "--max-new-tokens", "2"], "NaN or inf", None),
    "generate_int_adapter": (["generate", "--model", "{model}", "--adapter", "{adapter-int32}", "--prompt", "hi",
                              "--device", "cpu", "--max-new-tokens", "2"], "dtype int32", None),
}
# Every probe, the refused resumes included, must leave every file of the run byte-identical (finetune.json too).
REWRITES_FINETUNE_JSON: set[str] = set()


@pytest.fixture(scope="module")
def results(world):
    root, paths = world
    fields = {k: str(v) for k, v in paths.items()}
    jobs = []
    for name, (argv, _, corrupt) in PROBES.items():
        work = root / "probes" / name
        work.mkdir(parents=True)
        if corrupt is not None:
            shutil.copytree(paths["finished"], work / "run")
            corrupt(work / "run", paths)
        jobs.append({"name": name, "cwd": str(work), "argv": [a.format(**fields) for a in argv]})
    before = snapshot(root)
    # No progress bars: `generate` has no --quiet, and transformers' "Loading weights" bar is not an error line.
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, before, snapshot(root), json.loads(proc.stdout.strip().splitlines()[-1])


def _problems(name, outcome, before, after) -> list[str]:
    """What is wrong with one probe's outcome (empty when it is a clean refusal that changed nothing)."""
    rc, err = outcome["rc"], outcome["stderr"]
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err:
        return [f"traceback: ...{err[-1500:]}"]
    out = []
    if rc != 2:
        out.append(f"exit code {rc}, not 2 ({err[-500:]!r})")
    if len(lines) != 1 or not lines[0].startswith("flashtune: error: "):
        out.append(f"stderr is not one error line: {lines[:5]}")
    elif PROBES[name][1] not in lines[0]:
        out.append(f"the line does not say {PROBES[name][1]!r}: {lines[0]}")
    mine = f"probes{os.sep}{name}{os.sep}"
    skip = {f"{mine}run{os.sep}finetune.json"} if name in REWRITES_FINETUNE_JSON else set()
    was = {k: v for k, v in before.items() if k.startswith(mine) and k not in skip}
    now = {k: v for k, v in after.items() if k.startswith(mine) and k not in skip}
    changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if changed:
        out.append(f"files changed: {changed[:5]}")
    return out


def test_every_probe_is_one_line_exit_2_and_changes_nothing(results):
    """One test for the whole table, so that xdist runs the shared fixtures once; every probe is reported."""
    root, before, after, outcome = results
    problems = {name: p for name in PROBES if (p := _problems(name, outcome[name], before, after))}
    assert not problems, "\n".join(f"{name}: {'; '.join(p)}" for name, p in problems.items())
    shared = lambda snap: {k: v for k, v in snap.items() if not k.startswith("probes")}  # noqa: E731
    assert shared(after) == shared(before)


# ------------------------------------------------------------------------------- the probe runner
def _run_probes(jobs: list[dict]) -> dict:
    """Fork one child per probe; each runs `python -m flashtune ARGV` in its folder. Returns rc and output."""
    import runpy
    import tempfile
    import traceback

    import torch

    import importlib

    # Import the heavy modules once, before forking: what `finetune` and `generate` import on their way.
    for module in ("transformers", "flashtune.cli", "flashtune.cli.finetune", "flashtune.cli.generate",
                   "flashtune.models", "flashtune.training", "flashtune.tuners", "flashtune.data",
                   "flashtune.evaluation", "flashtune.decoding", "flashtune.attention"):
        importlib.import_module(module)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from flashtune.attention import register
    register()

    torch.set_num_threads(1)
    out = {}
    for job in jobs:
        with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
            pid = os.fork()
            if pid == 0:                                        # the child: `python -m flashtune ...`
                code = 1
                try:
                    os.chdir(job["cwd"])
                    os.dup2(so.fileno(), 1)
                    os.dup2(se.fileno(), 2)
                    sys.argv = ["flashtune", *job["argv"]]
                    runpy.run_module("flashtune", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if not isinstance(exc.code, (int, type(None))):
                        print(exc.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            se.seek(0)
            out[job["name"]] = {"rc": os.waitstatus_to_exitcode(status),
                                "stderr": se.read().decode("utf-8", "replace")}
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(json.dumps(_run_probes(json.loads(sys.stdin.read()))))
