"""Packing: rows hold every example once with restarting positions; a packed batch gives every example the
loss and gradients it has alone (float64, tiny Llama, eager / SDPA / flashtune attention), and a model that
lets packed examples see each other is caught."""

from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.nn.functional as F

from flashtune.data import IGNORE_INDEX, Collator, build_datasets, check_packing, pack_examples
from flashtune.data.packing import packing_efficiency
from flashtune.errors import ConfigError, FlashtuneError
from flashtune.training import causal_lm_loss_sum
from test_data import char_tokenizer
from tiny import VOCAB, tiny_model

IMPLS = ("eager", "sdpa", "flashtune")


def _examples(n=9, seed=0, low=3, high=14):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(low, high)
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        cut = rng.randint(1, length - 1)              # a prompt part without loss, then the target
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return out


@functools.lru_cache(maxsize=None)
def _model(impl, dtype=torch.float64):
    """One tiny Llama per (attention, dtype) for the module (building one costs seconds on a busy machine);
    tests leave it in eval mode with no gradients."""
    from flashtune.attention import register

    register()
    return tiny_model("llama", seed=1, dtype=dtype, attn_implementation=impl)


def test_pack_examples_places_every_example_once():
    examples = _examples(40, seed=3, low=2, high=30)
    rows = pack_examples(examples, max_length=32)
    assert all(len(r["input_ids"]) <= 32 for r in rows)
    assert len(rows) < len(examples) and packing_efficiency(rows, 32) > 0.8
    seen = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE_INDEX          # never predicted from the example before
            seen.append((r["input_ids"][a:b], r["labels"][a + 1:b]))
    want = [(ex["input_ids"], ex["labels"][1:]) for ex in examples]
    assert sorted(map(str, seen)) == sorted(map(str, want))
    assert pack_examples(examples, 32) == rows                                # deterministic
    with pytest.raises(ConfigError, match="more than max_length=8"):
        pack_examples(examples, 8)


def _per_example_sums(model, batch, spans):
    """Per example, the summed next-token CE over its labelled tokens, from one forward of `batch`."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]                 # [B, T-1, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = batch["labels"][:, 1:]                                          # [B, T-1]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return [ce[row, a:b - 1].sum() for row, a, b in spans]


def _spans(rows):
    """(row, start, end) of every example inside the packed rows, in order of the first token id list."""
    out = []
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        out += [(r, a, b, tuple(row["input_ids"][a:b])) for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_packed_per_example_loss_equals_unpacked(impl):
    model = _model(impl)
    examples = _examples(6, seed=5)
    rows = pack_examples(examples, max_length=32)
    assert len(rows) < len(examples)
    collate = Collator(pad_token_id=0)
    spans = _spans(rows)
    packed_losses = _per_example_sums(model, collate(rows), [s[:3] for s in spans])
    alone = {tuple(ex["input_ids"]): _per_example_sums(model, collate([ex]), [(0, 0, len(ex["input_ids"]))])[0]
             for ex in examples}
    assert len(packed_losses) == len(examples)
    for (_, _, _, key), got in zip(spans, packed_losses):
        torch.testing.assert_close(got, alone[key], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 16])
def test_packed_gradients_equal_unpacked(chunk):
    """The trainer's loss (plain and chunked head): the same sum and gradients as one example at a time."""
    model = _model("sdpa")
    model.zero_grad()
    examples = _examples(5, seed=7)
    collate = Collator(pad_token_id=0)
    total = causal_lm_loss_sum(model, collate(pack_examples(examples, max_length=32)), chunk)
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = sum(causal_lm_loss_sum(model, collate([ex]), chunk) for ex in examples)
    ref.backward()
    rtol = 1e-6 if chunk is None else 1e-9       # the plain path takes the cross-entropy in float32
    torch.testing.assert_close(total.double(), ref.double(), rtol=rtol, atol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=100 * rtol, atol=100 * rtol * float(p.grad.abs().max()))
    model.zero_grad()


@torch.no_grad()
def test_the_equality_would_fail_if_attention_crossed_examples():
    """The same packed rows with one running position per row (the boundaries hidden, so the model attends
    across examples): every example after the first in a row gets another loss."""
    model = _model("sdpa")
    examples = _examples(6, seed=5)
    rows = pack_examples(examples, max_length=32)
    collate = Collator(pad_token_id=0)
    crossed = [dict(r, position_ids=list(range(len(r["input_ids"])))) for r in rows]
    spans = _spans(rows)
    got = _per_example_sums(model, collate(crossed), [s[:3] for s in spans])
    alone = {tuple(ex["input_ids"]): _per_example_sums(model, collate([ex]), [(0, 0, len(ex["input_ids"]))])[0]
             for ex in examples}
    later = [(g, alone[s[3]]) for g, s in zip(got, spans) if s[1] > 0]
    assert later and all(abs(float(g - a)) > 1e-3 for g, a in later)


@pytest.mark.parametrize("impl", IMPLS)
def test_check_packing_accepts_models_that_keep_examples_apart(impl):
    model = _model(impl, dtype=torch.float32)
    model.train()
    try:
        check_packing(model)
        assert model.training                               # mode restored
    finally:
        model.eval()


def test_check_packing_refuses_a_model_that_ignores_the_boundaries():
    class IgnoresPositions(torch.nn.Module):
        """A model whose attention does not read position_ids: packed examples see each other."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    with pytest.raises(FlashtuneError, match="attend to each other") as exc:
        check_packing(IgnoresPositions(_model("sdpa", dtype=torch.float32)))
    assert "\n" not in str(exc.value)


def test_check_packing_refuses_prefix_tuning_and_passes_lora():
    """Prefix-tuning hands the model a KV cache, and transformers then builds no packed mask: refused."""
    from flashtune.tuners import LoraConfig, PrefixConfig, attach

    lora = tiny_model("llama", seed=2, attn_implementation="sdpa")
    attach(lora, LoraConfig(init_lora_weights=False))          # a LoRA that changes the logits
    check_packing(lora)
    prefix = tiny_model("llama", seed=2, attn_implementation="sdpa")
    attach(prefix, PrefixConfig(num_virtual_tokens=4))
    with pytest.raises(FlashtuneError, match="prefix-tuning"):
        check_packing(prefix)


def test_packed_datasets_train_through_fit(tmp_path):
    """build_datasets(pack=True) -> Collator -> fit: the trainer takes packed rows and its loss matches."""
    from flashtune.training import TrainConfig, fit

    tok = char_tokenizer(chat=False)
    records = [{"prompt": f"q{i} ", "completion": "ab" * (1 + i % 4)} for i in range(12)]
    train, val = build_datasets(records, "prompt_completion", tok, max_length=40, val_size=2, seed=0, pack=True)
    plain, _ = build_datasets(records, "prompt_completion", tok, max_length=40, val_size=2, seed=0)
    assert all("position_ids" in r for r in train + val) and len(train) < len(plain)
    assert sum(t != IGNORE_INDEX for r in train for t in r["labels"][1:]) == \
        sum(t != IGNORE_INDEX for r in plain for t in r["labels"][1:])
    model = tiny_model("llama", seed=1, dtype=torch.float32, attn_implementation="sdpa")   # fit changes it
    with torch.no_grad():        # the first step's loss is the mean over all examples taken one by one
        total = sum(causal_lm_loss_sum(model, Collator(0)([ex]), None) for ex in plain)
        count = sum(sum(t != IGNORE_INDEX for t in ex["labels"][1:]) for ex in plain)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=len(train), lr=1e-3, log_every=1,
                      save_every=0)
    result = fit(model, train, cfg, collate_fn=Collator(0), progress=False)
    assert abs(result.history[0]["loss"] - float(total) / count) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_loss_on_the_gpu_kernel_equals_unpacked(dtype):
    """On CUDA the "flashtune" attention runs packed rows as one varlen kernel call (cu_seqlens from the
    position restarts): per-example losses match one example at a time, and check_packing passes."""
    from flashtune.attention import register

    register()
    model = tiny_model("llama", seed=1, dtype=dtype, attn_implementation="flashtune", hidden_size=256,
                       head_dim=64, intermediate_size=512).cuda()                  # 4 heads of 64
    check_packing(model)
    examples = _examples(12, seed=11, low=5, high=60)
    rows = pack_examples(examples, max_length=128)
    collate = Collator(pad_token_id=0)
    to = lambda b: {k: v.cuda() for k, v in b.items()}                        # noqa: E731
    with torch.no_grad():
        spans = _spans(rows)
        got = _per_example_sums(model, to(collate(rows)), [s[:3] for s in spans])
        alone = {tuple(ex["input_ids"]): _per_example_sums(model, to(collate([ex])),
                                                           [(0, 0, len(ex["input_ids"]))])[0] for ex in examples}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for (_, _, _, key), g in zip(spans, got):
        torch.testing.assert_close(g.float(), alone[key].float(), rtol=tol, atol=tol)
