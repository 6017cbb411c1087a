"""Serving layouts (drafters/export.py): exported folders against the engines' published key lists and config
fields, a round trip that reproduces the drafts bit for bit, and one-line refusals for heads that do not fit.

Key lists: vLLM's Medusa draft model (vllm/model_executor/models/medusa.py: `blocks.{h}.layers.{l}` Linear with
bias when medusa_fc_bias, `lm_heads.{h}`; config num_heads, num_hidden_layers, hidden_size, vocab_size,
truncated_vocab_size); DeepSeek-V3 MTP as vLLM's deepseek_mtp.py reads it (`model.layers.{N+k}.` with
embed_tokens, enorm, hnorm, eh_proj, shared_head.{norm,head} at layer level and every other name inside the
decoder block; N = num_hidden_layers, k < num_nextn_predict_layers); SGLang's deepseek_nextn.py (one layer
under `model.layers.0.`, num_hidden_layers = num_nextn_predict_layers = 1, shared_head.norm / eh_proj / enorm /
hnorm at model level, every other name in `model.decoder`, embed_tokens and shared_head.head from the target)."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny import VOCAB, ragged_prompts, tiny_model

from flashtune.decoding import Engine, MedusaHeads
from flashtune.decoding.drafters.export import export_heads, import_heads, load_heads
from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules
from flashtune.errors import ConfigError, FlashtuneError

pytestmark = pytest.mark.usefixtures("one_thread")

MTP_LAYER_NAMES = ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head")  # vLLM's spec-layer weight names


def random_medusa(model, num_heads=3, num_layers=1, seed=0):
    heads = MedusaHeads.for_model(model.lm_head.weight, num_heads=num_heads, num_layers=num_layers, topk=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    heads.set_tree([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    return heads


@pytest.mark.parametrize("num_layers", [1, 2])
def test_medusa_vllm_layout_keys_config_and_forward(tmp_path, num_layers):
    model = tiny_model("llama")
    heads = random_medusa(model, num_layers=num_layers)
    export_heads(heads, tmp_path / "v", "vllm")
    t = load_file(str(tmp_path / "v" / "model.safetensors"))
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    want = {f"blocks.{h}.layers.{l}.{w}" for h in range(3) for l in range(num_layers) for w in ("weight", "bias")}
    assert set(t) == want | {f"lm_heads.{h}.weight" for h in range(3)}
    assert cfg["model_type"] == "medusa" and cfg["num_heads"] == 3 and cfg["num_hidden_layers"] == num_layers
    assert cfg["hidden_size"] == 32 and cfg["vocab_size"] == cfg["truncated_vocab_size"] == VOCAB
    assert cfg["medusa_fc_bias"] is True
    # vLLM's forward from the files alone: x <- x + SiLU(layer(x)) per layer, then the head's own lm_head
    h = torch.randn(5, 32)
    for i in range(3):
        x = h
        for j in range(num_layers):
            x = x + F.silu(F.linear(x, t[f"blocks.{i}.layers.{j}.weight"], t[f"blocks.{i}.layers.{j}.bias"]))
        torch.testing.assert_close(F.linear(x, t[f"lm_heads.{i}.weight"]), heads(h)[:, i], atol=1e-5, rtol=1e-5)


def test_medusa_round_trip_reproduces_the_drafts_bit_for_bit(tmp_path):
    model = tiny_model("llama")
    heads = random_medusa(model)
    export_heads(heads, tmp_path / "v", "vllm")
    back = import_heads(tmp_path / "v", model)
    assert back.tree.paths == heads.tree.paths and back.config == heads.config
    h, root = torch.randn(6, 32), torch.arange(6)
    assert torch.equal(back(h), heads(h))
    assert torch.equal(back.propose(h, root)[0], heads.propose(h, root)[0])
    engine = Engine(model, max_batch_size=3, max_seq_len=64)
    ps = ragged_prompts()
    kw = dict(max_new_tokens=12, temperature=0.9, seed=5, stop_tokens=[])
    assert engine.generate(ps, speculative=back, **kw).tokens == engine.generate(ps, speculative=heads, **kw).tokens


def test_mtp_vllm_layout_keys_and_config(tmp_path):
    model = tiny_model("llama")
    mtp = MTPModules.build(model, depth=2)
    export_heads(mtp, tmp_path / "v", "vllm")
    t = load_file(str(tmp_path / "v" / "model.safetensors"))
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    n = model.config.num_hidden_layers
    assert cfg["num_hidden_layers"] == n and cfg["num_nextn_predict_layers"] == 2
    assert cfg["architectures"] == ["DeepSeekMTPModel"]
    block_keys = set(model.model.layers[-1].state_dict())
    for k in range(2):
        prefix = f"model.layers.{n + k}."
        mine = {key[len(prefix):] for key in t if key.startswith(prefix)}
        layer_level = {key for key in mine if any(w in key for w in MTP_LAYER_NAMES)}
        assert layer_level == {"embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                               "shared_head.norm.weight", "shared_head.head.weight"}
        assert mine - layer_level == block_keys  # vLLM puts every other name into the layer's mtp_block
        assert t[prefix + "eh_proj.weight"].shape == (32, 64)
        assert torch.equal(t[prefix + "embed_tokens.weight"], model.model.embed_tokens.weight)
        assert torch.equal(t[prefix + "shared_head.head.weight"], model.lm_head.weight)
    assert all(key.startswith(("model.layers.2.", "model.layers.3.")) for key in t)


def test_mtp_sglang_nextn_layout_keys_and_config(tmp_path):
    model = tiny_model("llama")
    export_heads(MTPModules.build(model, depth=1), tmp_path / "s", "sglang")
    t = load_file(str(tmp_path / "s" / "model.safetensors"))
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLMNextN"]
    assert cfg["num_hidden_layers"] == cfg["num_nextn_predict_layers"] == 1
    assert all(key.startswith("model.layers.0.") for key in t)
    names = {key[len("model.layers.0."):] for key in t}
    spec = {key for key in names if any(w in key for w in ("shared_head.norm", "eh_proj", "enorm", "hnorm"))}
    assert spec == {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}
    assert names - spec == set(model.model.layers[-1].state_dict())  # what SGLang loads into model.decoder
    with pytest.raises(ConfigError, match="depth=2.*vllm"):
        export_heads(MTPModules.build(model, depth=2), tmp_path / "s2", "sglang")


@pytest.mark.parametrize("fmt,recycle", [("vllm", "pre_norm"), ("sglang", "post_norm")])
def test_mtp_round_trip_reproduces_the_drafts_bit_for_bit(tmp_path, fmt, recycle):
    model = tiny_model("llama", initializer_range=0.1)
    mtp = MTPModules.build(model, depth=2 if fmt == "vllm" else 1, recycle=recycle)
    with torch.no_grad():
        for p in mtp.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_heads(mtp, tmp_path / fmt, fmt)
    back = import_heads(tmp_path / fmt, model)
    assert back.config == mtp.config
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    ps = ragged_prompts()[:2]
    runs = []
    for m in (mtp, back):
        drafter = MTPDrafter(m, k=3)
        drafter.trace = []
        runs.append((engine.generate(ps, max_new_tokens=12, stop_tokens=[], speculative=drafter).tokens,
                     drafter.trace))
    assert runs[0][0] == runs[1][0]
    assert len(runs[0][1]) == len(runs[1][1])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a["logits"], b["logits"])


def test_formats_an_engine_does_not_serve_are_one_line_refusals(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="sglang serves no medusa"):
        export_heads(random_medusa(model), tmp_path / "s", "sglang")
    with pytest.raises(ConfigError, match="speculators serves no mtp"):
        export_heads(MTPModules.build(model), tmp_path / "s", "speculators")
    with pytest.raises(ConfigError, match="format"):
        export_heads(random_medusa(model), tmp_path / "s", "onnx")
    assert not (tmp_path / "s").exists()


def test_imports_refuse_damaged_or_foreign_folders(tmp_path):
    model = tiny_model("llama")
    export_heads(random_medusa(model), tmp_path / "v", "vllm")
    other = tiny_model("llama", hidden_size=48)
    with pytest.raises(FlashtuneError, match="hidden_size=32.*hidden_size=48"):
        import_heads(tmp_path / "v", other)
    (tmp_path / "v" / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(FlashtuneError, match="not a readable safetensors"):
        import_heads(tmp_path / "v", model)
    (tmp_path / "v" / "config.json").write_text("{nope")
    with pytest.raises(FlashtuneError, match="not a readable JSON"):
        import_heads(tmp_path / "v", model)
    export_heads(MTPModules.build(model), tmp_path / "m", "vllm")
    with pytest.raises(FlashtuneError, match="vocab_size=96.*vocab_size=80"):
        import_heads(tmp_path / "m", tiny_model("llama", vocab_size=80))
    with pytest.raises(ConfigError, match="base model"):
        import_heads(tmp_path / "m")


def test_heads_for_another_model_or_damaged_heads_files_are_one_line_errors(tmp_path):
    """Issue 13: heads trained for another model used to end in a matmul shape error, a damaged file in a
    traceback from safetensors or json."""
    model = tiny_model("llama")
    random_medusa(model).save(tmp_path / "h")
    other = tiny_model("llama", hidden_size=48)
    with pytest.raises(FlashtuneError, match="hidden_size=32.*hidden_size=48"):
        MedusaHeads.load(tmp_path / "h", model=other)
    heads = MedusaHeads.load(tmp_path / "h")  # no model given: the engine checks when it starts drafting
    with pytest.raises(FlashtuneError, match="hidden_size=32.*hidden_size=48"):
        Engine(other, max_batch_size=1, max_seq_len=32).generate([[3, 4]], max_new_tokens=3, speculative=heads)
    with pytest.raises(FlashtuneError, match="vocab_size=96.*vocab_size=80"):
        Engine(tiny_model("llama", vocab_size=80), max_batch_size=1, max_seq_len=32).generate(
            [[3, 4]], max_new_tokens=3, speculative=heads)
    MTPModules.build(model).save(tmp_path / "m")
    with pytest.raises(FlashtuneError, match="hidden_size=32.*hidden_size=48"):
        MTPModules.load(tmp_path / "m", other)
    weights = tmp_path / "h" / "medusa_heads.safetensors"
    t = load_file(str(weights))
    t["heads.0.out.weight"] = t["heads.0.out.weight"][:5]
    save_file(t, str(weights))
    with pytest.raises(FlashtuneError, match="shape"):
        MedusaHeads.load(tmp_path / "h")
    weights.write_bytes(b"garbage")
    with pytest.raises(FlashtuneError, match="not a readable safetensors"):
        MedusaHeads.load(tmp_path / "h")
    (tmp_path / "m" / "mtp_config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(FlashtuneError, match="not a readable JSON"):
        MTPModules.load(tmp_path / "m", model)


def test_export_heads_command(tmp_path, capsys):
    from flashtune.cli import export as cli_export

    model = tiny_model("llama")
    heads = random_medusa(model)
    heads.save(tmp_path / "h")
    parser = argparse.ArgumentParser()
    cli_export.register(parser.add_subparsers())
    args = parser.parse_args(["export-heads", "--heads", str(tmp_path / "h"), "--out", str(tmp_path / "v")])
    assert args.func(args) == 0
    args = parser.parse_args(["export-heads", "--import", str(tmp_path / "v"), "--out", str(tmp_path / "back")])
    assert args.func(args) == 0
    back = load_heads(tmp_path / "back")
    h = torch.randn(3, 32)
    assert torch.equal(back(h), heads(h)) and back.tree.paths == heads.tree.paths
    args = parser.parse_args(["export-heads", "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="exactly one"):
        args.func(args)
