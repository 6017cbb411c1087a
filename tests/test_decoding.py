"""The decoding engine against Hugging Face's own models (logits, greedy generate) and plain PyTorch oracles."""

import pytest
import torch
from tiny import DECODER_ARCHS, VOCAB, ragged_prompts, tiny_model

from flashtune.decoding import Engine, MedusaHeads
from flashtune.decoding.sampling import SamplingParams, probs
from flashtune.decoding.tree import MC_SIM_7B_63, tree_buffers
from flashtune.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")




def _hf_greedy(model, prompt, n, **kw):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_prefill_logits_match_hf(arch):
    model = tiny_model(arch)
    engine = Engine(model, max_batch_size=3, max_seq_len=64)
    prompts = ragged_prompts()
    _, logits, _, _ = engine.prefill(prompts)
    for b, p in enumerate(prompts):
        ref = model(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[b], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_greedy_batch_matches_hf_generate(arch):
    model = tiny_model(arch)
    engine = Engine(model, max_batch_size=4, max_seq_len=96)
    prompts = ragged_prompts()
    out = engine.generate(prompts, max_new_tokens=24)  # stops at eos, as generate does
    for p, toks in zip(prompts, out.tokens):
        assert toks == _hf_greedy(model, p, 24)
    assert out.accepted_per_step == 1.0
    no_stop = engine.generate(prompts, max_new_tokens=24, stop_tokens=[])
    assert all(len(t) == 24 for t in no_stop.tokens)


def test_stop_tokens_end_like_hf_eos():
    model = tiny_model("llama")
    engine = Engine(model, max_batch_size=3, max_seq_len=96)
    prompts = ragged_prompts()
    free = engine.generate(prompts, max_new_tokens=20, stop_tokens=[]).tokens
    stop = free[0][5]  # a token the first sequence emits
    got = engine.generate(prompts, max_new_tokens=20, stop_tokens=[stop]).tokens
    for p, toks, full in zip(prompts, got, free):
        ref = _hf_greedy(model, p, 20, eos_token_id=stop)
        ref = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert toks == ref
        assert toks == (full[: full.index(stop) + 1] if stop in full else full)
    assert got[0][-1] == stop and len(got[0]) == 6


def test_stream_concatenates_to_generate():
    model = tiny_model("qwen2")
    engine = Engine(model, max_batch_size=3, max_seq_len=96)
    prompts = ragged_prompts()
    full = engine.generate(prompts, max_new_tokens=12, stop_tokens=[]).tokens
    acc = [[] for _ in prompts]
    chunks = 0
    for chunk in engine.stream(prompts, max_new_tokens=12, stop_tokens=[]):
        chunks += 1
        for b, new in enumerate(chunk):
            acc[b] += new
    assert acc == full and chunks == 12


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model("llama")
    engine = Engine(model, max_batch_size=3, max_seq_len=96)
    prompts = ragged_prompts()
    a = engine.generate(prompts, max_new_tokens=16, temperature=1.0, seed=7, stop_tokens=[]).tokens
    b = engine.generate(prompts, max_new_tokens=16, temperature=1.0, seed=7, stop_tokens=[]).tokens
    c = engine.generate(prompts, max_new_tokens=16, temperature=1.0, seed=8, stop_tokens=[]).tokens
    assert a == b and a != c
    greedy = engine.generate(prompts, max_new_tokens=16, stop_tokens=[]).tokens
    assert engine.generate(prompts, max_new_tokens=16, temperature=0.7, top_k=1, seed=1, stop_tokens=[]).tokens == greedy


def test_probs_against_a_naive_filter():
    torch.manual_seed(0)
    logits = torch.randn(5, 30, dtype=torch.float64)
    got = probs(logits, SamplingParams(0.8, top_k=10, top_p=0.7))
    for row, g in zip(logits, got):
        p = torch.softmax(row / 0.8, -1)
        keep = set(torch.topk(p, 10).indices.tolist())
        p = torch.where(torch.tensor([i in keep for i in range(30)]), p, torch.zeros_like(p))
        p = p / p.sum()
        order = torch.argsort(p, descending=True).tolist()
        kept, mass = [], 0.0
        for i in order:  # smallest set of most likely tokens whose mass reaches top_p
            kept.append(i)
            mass += p[i].item()
            if mass >= 0.7:
                break
        ref = torch.zeros_like(p)
        ref[kept] = p[kept] / p[kept].sum()
        torch.testing.assert_close(g.double(), ref, atol=1e-6, rtol=1e-5)


def test_sample_from_uniforms_follows_the_distribution():
    """Inverse-transform draws (the engine's graph-safe sampling, sampling.sample_from) against the exact
    distribution: a chi-square test over 20,000 draws per row, unnormalised weights, zero-weight tokens never
    drawn, batched leading dimensions; the step noise hands out fixed slots in order."""
    from scipy.stats import chisquare

    from flashtune.decoding.sampling import StepNoise, sample_from

    gen = torch.Generator().manual_seed(3)
    w = torch.rand(2, 3, 40, generator=gen) ** 3 * 5.0
    w[..., ::7] = 0.0  # zero weights
    n = 20_000
    u = torch.rand(n, 2, 3, generator=gen)
    draws = sample_from(w.expand(n, 2, 3, 40), u)  # [n, 2, 3]
    assert not bool(((w == 0).expand(n, 2, 3, 40).gather(-1, draws[..., None])).any())
    for i in range(2):
        for j in range(3):
            p = (w[i, j] / w[i, j].sum()).double()
            counts = torch.bincount(draws[:, i, j], minlength=40).double()
            keep = p > 0
            expected = p[keep] / p[keep].sum() * counts.sum()
            assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
    noise = StepNoise(10, "cpu")
    noise.refill(torch.Generator().manual_seed(0))
    a, b = noise.uniform(2, 3), noise.uniform(4)
    noise.start()
    assert torch.equal(noise.uniform(2, 3), a) and b.data_ptr() == a.data_ptr() + 6 * 4
    with pytest.raises(RuntimeError, match="more than the 10"):
        noise.uniform(5)


def test_bad_arguments_are_one_line_errors():
    engine = Engine(tiny_model("llama"), max_batch_size=2, max_seq_len=32)
    with pytest.raises(ConfigError, match="max_seq_len"):
        engine.generate([[3, 4, 5]], max_new_tokens=40)
    with pytest.raises(ConfigError, match="max_batch_size"):
        engine.generate([[3], [4], [5]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="temperature"):
        engine.generate([[3]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ConfigError, match="typical"):
        engine.generate([[3]], max_new_tokens=2, acceptance="typical")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_forward_equals_sequential_forward_per_path(arch):
    """One tree pass == a plain forward of prompt + path, for every root-to-leaf path (logits and K/V)."""
    model = tiny_model(arch)
    engine = Engine(model, max_batch_size=2, max_seq_len=128)
    tree = tree_buffers(MC_SIM_7B_63)
    prompts = ragged_prompts()[:2]
    _, _, _, lens = engine.prefill(prompts)
    tokens = torch.randint(3, VOCAB, (2, tree.num_nodes), generator=torch.Generator().manual_seed(0))
    _, logits = engine.forward(tokens, lens, tree)
    for b, p in enumerate(prompts):
        for r in range(0, tree.num_leaves, 5):
            nodes = tree.retrieve[r, : tree.valid_len[r]]
            seq = torch.tensor([p + tokens[b, nodes].tolist()])
            out = model(seq, use_cache=True)
            torch.testing.assert_close(logits[b, nodes], out.logits[0, len(p):], atol=1e-5, rtol=1e-5)
            for layer in (0, len(out.past_key_values.layers) - 1):
                ref_k = out.past_key_values.layers[layer].keys[0, :, len(p):]  # [H, depth+1, D]
                ref_v = out.past_key_values.layers[layer].values[0, :, len(p):]
                torch.testing.assert_close(engine.cache.k[layer, b, :, len(p) + nodes], ref_k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(engine.cache.v[layer, b, :, len(p) + nodes], ref_v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_tuned_models_match_hf_generate(arch, kind):
    """LoRA is merged into the engine's weights; a prefix is seeded into cache slots [0, P)."""
    from flashtune.tuners import LoraConfig, PrefixConfig, attach

    model = tiny_model(arch)
    target = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    cfg = LoraConfig(r=4, target_modules=target) if kind == "lora" else PrefixConfig(
        num_virtual_tokens=5, prefix_projection=False)
    attach(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # far from the identity init, so a missing merge or prefix shows
    model.eval()
    engine = Engine(model, max_batch_size=2, max_seq_len=96)
    assert engine.cache.prefix_len == (5 if kind == "prefix" else 0)
    prompts = ragged_prompts()[:2]
    out = engine.generate(prompts, max_new_tokens=12)
    for p, toks in zip(prompts, out.tokens):
        assert toks == _hf_greedy(model, p, 12)


def test_default_model_short_greedy_run():
    from flashtune.models import load_base_model

    model, tok = load_base_model()
    engine = Engine(model, tok, max_batch_size=2, max_seq_len=64)
    prompts = ["The capital of France is", "name[Aromi], food[Chinese]"]
    out = engine.generate(prompts, max_new_tokens=6)
    for text, toks in zip(prompts, out.tokens):
        ids = tok(text)["input_ids"]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert toks == ref
    assert out.texts is not None and len(out.texts) == 2


@pytest.mark.parametrize("backend,invariant", [("matmul", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_fast_path_arithmetic_on_cpu(arch, backend, invariant):
    """The CUDA paths (scale folded into W_q, fused RMSNorm, addmm residuals; attention as grouped matmuls with
    an additive bias, or the fused Triton kernels run by Triton's interpreter, batch-invariant or not) compute
    the same function: checked here on the CPU against HF, logits and greedy tokens, and a tree pass against
    sequential ones."""
    model = tiny_model(arch)
    if invariant and arch == "gpt2":
        with pytest.raises(ConfigError, match="Llama-family"):
            Engine(model, max_batch_size=3, max_seq_len=96, attention=backend, fast=True, invariant=True)
        return
    engine = Engine(model, max_batch_size=3, max_seq_len=96, attention=backend, fast=True, invariant=invariant)
    prompts = ragged_prompts()
    _, logits, _, _ = engine.prefill(prompts)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b], model(torch.tensor([p])).logits[0, -1], atol=1e-5, rtol=1e-5)
    new = 16 if backend == "matmul" else 6  # Triton's interpreter is slow
    out = engine.generate(prompts, max_new_tokens=new)
    for p, toks in zip(prompts, out.tokens):
        assert toks == _hf_greedy(model, p, new)
    tree = tree_buffers(MC_SIM_7B_63)
    _, _, _, lens = engine.prefill(prompts[:1])
    tokens = torch.randint(3, VOCAB, (1, tree.num_nodes), generator=torch.Generator().manual_seed(0))
    _, tree_logits = engine.forward(tokens, lens, tree)
    nodes = tree.retrieve[7, : tree.valid_len[7]]
    ref = model(torch.tensor([prompts[0] + tokens[0, nodes].tolist()])).logits[0, len(prompts[0]):]
    torch.testing.assert_close(tree_logits[0, nodes], ref, atol=1e-5, rtol=1e-5)


def test_invariant_mode_needs_the_triton_path():
    with pytest.raises(ConfigError, match="invariant=True needs the Triton backend"):
        Engine(tiny_model("llama"), max_batch_size=1, max_seq_len=32, attention="sdpa", invariant=True)


@pytest.mark.gpu
def test_bf16_speculative_greedy_is_token_identical_with_invariant_kernels():
    """On the GPU in bf16, where a tree pass and a one-token step round differently unless the kernels are
    batch-invariant: Medusa (63-node tree) and MTP (depth 2, k = 3) greedy output equals plain greedy token for
    token, and a prompt decodes the same alone as in a batch of 8. A random model's logits are full of
    near-ties, so a non-invariant path fails this (shown by the count of differing sequences without it)."""
    import transformers as tf

    from flashtune.decoding.drafters.mtp import MTPDrafter, MTPModules

    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    prompts = torch.randint(3, 512, (8, 20), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [p[: 8 + 2 * i] for i, p in enumerate(prompts)]
    differ = {}
    for invariant in (True, False):
        engine = Engine(model, max_batch_size=8, max_seq_len=256, invariant=invariant)
        plain = engine.generate(prompts, max_new_tokens=64, stop_tokens=[]).tokens
        heads = MedusaHeads.for_model(engine.model.lm_head.weight.float(), num_heads=4, topk=10)
        with torch.no_grad():
            for h in heads.heads:
                h.blocks[0].linear.weight.normal_(0, 0.02)
        heads = heads.to(torch.bfloat16)
        medusa = engine.generate(prompts, max_new_tokens=64, stop_tokens=[], speculative=heads).tokens
        mtp = engine.generate(prompts, max_new_tokens=64, stop_tokens=[],
                              speculative=MTPDrafter(MTPModules.build(model, depth=2), k=3)).tokens
        single = [engine.generate([p], max_new_tokens=64, stop_tokens=[]).tokens[0] for p in prompts]
        differ[invariant] = sum(a != b for outs in (medusa, mtp, single) for a, b in zip(outs, plain))
        if invariant:
            assert medusa == plain and mtp == plain and single == plain
    print("sequences differing from plain greedy without invariant kernels:", differ[False])
