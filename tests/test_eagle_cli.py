"""`flashtune train-heads --method eagle3`, `generate --speculative eagle3` and `export-heads` for EAGLE-3, run
in-process on a tiny Llama saved to disk: the speculative output equals plain greedy, and the vLLM layout
reads back to the same weights."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from flashtune.cli import main


def _generated(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()[0]


def test_eagle3_from_the_command_line(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"the cafe number {i} is cheap\n" for i in range(30)))
    out = tmp_path / "e3"
    assert main(["train-heads", "--method", "eagle3", "--model", model_dir, "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu", "--data", str(prompts)]) == 0
    assert "eagle3 saved" in capsys.readouterr().out
    gen = ["generate", "--model", model_dir, "--prompt", "the cafe", "--max-new-tokens", "12", "--device", "cpu"]
    plain = _generated(capsys, gen)
    assert _generated(capsys, [*gen, "--speculative", "eagle3", "--heads", str(out)]) == plain
    assert _generated(capsys, [*gen, "--speculative", "eagle3", "--heads", str(out), "--tree", "12"]) == plain
    served, back = tmp_path / "vllm", tmp_path / "back"
    assert main(["export-heads", "--heads", str(out), "--model", model_dir, "--format", "vllm", "--out",
                 str(served)]) == 0
    assert main(["export-heads", "--import", str(served), "--model", model_dir, "--out", str(back)]) == 0
    a, b = load_file(out / "eagle3.safetensors"), load_file(back / "eagle3.safetensors")
    assert a.keys() == b.keys()
    for k in a:   # the served layout is bf16: the round trip keeps the weights to bf16 rounding
        torch.testing.assert_close(b[k].float(), a[k].float().to(torch.bfloat16).float(), rtol=0, atol=0)


def test_drafters_train_on_a_chat_jsonl(model_dir, tmp_path, capsys):
    """`--data` takes the chat files people keep: EAGLE-3 and Medusa learn the target's own answers to each
    conversation's first user turn; a file without prompts is refused in one line, exit 2, nothing written."""
    chat = tmp_path / "chats.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"the cafe number {i} is"},
                                                     {"role": "assistant", "content": "cheap"}]}) + "\n"
                            for i in range(20)), encoding="utf-8")
    common = ["--model", model_dir, "--steps", "2", "--batch-size", "4", "--max-new-tokens", "6", "--device", "cpu"]
    out = tmp_path / "e3"
    assert main(["train-heads", "--method", "eagle3", "--out", str(out), "--data", str(chat), *common]) == 0
    report = json.loads((out / "eagle3_report.json").read_text())
    assert report["records"] == 20 and report["data"] == str(chat)
    assert main(["train-heads", "--method", "medusa", "--out", str(tmp_path / "m"), "--data", str(chat),
                 *common]) == 0
    capsys.readouterr()
    text = tmp_path / "notes.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n", encoding="utf-8")
    assert main(["train-heads", "--method", "eagle3", "--out", str(tmp_path / "bad"), "--data", str(text),
                 *common]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("Loading weights")]
    assert len(err) == 1 and "no 'messages' or 'prompt' column" in err[0]  # (the model loads first)
    assert not (tmp_path / "bad" / "eagle3.safetensors").exists()

