import pytest
import torch

from flashtune.errors import ConfigError, FlashtuneError
from flashtune.models import cache_dir, load_base_model, resolve_dtype


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "flashtune"


def test_bad_dtype_names_field():
    with pytest.raises(ConfigError, match="dtype='fp8'.*choose one of"):
        resolve_dtype("fp8")
    assert resolve_dtype("bf16") is torch.bfloat16


def _save_tiny_llama(path):
    """A tiny random Llama and a one-word tokenizer saved as a local model directory."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tiny import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>", eos_token="<unk>").save_pretrained(path)
    return model


def test_local_path_loads_like_transformers(tmp_path):
    from tiny import random_ids

    model = _save_tiny_llama(tmp_path)
    loaded, loaded_tok = load_base_model(tmp_path, attn_implementation="eager")
    ids = random_ids(1, 9)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tok.pad_token is not None


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(FlashtuneError, match="does not exist"):
        load_base_model(tmp_path / "nope")


def test_missing_gguf_env_is_clear(monkeypatch, tmp_path):
    from flashtune.models import default_gguf_path

    monkeypatch.setenv("FLASHTUNE_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FlashtuneError, match="does not exist"):
        default_gguf_path()


def test_default_model_generates():
    """The embedded SmolLM2-135M-Instruct loads from the cache (converted once) and answers sensibly."""
    model, tok = load_base_model()
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_flashtune_attention_is_registered_by_the_loader(tmp_path):
    from transformers import AttentionInterface

    _save_tiny_llama(tmp_path)
    model, _ = load_base_model(tmp_path, attn_implementation="flashtune")
    assert "flashtune" in AttentionInterface._global_mapping
    assert model.config._attn_implementation == "flashtune"


# ------------------------------------------------------------------ issue 13: folders that are not models
def _bad_folder(kind, root):
    """A folder (or name) that claims to be a model but is not; returns (name, words the error must hold)."""
    path = root / "m"
    if kind == "not_a_number":
        return 5, "must be a local model folder"
    if kind == "missing":
        return str(root / "nope"), "does not exist"
    if kind == "a_file":
        path.write_text("hello")
        return path, "is a file"
    _save_tiny_llama(path)
    if kind == "not_a_model":
        (path / "config.json").unlink()
        return path, "no config.json"
    if kind == "no_weights":
        (path / "model.safetensors").unlink()
        return path, "no weights"
    if kind == "pickle_only":
        import torch as t
        t.save({"w": t.ones(1)}, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
        return path, "pytorch_model.bin"
    if kind == "corrupt_weights":
        (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
        return path / "", "model.safetensors"
    if kind == "truncated_weights":
        blob = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        return path, "model.safetensors"
    if kind == "corrupt_config":
        (path / "config.json").write_text('{"model_type": "llama", ')
        return path, "config.json is corrupt"
    if kind == "latin1_config":
        (path / "config.json").write_bytes('{"model_type": "llamé"}'.encode("latin-1"))
        return path, "config.json is corrupt"
    if kind == "config_not_object":
        (path / "config.json").write_text("[1, 2]")
        return path, "config.json is corrupt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["not_a_number", "missing", "a_file", "not_a_model", "no_weights", "pickle_only",
                                  "corrupt_weights", "truncated_weights", "corrupt_config", "latin1_config",
                                  "config_not_object"])
def test_bad_model_folder_is_one_line_naming_the_file(tmp_path, kind, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)        # the refusal must not rely on being offline
    name, words = _bad_folder(kind, tmp_path)
    start = time.perf_counter()
    with pytest.raises(FlashtuneError) as exc:
        load_base_model(name)
    msg = str(exc.value)
    assert "\n" not in msg and words in msg, msg
    assert "Hub" not in msg
    assert time.perf_counter() - start < 5                        # no network retries
