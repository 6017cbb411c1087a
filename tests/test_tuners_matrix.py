"""Invariants over method x architecture (tiny random GPT-2, Llama, Qwen2, BART built offline).

Oracles: the untouched Hugging Face model (identity, disabled, padding), the same model run without a cache
(incremental decoding), closed-form parameter counts computed from the config, and the files themselves.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flashtune.errors import FlashtuneError
from flashtune.tuners import (AdapterConfig, LoraConfig, PrefixConfig, attach, disable_adapters, load_adapter,
                              materialize_prefix, merge_adapter, merged_state_dict, prefix_key_values,
                              save_adapter, unmerge_adapter)
from tiny import ARCHS, DECODER_ARCHS, random_ids, tiny_config, tiny_model

METHODS = ("lora", "houlsby", "pfeiffer", "prefix")
P, R, M, MID = 3, 4, 5, 16


def make_config(method: str, **overrides):
    if method == "lora":
        return LoraConfig(r=R, lora_alpha=8, **overrides)
    if method in ("houlsby", "pfeiffer"):
        return AdapterConfig(adapter_type=method, bottleneck_size=M, **overrides)
    return PrefixConfig(num_virtual_tokens=P, encoder_hidden_size=MID, **overrides)


def perturb(model, seed=0, scale=0.2):
    """Move every trainable parameter away from its init, so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def run(model, arch, ids, **kwargs):
    with torch.no_grad():
        if arch == "bart":
            return model(input_ids=ids, decoder_input_ids=kwargs.pop("decoder_input_ids", ids), **kwargs).logits
        return model(input_ids=ids, **kwargs).logits


def adapted(method, arch, seed=0, **overrides):
    model = tiny_model(arch)
    attach(model, make_config(method, **overrides))
    perturb(model, seed)
    return model


MATRIX = [(m, a) for m in METHODS for a in ARCHS]


@pytest.mark.parametrize("method,arch", MATRIX)
def test_disabled_equals_base_and_adapter_changes_output(method, arch):
    ids = random_ids(2, 6)
    base = run(tiny_model(arch), arch, ids)
    model = adapted(method, arch)
    out = run(model, arch, ids)
    assert (out - base).abs().max() > 1e-3
    with disable_adapters(model):
        torch.testing.assert_close(run(model, arch, ids), base, atol=0, rtol=0)
    torch.testing.assert_close(run(model, arch, ids), out, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", [(m, a) for m, a in MATRIX if (m, a) != ("prefix", "bart")])
def test_identity_at_init(method, arch):
    """LoRA (B = 0) and adapters with init="identity" are the base model bit for bit; a prefix whose
    columns are masked out (the mask's -inf) is the base model too (decoder-only; for BART see
    test_bart_each_prefix_affects_only_its_own_attention)."""
    ids = random_ids(2, 6)
    base = run(tiny_model(arch), arch, ids)
    model = tiny_model(arch)
    if method == "prefix":
        attach(model, make_config(method))
        mask = torch.cat([torch.zeros(2, P, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], dim=1)
        torch.testing.assert_close(run(model, arch, ids, attention_mask=mask), base, atol=1e-6, rtol=0)
        return
    attach(model, make_config(method, **({"init": "identity"} if method != "lora" else {})))
    torch.testing.assert_close(run(model, arch, ids), base, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", MATRIX)
def test_merge(method, arch):
    ids = random_ids(2, 6)
    model = adapted(method, arch)
    out = run(model, arch, ids)
    if method != "lora":
        with pytest.raises(FlashtuneError, match="cannot be merged"):
            merge_adapter(model)
        with pytest.raises(FlashtuneError, match="cannot be merged"):
            merged_state_dict(model)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model)
    torch.testing.assert_close(run(model, arch, ids), out, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, arch, ids), out, atol=1e-5, rtol=0)
    fresh = tiny_model(arch)
    fresh.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(run(fresh, arch, ids), out, atol=1e-5, rtol=0)


def _is_adapter_param(method, name):
    marks = {"lora": ("lora_A", "lora_B"), "houlsby": ("adapter_down", "adapter_up"),
             "pfeiffer": ("adapter_down", "adapter_up"), "prefix": ("flashtune_prefix",)}[method]
    return any(m in name for m in marks)


@pytest.mark.parametrize("method,arch", MATRIX)
def test_only_adapter_params_train(method, arch):
    model = adapted(method, arch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(_is_adapter_param(method, n) for n in names)
    assert all(p.requires_grad for n, p in model.named_parameters() if _is_adapter_param(method, n))
    model.train()
    ids = random_ids(2, 6)
    kwargs = {"decoder_input_ids": ids} if arch == "bart" else {}
    model(input_ids=ids, labels=ids, **kwargs).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.requires_grad) > 0


def expected_count(method, arch):
    """Trainable-parameter count from the formula and the config alone."""
    cfg = tiny_config(arch)
    d = cfg.hidden_size
    if arch == "bart":
        enc, dec = cfg.encoder_layers, cfg.decoder_layers
        layers, heads, kv_heads = enc + dec, cfg.decoder_attention_heads, cfg.decoder_attention_heads
    else:
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = d // heads
    if method == "lora":
        if arch == "gpt2":  # c_attn: d -> 3d
            return layers * R * (d + 3 * d)
        if arch == "bart":  # q_proj, v_proj in encoder self, decoder self and decoder cross attention
            return (enc * 2 + dec * 4) * R * (d + d)
        return layers * R * ((d + heads * head_dim) + (d + kv_heads * head_dim))
    if method in ("houlsby", "pfeiffer"):
        per_layer = 2 if method == "houlsby" else 1
        return layers * per_layer * (2 * d * M + M + d)
    sites = [cfg.encoder_layers, cfg.decoder_layers, cfg.decoder_layers] if arch == "bart" else [layers]
    total = 0
    for n_layers in sites:
        width = 2 * n_layers * kv_heads * head_dim
        total += P * d + d * MID + MID + MID * width + width
    return total


@pytest.mark.parametrize("method,arch", MATRIX)
def test_parameter_count_matches_formula(method, arch):
    model = tiny_model(arch)
    attach(model, make_config(method))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count(method, arch)
    if method in ("houlsby", "pfeiffer"):
        from flashtune.tuners.adapters import BottleneckLayer

        cfg = tiny_config(arch)
        layers = cfg.encoder_layers + cfg.decoder_layers if arch == "bart" else cfg.num_hidden_layers
        count = sum(isinstance(m, BottleneckLayer) for m in model.modules())
        assert count == layers * (2 if method == "houlsby" else 1)


@pytest.mark.parametrize("method,arch", MATRIX)
def test_save_load_round_trip(tmp_path, method, arch):
    ids = random_ids(2, 6)
    model = adapted(method, arch)
    out = run(model, arch, ids)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_model(arch)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(run(fresh, arch, ids), out, atol=0 if method != "prefix" else 1e-6, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters())
    again = tmp_path / "again"
    save_adapter(fresh, again)
    first, second = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(again / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0)
    trainable = tiny_model(arch)
    load_adapter(trainable, tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("method,arch", MATRIX)
def test_cached_incremental_decoding_equals_full_forward(method, arch):
    model = adapted(method, arch)
    ids = random_ids(2, 8, seed=1)
    with torch.no_grad():
        if arch == "bart":
            src = random_ids(2, 5, seed=2)
            full = model(input_ids=src, decoder_input_ids=ids).logits
            enc = model.get_encoder()(input_ids=src)
            first = model(encoder_outputs=enc, decoder_input_ids=ids[:, :5], use_cache=True)
            cache, steps = first.past_key_values, [first.logits]
            for t in range(5, 8):
                step = model(encoder_outputs=enc, decoder_input_ids=ids[:, t:t + 1], past_key_values=cache)
                cache = step.past_key_values
                steps.append(step.logits)
        else:
            full = model(input_ids=ids).logits
            mask = torch.ones(2, 5, dtype=torch.long)
            first = model(input_ids=ids[:, :5], attention_mask=mask, use_cache=True)
            cache, steps = first.past_key_values, [first.logits]
            for t in range(5, 8):
                mask = torch.ones(2, t + 1, dtype=torch.long)
                step = model(input_ids=ids[:, t:t + 1], attention_mask=mask, past_key_values=cache)
                cache = step.past_key_values
                steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,arch", MATRIX)
def test_padded_batch_equals_each_alone(method, arch):
    """Decoder-only: a left-padded batch; BART: a right-padded encoder batch."""
    model = adapted(method, arch)
    long, short = random_ids(1, 7, seed=3)[0], random_ids(1, 4, seed=4)[0]
    pad = 0
    if arch == "bart":
        ids = torch.stack([long, torch.cat([short, torch.full((3,), pad)])])
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        dec = random_ids(2, 5, seed=5)
        batch = run(model, arch, ids, attention_mask=mask, decoder_input_ids=dec)
        alone = [run(model, arch, long[None], decoder_input_ids=dec[:1]),
                 run(model, arch, short[None], decoder_input_ids=dec[1:])]
        torch.testing.assert_close(batch[0], alone[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[1], alone[1][0], atol=1e-5, rtol=0)
        return
    ids = torch.stack([long, torch.cat([torch.full((3,), pad), short])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = run(model, arch, ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(batch[0], run(model, arch, long[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, 3:], run(model, arch, short[None])[0], atol=1e-5, rtol=0)
    if method == "prefix":  # without explicit positions the hook derives them from the mask
        derived = run(model, arch, ids, attention_mask=mask)
        torch.testing.assert_close(derived[0], batch[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(derived[1, 3:], batch[1, 3:], atol=1e-5, rtol=0)


# Bottleneck adapters leave the cache alone (covered by the incremental-decoding test); LoRA stands for them.
@pytest.mark.parametrize("method,arch", [(m, a) for m in ("lora", "prefix") for a in DECODER_ARCHS])
def test_generate_matches_manual_greedy_with_left_padding(method, arch):
    model = adapted(method, arch)
    ids = torch.stack([random_ids(1, 6, seed=6)[0], torch.cat([torch.zeros(2, dtype=torch.long),
                                                               random_ids(1, 4, seed=7)[0]])])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    model.generation_config.eos_token_id = None  # always 4 new tokens, so rows compare position by position
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    for row in range(2):
        cur = ids[row:row + 1, int((mask[row] == 0).sum()):]
        for _ in range(4):
            nxt = run(model, arch, cur)[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], dim=1)
        assert out.shape[1] == 10 and out[row, -4:].tolist() == cur[0, -4:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_mlp_equals_materialized_table(arch):
    ids = random_ids(2, 6)
    model = adapted("prefix", arch)
    out = run(model, arch, ids)
    kv = prefix_key_values(model)
    materialize_prefix(model)
    assert not any(n.startswith("flashtune_prefix") and ".transform." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(run(model, arch, ids), out, atol=1e-6, rtol=0)
    for (k1, v1), (k2, v2) in zip(kv, prefix_key_values(model)):
        torch.testing.assert_close(k1, k2, atol=1e-6, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_key_values_shapes_gqa(arch):
    model = adapted("prefix", arch)
    cfg = tiny_config(arch)
    layers = cfg.decoder_layers if arch == "bart" else cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or (cfg.decoder_attention_heads if arch == "bart"
                                                          else cfg.num_attention_heads)
    head_dim = cfg.hidden_size // (cfg.decoder_attention_heads if arch == "bart" else cfg.num_attention_heads)
    kv = prefix_key_values(model)
    assert len(kv) == layers
    assert all(k.shape == v.shape == (1, heads, P, head_dim) for k, v in kv)
    with disable_adapters(model):
        assert prefix_key_values(model) is None


def test_bart_each_prefix_affects_only_its_own_attention():
    """Changing the encoder prefix changes the encoder output; changing the decoder self- or cross-attention
    prefix leaves the encoder output alone and changes the logits."""
    src, dec = random_ids(2, 5), random_ids(2, 4, seed=1)
    model = adapted("prefix", "bart")
    materialize_prefix(model)
    sites = model.flashtune_prefix["default"].sites

    def outputs():
        with torch.no_grad():
            enc = model.get_encoder()(input_ids=src).last_hidden_state
            return enc, model(input_ids=src, decoder_input_ids=dec).logits

    enc0, logits0 = outputs()
    with disable_adapters(model):
        enc_base = outputs()[0]
    assert (enc0 - enc_base).abs().max() > 1e-3
    for site in ("self", "cross", "encoder"):
        with torch.no_grad():
            sites[site].embedding.weight.normal_(0.0, 2.0)
        enc1, logits1 = outputs()
        if site == "encoder":
            assert (enc1 - enc0).abs().max() > 1e-3
        else:
            torch.testing.assert_close(enc1, enc0, atol=0, rtol=0)
        assert (logits1 - logits0).abs().max() > 1e-5  # exactly 0 if the site's prefix were ignored
        enc0, logits0 = enc1, logits1


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_default_init_is_near_identity(arch):
    ids = random_ids(2, 6)
    base = run(tiny_model(arch), arch, ids).double().log_softmax(-1)
    model = tiny_model(arch)
    attach(model, AdapterConfig())
    out = run(model, arch, ids).double().log_softmax(-1)
    kl = (base.exp() * (base - out)).sum(-1).mean()
    assert (out - base).abs().max() > 0 and -1e-9 < kl < 1e-3


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_prefix_key_values_reproduce_the_hooked_forward(arch):
    """What the decoding engine does with prefix_key_values (its own cache, P extra mask columns, positions
    from P) gives the same logits as the hooked forward; a cache the caller manages is left alone."""
    from transformers import DynamicCache

    model = adapted("prefix", arch)
    ids = random_ids(2, 6)
    hooked = run(model, arch, ids)
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(prefix_key_values(model)):
        cache.update(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), layer)
    mask = torch.ones(2, P + 6, dtype=torch.long)
    pos = torch.arange(P, P + 6).expand(2, -1)
    with disable_adapters(model):
        manual = run(model, arch, ids, past_key_values=cache, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(manual, hooked, atol=1e-5, rtol=0)

    from transformers import StaticCache

    static = run(model, arch, ids, past_key_values=StaticCache(config=model.config, max_cache_len=16))
    torch.testing.assert_close(static, run(tiny_model(arch), arch, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_trains_fp32_adapter(method):
    model = tiny_model("llama", dtype=torch.bfloat16)
    attach(model, make_config(method))
    perturb(model)
    ids = random_ids(2, 6)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.grad is not None for p in trainable)
