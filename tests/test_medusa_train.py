"""Medusa training: label shifts (a deterministic sequence is learned exactly at the right offsets), the loss
against a per-position loop, the 4x head learning-rate reparametrization, and the train-heads recipe."""

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, tiny_model

from flashtune.decoding import Engine, MedusaHeads
from flashtune.decoding.drafters.medusa import HeadsLM, MedusaLoss, head_accuracy


pytestmark = pytest.mark.usefixtures("one_thread")


def _counting_batch(n=8, t=24):
    start = torch.arange(n)[:, None] * 7
    ids = (start + torch.arange(t)[None]) % (VOCAB - 3) + 3  # x_{t+1} = x_t + 1 (mod), a deterministic rule
    labels = ids.clone()
    labels[:, :3] = -100  # a "prompt" without labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_heads_loss_matches_a_per_position_loop():
    model = tiny_model("llama")
    heads = MedusaHeads.for_model(model.lm_head.weight, num_heads=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    batch = _counting_batch(2, 10)
    lm = HeadsLM(model, heads)
    hidden = lm.hidden(batch["input_ids"])
    got = MedusaLoss().heads_loss(heads, hidden, batch["labels"])
    ref = 0.0
    for k in range(3):  # head k+1 at position t predicts token t + k + 2
        terms = []
        for b in range(2):
            for t in range(10 - (k + 2)):
                y = batch["labels"][b, t + k + 2]
                if y != -100:
                    terms.append(F.cross_entropy(heads.heads[k](hidden[b, t])[None], y[None]))
        ref += 0.8 ** (k + 1) * torch.stack(terms).mean()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_medusa1_learns_the_exact_offsets_on_a_deterministic_sequence(tmp_path):
    from flashtune.training import TrainConfig, fit

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = MedusaHeads.for_model(model.lm_head.weight, num_heads=2)
    lm = HeadsLM(model, heads)
    batch = _counting_batch()
    data = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    cfg = TrainConfig(out_dir=str(tmp_path), lr=3e-2, max_steps=150, batch_size=8, warmup_steps=5,
                      save_every=0, log_every=50)
    result = fit(lm, data, cfg, loss_fn=MedusaLoss(), progress=False)
    assert result.history[-1]["loss"] < 0.05
    acc = head_accuracy(lm, [batch], topk=2)
    assert acc[:, 0].min() > 0.99  # every head's argmax is exactly token t + k + 1
    for k, v in model.state_dict().items():  # Medusa-1: the base is untouched
        assert torch.equal(v, base_before[k])


def test_head_lr_scale_keeps_the_function_and_scales_adam_steps():
    model = tiny_model("llama")
    torch.manual_seed(0)
    h = torch.randn(4, 32)
    plain = MedusaHeads.for_model(model.lm_head.weight, num_heads=2)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    scaled_heads = MedusaHeads.for_model(model.lm_head.weight, num_heads=2)
    scaled_heads.load_state_dict(plain.state_dict())
    scaled = HeadsLM(model, scaled_heads, head_lr_scale=4.0)
    torch.testing.assert_close(scaled.heads(h), plain(h), atol=1e-6, rtol=1e-6)
    # one Adam step of lr on both: the scaled heads' effective weights move 4x as far
    w0 = plain.heads[0].out.weight.detach().clone()
    for module in (plain, scaled.heads):
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3, eps=1e-20)
        module(h).square().mean().backward()
        opt.step()
    d_plain = plain.heads[0].out.weight.detach() - w0
    d_scaled = scaled.heads.heads[0].out.weight.detach() - w0
    torch.testing.assert_close(d_scaled, 4 * d_plain, atol=1e-7, rtol=1e-3)
    final = scaled.finish()
    assert not any("parametrizations" in n for n, _ in final.named_parameters())
    torch.testing.assert_close(final.heads[0].out.weight, scaled_heads.heads[0].out.weight)


@pytest.mark.slow
def test_train_heads_recipe_on_the_default_model_end_to_end(tmp_path):
    """A tiny run of the CLI recipe: self-distilled data, fit, accuracies, tree, files, generation."""
    from flashtune.recipes.heads import MedusaRecipe, train_medusa_heads
    from flashtune.models import load_base_model

    model, tok = load_base_model()
    recipe = MedusaRecipe(out_dir=str(tmp_path / "heads"), device="cpu", num_prompts=8, max_new_tokens=12,
                         steps=3, batch_size=4, tree_nodes=6, num_heads=2)
    report = train_medusa_heads(recipe, model=model, tokenizer=tok, progress=False)
    assert report["tree_nodes"] == 6 and len(report["head_top1"]) == 2
    heads = MedusaHeads.load(tmp_path / "heads")
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=128)
    prompt = tok("The capital of France is")["input_ids"]
    plain = engine.generate([prompt], max_new_tokens=8).tokens
    assert engine.generate([prompt], max_new_tokens=8, speculative=heads).tokens == plain


def test_medusa2_loss_terms_against_hf_and_a_zero_kl_at_init():
    """Medusa-2: L = L_LM + lambda0 * heads loss. L_LM equals HF's own causal-LM loss; with self-distillation
    and fresh LoRA (B = 0) the student equals the teacher, so the KL term is exactly 0. Gradients reach the
    LoRA matrices and the heads."""
    from flashtune.tuners import LoraConfig, attach

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    heads = MedusaHeads.for_model(model.lm_head.weight, num_heads=2)
    lm = HeadsLM(model, heads, head_lr_scale=4.0)
    batch = _counting_batch(4, 12)
    hidden = lm.hidden(batch["input_ids"])
    heads_part = MedusaLoss().heads_loss(lm.heads, hidden, batch["labels"])
    plain = MedusaLoss(mode="medusa2")(lm, batch)
    hf_lm = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(plain, hf_lm + 0.2 * heads_part, atol=1e-5, rtol=1e-5)
    distill = MedusaLoss(mode="medusa2", distill=True)(lm, batch)
    torch.testing.assert_close(distill, 0.2 * heads_part, atol=1e-5, rtol=1e-5)
    distill.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(float(g.abs().sum()) > 0 for g in lora_grads)
    assert all(p.grad is not None for p in lm.heads.parameters() if p.requires_grad)
