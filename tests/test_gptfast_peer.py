"""The gpt-fast-style decoding peer of bench/decode.py reproduces Hugging Face greedy decoding (fp32, CPU)."""

import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gptfast_peer import GPTFastLlama, compile_step, generate  # noqa: E402

NEW = 12


def tiny_llama(tied: bool, theta: float = 10000.0):
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: peaked, varied next-token distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.generation_config.eos_token_id = None
    return model


def hf_reference(model, ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, out.logits


@pytest.mark.parametrize("batch,tied,theta", [(1, True, 10000.0), (2, False, 500000.0), (2, True, 10000.0)])
def test_logits_and_tokens_equal_hf(one_thread, batch, tied, theta):
    model = tiny_llama(tied, theta)
    ids = torch.randint(3, 128, (batch, 7), generator=torch.Generator().manual_seed(batch))
    ref, ref_logits = hf_reference(model, ids)
    assert len(set(ref[:, 7:].flatten().tolist())) > 2  # the reference is not a repeated token
    peer = GPTFastLlama.from_hf(model, max_batch=batch, max_len=40)
    for _ in range(2):  # the second call decodes over the first call's stale cache slots
        tokens, logits = generate(peer, ids, NEW, return_logits=True)
        assert tokens.tolist() == ref.tolist()
        assert len(logits) == NEW
        for step, (mine, theirs) in enumerate(zip(logits, ref_logits)):
            torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_rope_theta_is_read_from_the_config(one_thread):
    """A peer whose rotary table used another base would drift from HF: the comparison above can fail."""
    model = tiny_llama(tied=True, theta=10000.0)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    _, ref_logits = hf_reference(model, ids)
    peer = GPTFastLlama.from_hf(model, max_batch=1, max_len=40)
    peer.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, peer.head_dim, 2).float() / peer.head_dim))
    peer.setup_caches(1, 40)
    _, logits = generate(peer, ids, NEW, return_logits=True)
    assert not torch.allclose(logits[-1], ref_logits[-1], atol=1e-3)


def test_compiled_step_traces_whole(one_thread):
    """fullgraph=True through Dynamo (eager backend on the CPU): no graph break, same tokens as eager."""
    torch._dynamo.reset()
    model = tiny_llama(tied=True)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    peer = GPTFastLlama.from_hf(model, max_batch=2, max_len=24)
    eager = generate(peer, ids, 8)
    assert generate(peer, ids, 8, step=compile_step(backend="eager")).tolist() == eager.tolist()


def test_cache_shape_is_checked():
    peer = GPTFastLlama.from_hf(tiny_llama(tied=True), max_batch=1, max_len=16)
    with pytest.raises(ValueError):
        generate(peer, torch.ones(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError):
        generate(peer, torch.ones(1, 10, dtype=torch.long), 8)
