"""The chunked linear + cross-entropy against plain PyTorch cross-entropy over full logits (values and grads)."""

import pytest
import torch
import torch.nn.functional as F

from flashtune.training.loss import causal_lm_loss_sum, count_targets, linear_cross_entropy
from tiny import random_ids, tiny_model


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("train_head", [False, True])
def test_linear_cross_entropy_matches_plain_ce(chunk, train_head):
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=train_head)
    targets = torch.randint(0, 50, (37,), generator=g)
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    ref_grads = torch.autograd.grad(3.0 * ref, [hidden] + ([weight] if train_head else []))
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    grads = torch.autograd.grad(3.0 * out, [hidden] + ([weight] if train_head else []))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_mean_and_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 32, generator=g, requires_grad=True)
    weight = torch.randn(40, 32, generator=g) * 0.2
    targets = torch.randint(0, 40, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, targets, chunk_size=8, reduction="mean")
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)   # autocast: bf16 product, fp32 CE
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    (gh,) = torch.autograd.grad(out, hidden)
    (gr,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(gh, gr, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_causal_lm_loss_matches_hf_loss(arch):
    """Chunked default loss == Hugging Face's own labels= loss, including -100 positions and grads."""
    model = tiny_model(arch)
    ids = random_ids(3, 12, seed=1)
    labels = ids.clone()
    labels[:, :4] = -100                     # a prompt without loss
    labels[2, 9:] = -100                     # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = model(**batch).loss
    (ref_g,) = torch.autograd.grad(ref, model.get_input_embeddings().weight)
    out = causal_lm_loss_sum(model, batch, chunk_size=5) / count_targets(batch)
    (out_g,) = torch.autograd.grad(out, model.get_input_embeddings().weight)
    plain = causal_lm_loss_sum(model, batch, chunk_size=None) / count_targets(batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_g, ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_loss_sees_prefix_tuning(arch):
    """The chunked path runs the backbone directly: prefix-tuning's hooks must still apply (vs HF's loss)."""
    from flashtune.tuners import PrefixConfig, attach, disable_adapters

    model = tiny_model(arch)
    attach(model, PrefixConfig(num_virtual_tokens=3, prefix_projection=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)           # a prefix that visibly changes the output
    ids = random_ids(2, 10, seed=4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ref = model(**batch).loss
    with disable_adapters(model), torch.no_grad():
        assert abs(model(**batch).loss - ref) > 1e-3     # the prefix matters
    prefix = [p for p in model.parameters() if p.requires_grad]
    ref_g = torch.autograd.grad(ref, prefix)
    out = causal_lm_loss_sum(model, batch, chunk_size=4) / count_targets(batch)
    out_g = torch.autograd.grad(out, prefix)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
