"""Tiny random Hugging Face models built offline from configs, shared by the test modules.

Every builder seeds torch so the same call gives the same weights. Sizes are small enough that a forward
pass takes milliseconds on a CPU, and odd enough (GQA, tied/untied heads) to catch shape mistakes.
"""

from __future__ import annotations

import torch

ARCHS = ("gpt2", "llama", "qwen2", "bart")
DECODER_ARCHS = ("gpt2", "llama", "qwen2")
VOCAB = 96


def tiny_config(arch: str, **overrides):
    import transformers as tf

    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    elif arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif arch == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=256, dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, attn_implementation: str = "eager", **overrides):
    """A tiny random model of `arch` in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = tf.BartForConditionalGeneration if arch == "bart" else tf.AutoModelForCausalLM
    if arch == "bart":
        model = cls(cfg)
    else:
        model = cls.from_config(cfg)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation) if hasattr(model, "set_attn_implementation") else None
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=g)


def ragged_prompts() -> list[list[int]]:
    """Three prompts of different lengths (7, 3, 11 tokens): a batch whose rows need their own lengths."""
    return [random_ids(1, n, seed=s)[0].tolist() for n, s in ((7, 1), (3, 2), (11, 3))]


def snapshot(root) -> dict:
    """Every file (relative path -> bytes) and folder (-> None) under `root`: a refused command must leave it
    equal, an empty folder made on the way included."""
    from pathlib import Path

    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(Path(root).rglob("*"))}


def record_proposals(drafter, what=lambda d, tokens: tokens.clone()) -> list:
    """Wrap `drafter.propose` so that each proposal appends what(drafter, tree tokens) to the list returned."""
    seen, inner = [], drafter.propose

    def propose(hidden, root):
        tokens, q = inner(hidden, root)
        seen.append(what(drafter, tokens))
        return tokens, q

    drafter.propose = propose
    return seen



def readonly(monkeypatch, folder) -> None:
    """Make `folder` a place nobody may write to. Root ignores mode bits, so there the OS refusal is simulated
    for flashtune.fileio's temporary files (its atomic writes and its output-folder probe)."""
    import os

    import flashtune.fileio as fileio

    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    for name in ("mkstemp", "NamedTemporaryFile"):
        real = getattr(fileio.tempfile, name)

        def refuse(*a, dir=None, _real=real, **k):
            if str(dir).startswith(str(folder)):
                raise PermissionError(13, "Permission denied", str(dir))
            return _real(*a, dir=dir, **k)
        monkeypatch.setattr(fileio.tempfile, name, refuse)
