"""MTP modules and parallel heads: shapes of the loss, sharing, files, and that training learns the right shift.

Oracles: the loss recomputed by hand with explicit index loops; eh_proj's input recomputed from the raw
DeepSeek-named tensors; convergence on a deterministic sequence, and no convergence on i.i.d. tokens (which a
label shifted by one too few would let the module copy from its own input).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashtune.decoding.drafters.mtp import MTPConfig, MTPLoss, MTPModules, WithMTP
from flashtune.decoding.drafters.parallel import ParallelHeads, ParallelHeadsLoss, WithParallelHeads
from flashtune.errors import ConfigError, FlashtuneError
from tiny import VOCAB, random_ids, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def frozen(arch, **kw):
    model = tiny_model(arch, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def manual_ce(logits_fn, outs, ids, first_shift):
    """Mean CE over every (b, i) with i + shift < T, looping over positions explicitly."""
    losses = []
    B, T = ids.shape
    for m, out in enumerate(outs):
        shift = m + first_shift
        total, n = 0.0, 0
        for b in range(B):
            for i in range(T - shift):
                logp = torch.log_softmax(logits_fn(m, out[b:b + 1, i:i + 1]).double()[0, 0], -1)
                total -= logp[ids[b, i + shift]]
                n += 1
        losses.append(total / n)
    return losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_is_lambda_over_depth_times_sum_of_shifted_ce(arch):
    model = frozen(arch)
    mtp = MTPModules.build(model, depth=2, lambda_initial=0.3, lambda_final=0.1, lambda_switch_tokens=30)
    ids = random_ids(2, 10, seed=1)
    wrapper = WithMTP(model, mtp).train()
    loss_fn = MTPLoss(mtp.config)
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
        ref = manual_ce(mtp.logits, mtp(hidden, ids), ids, first_shift=2)
        got = loss_fn(wrapper, {"input_ids": ids})
        torch.testing.assert_close(got.double(), (0.3 / 2 * sum(ref)).detach(),
                                   rtol=1e-5, atol=1e-6)
        assert loss_fn.tokens_seen == 20
        # 20 tokens seen < 30: still 0.3; after the next batch (40 >= 30) λ drops to 0.1.
        loss_fn(wrapper, {"input_ids": ids})
        third = loss_fn(wrapper, {"input_ids": ids})
    assert loss_fn.last["lambda"] == 0.1
    torch.testing.assert_close(third.double(), (0.1 / 2 * sum(ref)).detach(),
                               rtol=1e-5, atol=1e-6)


def test_joint_loss_adds_the_main_lm_loss_and_reaches_the_trunk():
    model = tiny_model("llama")
    mtp = MTPModules.build(model, depth=1)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # stands in for LoRA
    wrapper = WithMTP(model, mtp).train()
    ids = random_ids(2, 9, seed=2)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    loss = MTPLoss(mtp.config)(wrapper, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        main = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        hidden = model.base_model(ids).last_hidden_state
        logits = mtp.logits(0, mtp(hidden, ids)[0])[:, :-2]
        depth1 = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 2:].reshape(-1))
    torch.testing.assert_close(loss, main + 0.3 * depth1, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_shared_embedding_and_head_are_the_base_tensors():
    model = frozen("llama")
    mtp = MTPModules.build(model, depth=2)
    assert mtp.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert mtp.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    names = dict(WithMTP(model, mtp).named_parameters())
    # One tensor each in the training wrapper (nothing duplicated), none of them in the saved file.
    assert sum(p is model.lm_head.weight for p in names.values()) == 1
    assert not any("embed" in k or "lm_head" in k for k in mtp.deepseek_state_dict())


def test_deepseek_names_and_eh_proj_order(tmp_path):
    model = frozen("llama")
    d = model.config.hidden_size
    mtp = MTPModules.build(model, depth=1)
    g = torch.Generator().manual_seed(0)
    file = {k: torch.randn(v.shape, generator=g) for k, v in mtp.deepseek_state_dict().items()}
    n = model.config.num_hidden_layers  # DeepSeek stores the MTP layer after the last main layer
    assert f"model.layers.{n}.eh_proj.weight" in file and f"model.layers.{n}.enorm.weight" in file
    assert f"model.layers.{n}.self_attn.q_proj.weight" in file and f"model.layers.{n}.shared_head.norm.weight" in file
    file["model.embed_tokens.weight"] = torch.zeros(VOCAB, d)  # present in DeepSeek files: skipped
    mtp.load_state_dict_deepseek(file)
    h, e = torch.randn(1, 3, d, generator=g), torch.randn(1, 3, d, generator=g)
    seen = {}
    mtp.layers[0].block.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    mtp.layers[0](h, e, torch.arange(3)[None], torch.zeros(1, 1, 3, 3), model.model.rotary_emb)

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * w

    w = file[f"model.layers.{n}.eh_proj.weight"]
    ref = rms(e, file[f"model.layers.{n}.enorm.weight"]) @ w[:, :d].T \
        + rms(h, file[f"model.layers.{n}.hnorm.weight"]) @ w[:, d:].T  # [enorm(emb); hnorm(h)]
    torch.testing.assert_close(seen["x"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_round_trip(tmp_path, arch):
    model = frozen(arch)
    mtp = MTPModules.build(model, depth=2, init="random")
    mtp.save(tmp_path)
    back = MTPModules.load(tmp_path, model)
    assert back.config == mtp.config
    ids = random_ids(2, 8)
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
        for a, b in zip(mtp(hidden, ids), back(hidden, ids)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert back.lm_head.weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    other = frozen(arch, **({"n_embd": 48} if arch == "gpt2" else {"hidden_size": 48}))
    with pytest.raises(FlashtuneError, match="hidden_size"):
        MTPModules.load(tmp_path, other)
    with pytest.raises(FlashtuneError, match="train-heads"):
        MTPModules.load(tmp_path / "missing", model)


def test_config_validation_and_json_round_trip():
    cfg = MTPConfig(depth=3, lambda_switch_tokens=100, recycle="post_norm")
    assert MTPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.lam(99) == 0.3 and cfg.lam(100) == 0.1
    with pytest.raises(ConfigError, match="depth"):
        MTPConfig(depth=0)
    with pytest.raises(ConfigError, match="recycle"):
        MTPConfig(recycle="sideways")
    with pytest.raises(ConfigError, match="unknown"):
        MTPConfig.from_dict({"depht": 2})


def train(wrapper, loss_fn, batches, steps, lr=2e-2):
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    wrapper.train()
    for step in range(steps):
        loss = loss_fn(wrapper, {"input_ids": batches(step)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss_fn


def permutation_sequences(step, batch=8, length=16):
    """t_{j+1} = perm[t_j]: every token fixes all later ones."""
    g = torch.Generator().manual_seed(1000 + step)
    perm = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(7)) + 3
    ids = torch.empty(batch, length, dtype=torch.long)
    ids[:, 0] = torch.randint(3, VOCAB, (batch,), generator=g)
    for j in range(1, length):
        ids[:, j] = perm[ids[:, j - 1] - 3]
    return ids


def iid_sequences(step, batch=8, length=16):
    return random_ids(batch, length, seed=2000 + step)


def test_mtp_learns_a_deterministic_sequence_but_not_iid_tokens():
    torch.manual_seed(0)
    model = frozen("llama", initializer_range=0.3)  # a head with logits of O(1), so few steps suffice
    mtp = MTPModules.build(model, depth=2, lambda_initial=1.0)
    loss_fn = train(WithMTP(model, mtp), MTPLoss(mtp.config), permutation_sequences, 130)
    assert max(loss_fn.last["mtp_1"], loss_fn.last["mtp_2"]) < 0.1, loss_fn.last
    # On i.i.d. tokens the target t_{i+k+1} is unseen by module k: nothing to learn, the loss stays ~ln(V).
    # (With labels shifted one too little, the target would be the module's own input token: loss -> 0.)
    model = frozen("llama", initializer_range=0.3)
    mtp = MTPModules.build(model, depth=2, lambda_initial=1.0)
    loss_fn = train(WithMTP(model, mtp), MTPLoss(mtp.config), iid_sequences, 80)
    assert min(loss_fn.last["mtp_1"], loss_fn.last["mtp_2"]) > 0.8 * math.log(VOCAB - 3), loss_fn.last


def test_parallel_heads_loss_and_training():
    model = frozen("llama", initializer_range=0.3)
    heads = ParallelHeads.build(model, n_heads=3)
    ids = random_ids(2, 9, seed=3)
    loss_fn = ParallelHeadsLoss()
    with torch.no_grad():
        z = model(ids, output_hidden_states=True).hidden_states[-2]
        ref = manual_ce(heads.logits, heads(z), ids, first_shift=2)
        got = loss_fn(WithParallelHeads(model, heads).train(), {"input_ids": ids})
    torch.testing.assert_close(got.double(), sum(ref).detach(), rtol=1e-5, atol=1e-6)
    # Head 1 is the base's last layer: a copy initialised from it predicts like the base at the same shift.
    with torch.no_grad():
        base_logits = model(ids).logits
        torch.testing.assert_close(heads.logits(0, heads(z)[0]), base_logits, rtol=1e-5, atol=1e-5)
    # Head i must recover t+i from the random trunk's mixed state z_t: slower than MTP, which is handed
    # t+k; far below ln(V) ~ 4.5 is enough here (the shift itself is checked exactly above).
    loss_fn = train(WithParallelHeads(model, heads), ParallelHeadsLoss(), permutation_sequences, 100)
    assert max(loss_fn.last["head_2"], loss_fn.last["head_3"]) < 1.0, loss_fn.last


def test_parallel_heads_save_load(tmp_path):
    model = frozen("gpt2")
    heads = ParallelHeads.build(model, n_heads=3, init="random")
    heads.save(tmp_path)
    back = ParallelHeads.load(tmp_path, model)
    z = torch.randn(2, 5, model.config.n_embd)
    with torch.no_grad():
        for a, b in zip(heads(z), back(z)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_trains_the_modules_and_lora_jointly(tmp_path):
    """Through `flashtune.training.fit` with LoRA from `flashtune.tuners`: modules and LoRA change, the frozen base does not."""
    from flashtune.training import TrainConfig, fit
    from flashtune.tuners import LoraConfig, attach

    model = frozen("llama")
    mtp = MTPModules.build(model, depth=1)  # before LoRA: the block copies the plain last layer
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapper = WithMTP(model, mtp)
    before = {n: p.detach().clone() for n, p in wrapper.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in random_ids(8, 12, seed=5).tolist()]
    loss_fn = MTPLoss(mtp.config)
    fit(wrapper, data, TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=4, lr=1e-2, save_every=0,
                                   log_every=1), loss_fn=loss_fn, progress=False)
    changed = {n for n, p in wrapper.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("lora_" in n for n in changed) and any(n.startswith("heads.layers.0.eh_proj") for n in changed)
    assert not any(n.startswith("model.") and "lora_" not in n for n in changed), sorted(changed)[:5]
    assert loss_fn.last["main"] is not None  # the LM loss is part of a joint run


def test_head_recipes_share_one_loop_and_write_their_files(tmp_path):
    """recipes/heads.py: each method's recipe trains on given examples, saves heads that load back into a
    drafter, and writes its report; a bad value is one line naming the field."""
    from flashtune.decoding.drafters.export import load_heads
    from flashtune.errors import ConfigError
    from flashtune.recipes.heads import (MedusaRecipe, MTPRecipe, ParallelRecipe, train_medusa_heads,
                                         train_mtp_heads, train_parallel_heads)

    examples = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]} for ids in random_ids(12, 10, seed=2).tolist()]
    common = dict(device="cpu", steps=2, batch_size=4)
    runs = [(train_medusa_heads, MedusaRecipe(out_dir=str(tmp_path / "medusa"), num_heads=2, tree_nodes=3,
                                              topk=3, **common), "head_top1"),
            (train_mtp_heads, MTPRecipe(out_dir=str(tmp_path / "mtp"), depth=2, **common), "depth_top1"),
            (train_parallel_heads, ParallelRecipe(out_dir=str(tmp_path / "par"), n_heads=3, **common),
             "depth_top1")]
    for fn, recipe, key in runs:
        model = frozen("llama")
        report = fn(recipe, model=model, examples=examples, progress=False)
        assert len(report[key]) == 2 and report["examples"] == 10 and report["held_out"] == 2
        assert json.loads((Path(recipe.out_dir) / "heads_report.json").read_text())["recipe"] == recipe.to_dict()
        assert load_heads(recipe.out_dir, model) is not None
    with pytest.raises(ConfigError, match="lr"):
        MTPRecipe(lr=float("nan"))
    with pytest.raises(ConfigError, match="n_heads"):
        ParallelRecipe(n_heads=1)


def test_head_recipes_learn_from_the_eagle_recipes_synthesised_file(tmp_path):
    """data=<eagle3 data.jsonl>: each record is one example, prompt masked, the target's answer learned; a file
    that synth.py did not write is one line."""
    from flashtune.recipes.heads import MTPRecipe, _synthesised_examples

    rows = [{"prompt": f"q{i}", "prompt_ids": [1, 2, 3 + i], "answer_ids": [7, 8 + i, 9][: 1 + i % 3]}
            for i in range(6)] + [{"prompt": "empty", "prompt_ids": [1], "answer_ids": []}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"recipe": "magpie+self-distill", "seed": 0}] + rows) + "\n")
    out = _synthesised_examples(MTPRecipe(data=str(path), num_prompts=5))
    assert len(out) == 5  # the answerless record is dropped; num_prompts caps the rest
    for r, ex in zip(rows, out):
        assert ex["input_ids"] == r["prompt_ids"] + r["answer_ids"]
        assert ex["labels"] == [-100] * len(r["prompt_ids"]) + r["answer_ids"]
    path.write_text('{"prompt": "no recipe line"}\n')
    with pytest.raises(FlashtuneError, match="not a synthesised data file"):
        _synthesised_examples(MTPRecipe(data=str(path)))


def test_decoding_does_not_import_training():
    import os
    import subprocess
    import sys

    import flashtune

    root = str(Path(flashtune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import sys, flashtune.decoding, flashtune.decoding.drafters, flashtune.decoding.drafters.export; "
            "bad = [m for m in sys.modules if m.startswith(('flashtune.training', 'flashtune.cli', "
            "'flashtune.recipes'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
