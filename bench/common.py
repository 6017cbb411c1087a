"""Helpers the GPU benchmarks share: device synchronisation and peak-memory readings."""

import gc

import torch


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    """Peak allocated GiB since the last reset_memory (None off the GPU)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def environment(device, modules=("peft", "triton")) -> dict:
    """Versions and device for a result file: torch, transformers, python, each of `modules` (None when absent)."""
    import platform

    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device)}
    for mod in modules:
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def smoke_model(max_positions: int = 512):
    """A tiny random Llama with the default model's tokenizer (its chat template and vocabulary), for CPU dry
    runs of the benchmarks."""
    import transformers as tf

    from flashtune.models import default_model_dir

    tok = tf.AutoTokenizer.from_pretrained(str(default_model_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return tf.LlamaForCausalLM(cfg).eval(), tok


class ColdWeights:
    """Copies of an [n, k] bf16 weight, together over 200 MB (at least `least`), so that each call of a timed
    function reads its own from HBM as a decoding step does: one matrix reused 50 times would sit in the 50 MB L2
    and flatter every kernel. `cold(fn)` -> a no-argument call of fn(next copy); `.first` is the copy to check
    results against. One copy off the GPU."""

    def __init__(self, n: int, k: int, device, least: int = 2):
        count = 1 if torch.device(device).type == "cpu" else max(least, -(-200_000_000 // (2 * n * k)))
        self.copies = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5 for _ in range(count)]
        self.turn = 0

    @property
    def first(self) -> torch.Tensor:
        return self.copies[0]

    def cold(self, fn):
        def call():
            self.turn = (self.turn + 1) % len(self.copies)
            return fn(self.copies[self.turn])
        return call


def events_ms(fn, reps: int) -> float:
    """GPU time of one fn() in ms: CUDA events around `reps` calls, after one warm-up call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_us(fn, calls: int = 50, reps: int = 20) -> float:
    """GPU time of one fn() inside a CUDA graph of `calls` back-to-back calls (launch gaps as in a decode
    step), µs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return events_ms(g.replay, reps) * 1e3 / calls
