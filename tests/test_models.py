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
    with pytest.raises(FlashtuneError, match="cannot load model"):
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
