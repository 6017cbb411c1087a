"""Parallel heads (Gloeckle et al.) as the engine's drafter: lossless greedy, and the drafter's cached heads
reproduce the heads' own teacher-forced pass over the finished sequence.

Oracles: plain greedy decoding of the engine and Hugging Face `generate`; `ParallelHeads.forward` on the trunk
states that Hugging Face's model computes (`hidden_states[-2]`) for the whole finished sequence.
"""

import pytest
import torch

from flashtune.decoding import Engine
from flashtune.decoding.drafters.parallel import ParallelDrafter, ParallelHeads
from flashtune.errors import ConfigError
from tiny import ragged_prompts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,backend", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "triton")])
def test_greedy_with_parallel_heads_is_token_identical(arch, backend):
    model = tiny_model(arch, initializer_range=0.1)
    engine = Engine(model, max_batch_size=3, max_seq_len=80, attention=backend)
    prompts = ragged_prompts()
    new = 16 if backend == "sdpa" else 8  # Triton's interpreter is slow
    plain = engine.generate(prompts, max_new_tokens=new, stop_tokens=[])
    ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert plain.tokens[0] == ref[0, len(prompts[0]):].tolist()
    drafter = ParallelDrafter(ParallelHeads.build(model, n_heads=3, init="random"))
    out = engine.generate(prompts, max_new_tokens=new, stop_tokens=[], speculative=drafter)
    assert out.tokens == plain.tokens
    assert drafter.tree.num_nodes == 3


def test_drafts_are_the_heads_teacher_forced_predictions():
    """At every step the drafter's head states (kept from its cache catch-up) give the logits that the heads
    compute in one pass over the finished sequence at the last committed position, for every head; and some
    drafts are accepted (heads initialised as the last layer predict t + 1, often right for a tiny model)."""
    model = tiny_model("llama", initializer_range=0.1)
    engine = Engine(model, max_batch_size=2, max_seq_len=80)
    heads = ParallelHeads.build(model, n_heads=3)  # last_layer init: drafts share the next token's guess
    drafter = ParallelDrafter(heads)
    seen = []
    original = drafter.propose

    def recording(z_last, root):
        bsz = root.shape[0]
        m = engine.model
        seen.append((drafter.L[:bsz].clone(), m.lm_head(m.norm(drafter._pending[:bsz])).clone()))
        return original(z_last, root)

    drafter.propose = recording
    prompts = ragged_prompts()[:2]
    out = engine.generate(prompts, max_new_tokens=14, stop_tokens=[], speculative=drafter)
    assert out.accepted_per_step > 1.0
    checked = 0
    for b, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + out.tokens[b]])
        with torch.no_grad():
            z = model.model(input_ids=seq, output_hidden_states=True).hidden_states[-2]
            ref = torch.stack([heads.logits(m, o) for m, o in enumerate(heads(z))], 1)[0]  # [k, T, V]
        for lengths, logits in seen:
            t = int(lengths[b]) - 1  # the last committed position when the step was proposed
            if t + 1 >= seq.shape[1]:
                continue
            torch.testing.assert_close(logits[b], ref[:, t], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= len(seen)  # every step of both rows but the last few


def test_one_head_drafts_nothing():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="n_heads"):
        ParallelDrafter(ParallelHeads.build(model, n_heads=1))
