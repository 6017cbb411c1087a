"""The "flashtune" attention implementation inside Hugging Face models equals "sdpa": logits, gradients and
greedy generations on tiny random Llama / Qwen2 / GPT-2 models, with left padding. The kernels run through
Triton's CPU interpreter (float32, exact IEEE products), so this checks the kernel path, not the reference."""

import os

import pytest
import torch

if torch.cuda.is_available():  # the interpreter would be switched on for the kernels of every module in the run
    pytest.skip("Triton-interpreter tests (CPU machines: make test); on a GPU the kernels are checked natively by "
                "make gpu-check (bench/attention.py --check)", allow_module_level=True)

_PREV = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"


from flashtune.attention import hf, ops, register  # noqa: E402
from tiny import DECODER_ARCHS, random_ids, tiny_config, tiny_model  # noqa: E402

if _PREV is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    register()


def _pair(arch):
    ref = tiny_model(arch, attn_implementation="sdpa")
    ours = tiny_model(arch, attn_implementation="sdpa")
    ours.set_attn_implementation("flashtune")
    assert ours.config._attn_implementation == "flashtune"
    return ref, ours


def _batch():
    ids = random_ids(2, 11, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in row 0
    return ids, mask


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_logits_and_grads_match_sdpa_with_padding(arch, monkeypatch):
    calls = []
    real = ops.FlashAttnFunction.apply
    monkeypatch.setattr(ops.FlashAttnFunction, "apply", lambda *a: calls.append(1) or real(*a))
    ref, ours = _pair(arch)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out_ref = ref(ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    assert calls, "the Triton kernel was not used"
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], out_ref.logits[valid], atol=2e-5, rtol=1e-4)
    out.loss.backward()
    out_ref.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("qwen2", marks=pytest.mark.slow)])
def test_greedy_generation_matches_sdpa(arch):
    ref, ours = _pair(arch)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_from_config_by_name_and_register_is_idempotent():
    import transformers as tf

    register()
    register()
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="flashtune")
    assert model.config._attn_implementation == "flashtune"
    assert tf.AttentionInterface._global_mapping[hf.NAME] is hf.flashtune_attention_forward


def test_packed_position_ids_become_varlen():
    """Two sequences packed in one row (position_ids restart at 0) equal the two run separately."""
    _, ours = _pair("llama")
    a, b = random_ids(1, 7, seed=2), random_ids(1, 5, seed=3)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=pos).logits
        want = torch.cat([ours(a).logits, ours(b).logits], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_packed_positions_are_analysed_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids; the host-syncing analysis runs once, not once per layer."""
    from flashtune.attention import hf

    calls = []
    real = hf._analyse_positions
    monkeypatch.setattr(hf, "_analyse_positions", lambda pos: calls.append(1) or real(pos))
    _, ours = _pair("llama")
    packed = random_ids(1, 12, seed=2)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        ours(packed, position_ids=pos)
        assert len(calls) == 1 and ours.config.num_hidden_layers > 1
        ours(packed, position_ids=pos.clone())  # a new forward with new positions is analysed again
    assert len(calls) == 2


def test_custom_4d_mask_falls_back_to_reference():
    """A 4-D mask (e.g. a tree) goes to the reference with that mask: equal to sdpa given the same mask."""
    ref, ours = _pair("llama")
    ids = random_ids(1, 6, seed=4)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    keep[3, 1:3] = False  # a branch that skips two tokens
    mask4 = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask4).logits, ref(ids, attention_mask=mask4).logits,
                                   atol=2e-5, rtol=1e-4)


def test_attention_dropout_in_training_matches_sdpa():
    """With attention dropout (GPT-2's attn_pdrop) in train mode both paths call torch's SDPA with the same mask
    and seed, so they agree exactly; padded rows stay finite."""
    ref = tiny_model("gpt2", attn_implementation="sdpa", attn_pdrop=0.3).train()
    ours = tiny_model("gpt2", attn_implementation="sdpa", attn_pdrop=0.3).train()
    ours.set_attn_implementation("flashtune")
    ids, mask = _batch()
    torch.manual_seed(7)
    want = ref(ids, attention_mask=mask).logits
    torch.manual_seed(7)
    got = ours(ids, attention_mask=mask).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_static_cache_generation_matches_sdpa():
    ref, ours = _pair("llama")
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
