"""The decoding engine: static KV cache, batched prompts of different lengths, sampling, stop tokens,
streaming, CUDA graphs, and speculative decoding through a small drafter interface.

Speculative decoding follows Medusa (Cai et al., arXiv 2401.10774) for trees and Leviathan et al.
(arXiv 2211.17192) for the lossless rules; plain decoding is the special case of a tree with only a root.

One decoding step, for every sequence b of the batch (all tensors, no host round trip):

    root[b]       the last emitted token, not yet in the cache; hidden_last[b] the state that predicted it
    propose       drafter(hidden_last, root) -> tree_tokens [B, N] (node 0 = root) and optionally q
    verify        one forward of the N tokens at slots L_b + node, positions L_b + depth, tree mask
    accept        verify.py rule -> Acceptance(best leaf, a accepted drafts, last node, next token)
    commit        move the K/V of the accepted path to slots [L_b, L_b + a + 1), L_b += a + 1, emit the a
                  accepted drafts and `next`; `next` is the new root, hidden[node] the new hidden_last

With a stateless drafter (Medusa heads, MTP modules, EAGLE-3 drafts, or none) the whole step is captured in
one CUDA graph, greedy or sampling: a sampling step's random numbers are uniforms drawn from the call's
generator before each step, outside the graph (sampling.StepNoise, one launch), and read from fixed slots by
the captured step. The host never waits for the step it just launched: each step's "any row active" flag is
copied to pinned memory behind it, and the host reads the flag of the step `stop_lag` steps back (so at most `stop_lag`
steps run after the last row stops, and the GPU never idles waiting for the host). The prefill is graphed too,
its prompt length padded up to a multiple of `prefill_bucket` (one graph per batch size and bucket).

The drafter protocol (start, propose, accept; tree, stateless, trunk, graph_version) is written down in
drafters/base.py; `self.noise` is the step noise of the call in progress (None when greedy).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from flashtune.decoding import verify
from flashtune.decoding.cache import KVCache
from flashtune.decoding.drafters.base import Drafter
from flashtune.decoding.model import BACKENDS, DecoderModel, SlotMask, hf_state_and_prefix
from flashtune.decoding.sampling import SamplingParams, StepNoise, probs
from flashtune.decoding.tree import TreeBuffers, tree_buffers
from flashtune.errors import ConfigError, FlashtuneError, check_choice, check_range

_MAX_STOP = 16


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per sequence (stop token included, prompt excluded)
    steps: int  # decoding steps after the prefill (target forward passes)
    accepted_per_step: float  # mean tokens emitted per step per sequence (1.0 for plain decoding)
    texts: list[str] | None = None


def _where(exc: BaseException) -> str:
    """file:line of the innermost flashtune (or bench) frame that raised `exc`."""
    import traceback

    package = Path(__file__).resolve().parents[1]  # flashtune/
    homes = (str(package), str(package.parent / "bench"))
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(Path(f.filename).resolve()).startswith(homes)] or frames
    f = ours[-1] if ours else None
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`" if f else "?"


class _GraphCache:
    """Captures `fn` once per key in a CUDA graph and replays it; calls it directly off the GPU.

    With `compile`, `fn` first goes through torch.compile (Inductor fuses the elementwise kernels), and the
    compiled code is what gets captured. The entry keeps `fn` (and so the tensors its closure reads) alive.
    """

    MAX_GRAPHS = 24

    def __init__(self, enabled: bool, compile: bool = False):
        self.enabled = enabled
        self.compile = compile
        self.graphs = {}
        self.failed: set = set()  # keys whose capture failed: those run eagerly, every other key keeps its graph

    @property
    def all_captured(self) -> bool:
        """True when graphs are on and no capture has failed (what a benchmark row reports)."""
        return self.enabled and not self.failed

    def __call__(self, key, fn, *args, keep=()):
        """keep: tensors that fn updates in place (a stateful drafter's state) and that the capture's warm-up
        runs must leave as they were: the step they advance is the one the first replay makes."""
        if not self.enabled or key in self.failed:
            return fn(*args)
        if key not in self.graphs:
            if len(self.graphs) >= self.MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            saved = [t.clone() for t in keep]
            try:
                self.graphs[key] = self._capture(torch.compile(fn, dynamic=False) if self.compile else fn, args)
            except Exception as exc:  # noqa: BLE001 - fall back to eager kernels rather than fail generation
                if self.compile:
                    raise
                warnings.warn(f"CUDA graph capture failed at {_where(exc)} ({type(exc).__name__}: {exc}); this "
                              f"step runs eagerly")
                self.failed.add(key)
            finally:  # the warm-ups' changes undone, also when the capture failed
                for t, v in zip(keep, saved):
                    t.copy_(v)
            if key in self.failed:
                return fn(*args)
        graph, static, out, _ = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out

    @staticmethod
    def _capture(fn, args):
        static = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (compilation, allocator, cuBLAS workspaces) outside the capture
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a private memory pool per graph
            out = fn(*static)
        return graph, static, out, fn


def _graph_state(drafter) -> tuple:
    """The tensors a stateful drafter's step updates in place (`graph_state()`, optional in the protocol)."""
    fn = getattr(drafter, "graph_state", None)
    return tuple(fn()) if fn is not None else ()


def _params_key(drafter):
    """What a graph captured for `drafter` depends on beyond its identity: a module drafter's parameter
    addresses (a graph captured before `.to(...)` must not be replayed), or a stateful drafter's
    `graph_version` (bumped whenever it reallocates the buffers its graphs read)."""
    if drafter is None:
        return None
    if hasattr(drafter, "graph_version"):
        return ("version", drafter.graph_version)
    if not hasattr(drafter, "parameters"):
        return None
    return tuple(p.data_ptr() for p in drafter.parameters())


class Engine:
    """Fast generation for a Hugging Face causal LM (Llama family, Qwen2, Mistral, GPT-2), tuned or not.

    model: the HF model (LoRA adapters are merged into the engine's copy; an active prefix adapter's keys and
    values are seeded into the cache). The engine keeps its own compact copy of the weights (model.py), in
    `dtype` (default: the model's) on `device` (default: CUDA when available).

    invariant (the Triton backend with a Llama-family model only; default off): decoding steps and tree
    verification run batch-invariant kernels (invariant.linear_fixed, slot_attention_logical), so a node of a
    speculative tree gets bit for bit the logits a one-token step gives its position: speculative greedy output
    is then token-identical to plain greedy in bf16 too (plain decoding with the same setting), and a sequence
    decodes the same at any batch size. Off: cuBLAS matmuls, 1.3x (SmolLM2) to 1.8x (1.1B) faster plain steps
    on the H200 (bench/results/profile_invariant-h200.json), and bf16 speculative output may leave plain greedy
    at near-ties (the algorithm is exact; the rounding of a 31-row and a 1-row matmul is not). In fp32 both
    agree token for token.
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 8, max_seq_len: int = 2048, device=None,
                 dtype=None, cuda_graphs: bool | None = None, attention: str = "auto", stop_lag: int = 1,
                 fast: bool | None = None, compile: bool = False, prefill_bucket: int = 64,
                 invariant: bool = False):
        check_range("max_batch_size", max_batch_size, 1, integer=True)
        check_range("max_seq_len", max_seq_len, 2, integer=True)
        check_choice("attention", attention, ("auto",) + BACKENDS)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and self.device.index is None:  # compare equal to tensors' devices
            self.device = torch.device("cuda", torch.cuda.current_device())
        if getattr(model.config, "is_encoder_decoder", False):
            raise FlashtuneError("the decoding engine runs decoder-only models; this one is encoder-decoder")
        state, prefix = hf_state_and_prefix(model)
        self.model = DecoderModel.from_hf(model, state, device=self.device, dtype=dtype)
        self.dtype = self.model.embed.weight.dtype
        self.model.backend = self._pick_backend(attention)
        if self.model.backend == "triton":
            if fast is False:
                raise ConfigError("attention='triton' needs the fast arithmetic (fast=True or None); pass "
                                  "attention='sdpa' or 'matmul' for fast=False")
            fast = True
        if self.device.type == "cuda" if fast is None else fast:
            self.model.enable_fast()
        if invariant and not (self.model.backend == "triton" and self.model.layers[0].fusable):
            raise ConfigError("invariant=True needs the Triton backend (attention='triton', the CUDA default) and a "
                              "Llama-family model; pass invariant=False")
        self.invariant = bool(invariant)
        self.model.build_rope_table(max_seq_len, self.dtype)
        self.tokenizer = tokenizer
        a = self.model.args
        if max_seq_len > a.max_positions and a.arch == "gpt2":
            raise ConfigError(f"max_seq_len={max_seq_len} exceeds GPT-2's {a.max_positions} positions; lower it")
        self.cache = KVCache(a.n_layers, max_batch_size, a.n_kv_heads, max_seq_len, a.head_dim, self.dtype,
                             self.device)
        self.cache.fused = self.model.backend == "triton"
        if prefix is not None:
            self.cache.seed_prefix(prefix)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        check_range("stop_lag", stop_lag, 0, integer=True)
        check_range("prefill_bucket", prefill_bucket, 1, integer=True)
        self.stop_lag, self.prefill_bucket = stop_lag, prefill_bucket
        self._ring = None  # (pinned flags, CUDA events) for the lagged stop check, made on first use
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs = _GraphCache(use_graphs and self.device.type == "cuda", compile=compile)
        self._root_tree = tree_buffers([]).to(self.device)
        self._stop = torch.full((_MAX_STOP,), -1, dtype=torch.long, device=self.device)
        self._out = torch.zeros(max_batch_size, max_seq_len + 2, dtype=torch.long, device=self.device)
        self.eos_token_id = getattr(model.config, "eos_token_id", None)
        self.noise: StepNoise | None = None  # its step noise (sampling calls): drafters that sample draw from it
        self._noise: StepNoise | None = None  # the buffer, kept between calls (captured steps read it)

    def _pick_backend(self, attention: str) -> str:
        """On CUDA the fused Triton kernels of kernels.py (rotary + cache write, attention over each row's
        live slots; bench/profile_decode.py measured the step they replace); SDPA on the CPU, where the
        arithmetic follows transformers' exactly."""
        if attention != "auto":
            return attention
        return "triton" if self.device.type == "cuda" else "sdpa"

    # ---------------------------------------------------------------- forward passes
    def forward(self, tokens, lengths, tree: TreeBuffers, trunk: bool = False):
        """Run tree (or single-token) tokens [B, N] after each sequence's committed lengths [B].

        Writes their K/V at slots lengths + node (uncommitted until `commit`). Returns (hidden [B, N, d],
        logits [B, N, V]); with `trunk`, the input of the last layer instead of hidden (for a drafter whose
        `trunk` attribute is True: parallel heads).
        """
        bsz, n = tokens.shape
        slots = lengths[:, None] + torch.arange(n, device=tokens.device)[None]  # [B, N]
        positions = lengths[:, None] + tree.depth[None]
        if self.invariant:  # every node's logits bit for bit those of a one-token step at its position
            mask = SlotMask(lengths, tree.mask if n > 1 else None, ancestors=tree.ancestors, depth=tree.depth)
        else:
            mask = SlotMask(lengths, tree.mask if n > 1 else None)
        hidden = self.model(tokens, positions, self.cache, slots, mask, invariant=self.invariant, trunk=trunk)
        hidden, feats = hidden if trunk else (hidden, hidden)
        return feats, self.model.logits(hidden, self.invariant)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]):
        """Write the prompts' K/V. Returns (hidden [B, T, d], logits_last [B, V], tokens [B, T], lengths [B])
        with lengths = prompt lengths (the cache lengths are prefix + lengths); T is padded to the prefill
        bucket on CUDA."""
        hidden, logits, tokens, lens = self._prefill_prompts(prompts)
        if self._graphs.enabled:  # the graph's output buffers are reused by its next replay
            hidden, logits = hidden.clone(), logits.clone()
        return hidden, logits, tokens, lens

    def _prefill_prompts(self, prompts, trunk: bool = False):
        """`prefill` without the copy of the graph's outputs (generation consumes them at once); with `trunk`,
        the input of the last layer instead of the hidden states (see `forward`)."""
        bsz = len(prompts)
        if bsz > self.max_batch_size:
            raise ConfigError(f"batch of {bsz} prompts exceeds max_batch_size={self.max_batch_size}; raise it")
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if int(lens.min()) < 1:
            raise ConfigError("every prompt needs at least one token")
        t = int(lens.max())
        pre = self.cache.prefix_len
        if self._graphs.enabled:  # pad to a bucket so that a few graphs serve every prompt length
            t = min(-(-t // self.prefill_bucket) * self.prefill_bucket, self.cache.max_seq - pre)
        tokens = torch.zeros(bsz, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        tokens = tokens.to(self.device)
        lens = lens.to(self.device)
        hidden, logits = self._graphs(("prefill", bsz, t, pre, trunk), lambda tk, ln: self._prefill(tk, ln, trunk),
                                      tokens, lens)
        return hidden, logits, tokens, lens

    def _prefill(self, tokens, lens, trunk: bool = False):
        bsz, t = tokens.shape
        pre = self.cache.prefix_len
        slots = pre + torch.arange(t, device=tokens.device)[None].expand(bsz, t)
        mask = SlotMask(torch.full((bsz,), pre, dtype=torch.long, device=tokens.device))  # causal after the prefix
        hidden = self.model(tokens, slots, self.cache, slots, mask, trunk=trunk)  # positions = slots
        hidden, feats = hidden if trunk else (hidden, hidden)
        last = hidden[torch.arange(bsz, device=tokens.device), lens - 1]
        return feats, self.model.lm_head(last)

    # ---------------------------------------------------------------- one step
    def _step(self, tree, drafter, rule, params, noise, root, hidden_last, lengths, active, n_out, n_steps,
              max_new, graph_forward=False):
        if noise is not None:
            noise.start()  # the same slots, in the same order, on every run of the step
        tree_tokens, q = (root[:, None], None) if drafter is None else drafter.propose(hidden_last, root)
        trunk = getattr(drafter, "trunk", False)  # the drafter reads the last layer's input, not the output
        if graph_forward:  # the target pass alone in a CUDA graph (sampling, stateful drafters)
            key = ("forward", root.shape[0], id(tree), trunk)
            hidden, logits = self._graphs(key, lambda t, ln: self.forward(t, ln, tree, trunk), tree_tokens, lengths)
        else:
            hidden, logits = self.forward(tree_tokens, lengths, tree, trunk)
        if rule == "greedy" and tree.num_nodes == 1:  # plain decoding: the argmax is all there is
            zero = torch.zeros_like(root)
            acc = verify.Acceptance(zero, zero, zero, torch.argmax(logits[:, 0], dim=-1))
        elif rule == "greedy" and tree.is_chain:
            a, nxt = verify.chain_greedy(logits, tree_tokens[:, 1:])
            acc = verify.Acceptance(torch.zeros_like(a), a, a, nxt)  # node a of the chain
        elif rule == "greedy":
            acc = verify.greedy_tree(logits, tree_tokens, tree)
        elif rule == "typical":
            acc = verify.typical_tree(logits, tree_tokens, tree, params.temperature, noise=noise)
        else:
            p = probs(logits, params)
            if q is not None and tree.num_leaves == 1:
                a, nxt = verify.chain_speculative(p, tree_tokens[:, 1:], q, noise=noise)
                best = torch.zeros_like(a)
                acc = verify.Acceptance(best, a, tree.retrieve[best, a], nxt)
            else:
                acc = verify.sample_tree(p, tree_tokens, tree, noise=noise)
        bsz = root.shape[0]
        ar = torch.arange(bsz, device=root.device)
        path = tree.retrieve[acc.best]  # [B, D+1] node indices, root first
        d1 = path.shape[1]
        if d1 > 1 and not tree.is_chain:  # KV compaction: the accepted path's K/V to [L, L + D + 1) (a chain's
            # path is there already; entries past a are garbage)
            steps = torch.arange(d1, device=root.device)[None]
            self.cache.compact(lengths[:, None] + path, lengths[:, None] + steps)
        if drafter is not None:
            drafter.accept(hidden, tree_tokens, acc, path)
        # Emitted this step: the a accepted drafts, then `next`  -> [B, D+1], valid up to index a.
        path_tokens = tree_tokens.gather(1, path)
        emitted = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], 1)
        emitted.scatter_(1, acc.accepted[:, None], acc.next[:, None])
        j = torch.arange(d1, device=root.device)[None]
        valid = (j <= acc.accepted[:, None]) & active[:, None]
        dump = self._out.shape[1] - 1
        cols = torch.where(valid, (n_out[:, None] + j).clamp(max=dump - 1), torch.full_like(j, dump))
        self._out[ar[:, None], cols] = emitted
        stop_hit = ((emitted[:, :, None] == self._stop).any(-1) & valid).any(1)
        n_emit = torch.where(active, acc.accepted + 1, torch.zeros_like(acc.accepted))
        new_len = lengths + n_emit
        new_out = n_out + n_emit
        room = new_len + tree.num_nodes <= self.cache.max_seq
        new_active = active & ~stop_hit & (new_out < max_new) & room
        new_hidden = hidden[ar, acc.node]
        new_root = torch.where(active, acc.next, root)
        return new_root, new_hidden, new_len, new_active, new_out, n_steps + active.to(n_steps.dtype)

    # ---------------------------------------------------------------- generation
    def _prepare(self, inputs) -> list[list[int]]:
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.tolist() if inputs.ndim == 2 else [inputs.tolist()]
        if isinstance(inputs, str):
            inputs = [inputs]
        if len(inputs) and isinstance(inputs[0], str):
            if self.tokenizer is None:
                raise ConfigError("text prompts need a tokenizer; pass tokenizer= to Engine or give token ids")
            return [self.tokenizer(s)["input_ids"] for s in inputs]
        if len(inputs) and isinstance(inputs[0], int):
            return [list(inputs)]
        return [list(map(int, p)) for p in inputs]

    def stream(self, inputs, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop_tokens=None, speculative: Drafter | None = None,
               acceptance: str = "lossless", _stats: dict | None = None) -> Iterator[list[list[int]]]:
        """Yield, after the prefill and after every step, the new tokens of each sequence (list per sequence).

        inputs: a string or token-id list, or a batch of them (a list, or a 2-D tensor of equal lengths).
        temperature 0 = greedy. stop_tokens: ids that end a sequence (default: the model's eos id; [] for
        none). speculative: a drafter (e.g. MedusaHeads). acceptance: "lossless" (default; exact for greedy
        and sampling) or "typical" (Medusa's typical acceptance; lossy, sampling only).
        """
        yield from self._run(inputs, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
                             speculative, acceptance, stream=True, stats=_stats)

    def generate(self, inputs, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_tokens=None,
                 speculative: Drafter | None = None, acceptance: str = "lossless") -> GenerationOutput:
        """Generate for a prompt or a batch (see `stream`); returns a GenerationOutput."""
        stats: dict = {}
        tokens = None
        for chunk in self._run(inputs, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
                               speculative, acceptance, stream=False, stats=stats):
            tokens = chunk
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return GenerationOutput(tokens, stats["steps"], stats["tokens_per_step"], texts)

    @torch.inference_mode()
    def _run(self, inputs, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, drafter,
             acceptance, stream, stats):
        params = SamplingParams(temperature, top_k, top_p)
        check_range("max_new_tokens", max_new_tokens, 1, integer=True)
        check_choice("acceptance", acceptance, ("lossless", "typical"))
        if acceptance == "typical" and params.is_greedy:
            raise ConfigError("acceptance='typical' needs temperature > 0; greedy decoding is always lossless")
        prompts = self._prepare(inputs)
        bsz = len(prompts)
        tree = self._root_tree if drafter is None else drafter.tree
        if tree.mask.device != self.device:
            tree = tree.to(self.device)
            if drafter is not None:
                drafter.tree = tree
        need = self.cache.prefix_len + max(len(p) for p in prompts) + max_new_tokens + tree.num_nodes
        if need > self.max_seq_len:
            raise ConfigError(f"prompt + max_new_tokens + tree needs {need} cache slots but max_seq_len="
                              f"{self.max_seq_len}; raise max_seq_len or lower max_new_tokens")
        stop = self._stop_ids(stop_tokens)
        self._stop.fill_(-1)
        if stop:
            self._stop[: len(stop)] = torch.tensor(stop, device=self.device)
        gen = None
        if not params.is_greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        rule = "greedy" if params.is_greedy else ("typical" if acceptance == "typical" else "sample")
        self.noise = None if gen is None else self._step_noise(tree)

        hidden, logits, tokens, lens = self._prefill_prompts(prompts, getattr(drafter, "trunk", False))
        lengths = lens + self.cache.prefix_len
        ar = torch.arange(bsz, device=self.device)
        first = torch.argmax(logits, -1) if params.is_greedy else torch.multinomial(
            probs(logits, params), 1, generator=gen)[:, 0]
        if drafter is not None:
            drafter.start(self, hidden, tokens, lens, first)
        hidden_last = hidden[ar, lens - 1]
        self._out[:bsz, 0] = first
        n_out = torch.ones(bsz, dtype=torch.long, device=self.device)
        max_new = torch.full((bsz,), max_new_tokens, dtype=torch.long, device=self.device)
        active = ~(first[:, None] == self._stop).any(-1) & (n_out < max_new)
        root = first
        state = (root, hidden_last, lengths, active, n_out, torch.zeros_like(n_out))
        sent = [0] * bsz
        if stream:
            yield self._new_tokens(bsz, sent, stop, max_new_tokens, n_out)
        whole_graph = drafter is None or getattr(drafter, "stateless", False)
        noise = self.noise
        lag = self.stop_lag if self.device.type == "cuda" and not stream else 0
        if lag:  # ring of (pinned flag, event): step i's "any active" lands in flags[i % (lag + 1)]
            flags, events = self._stop_ring(lag)
        key = ("step", bsz, id(tree), id(drafter), _params_key(drafter), rule, params,
               None if noise is None else id(noise.buf))
        fn = lambda *s: self._step(tree, drafter, rule, params, noise, *s)  # noqa: E731
        keep = _graph_state(drafter)  # what a capture's warm-ups must leave as it was
        steps = 0
        while steps < max_new_tokens - 1:
            if noise is not None:
                noise.refill(gen)  # this step's random numbers, from the call's generator, outside any graph
            if whole_graph and key not in self._graphs.failed:
                state = self._graphs(key, fn, *state, max_new, keep=keep)
            else:  # (a step whose whole capture failed keeps at least its forward pass in a graph)
                state = self._step(tree, drafter, rule, params, noise, *state, max_new,
                                   graph_forward=self._graphs.enabled)
            steps += 1
            if stream:
                yield self._new_tokens(bsz, sent, stop, max_new_tokens, state[4])
            if not lag:
                if not bool(state[3].any()):
                    break
                continue
            flags[steps % (lag + 1)].copy_(state[3].any(), non_blocking=True)
            events[steps % (lag + 1)].record()
            if steps > lag:
                back = (steps - lag) % (lag + 1)
                events[back].synchronize()
                if not bool(flags[back]):
                    break
        final = self._collect(bsz, stop, max_new_tokens, state[4])
        if stats is not None:
            stats["steps"] = steps
            # tokens per step while active (the first token comes from the prefill)
            stats["tokens_per_step"] = float((state[4] - 1).sum()) / max(1.0, float(state[5].sum()))
        if not stream:
            yield final

    def _step_noise(self, tree: TreeBuffers) -> StepNoise:
        """The step-noise buffer, large enough for any batch with `tree`: per row at most N draws at the nodes,
        k + 1 for a chain's acceptance test and residual, and a drafter's N - 1 sampled drafts. Kept between
        calls (a new one only when a larger tree needs it: graphs are keyed by the buffer)."""
        size = self.max_batch_size * (3 * tree.num_nodes + 8)
        if self._noise is None or self._noise.buf.numel() < size:
            self._noise = StepNoise(size, self.device)
        return self._noise

    def _stop_ring(self, lag: int):
        """(pinned bool [lag + 1], lag + 1 CUDA events), allocated once per engine (pinned memory is slow
        to allocate)."""
        if self._ring is None or len(self._ring[1]) != lag + 1:  # stop_lag may change between calls
            self._ring = (torch.ones(lag + 1, dtype=torch.bool, pin_memory=True),
                          [torch.cuda.Event() for _ in range(lag + 1)])
        return self._ring

    def graphed(self, key, fn, *args):
        """Run fn(*args) through the engine's CUDA-graph cache (captured once per key, replayed after; a plain
        call off the GPU). For drafters whose per-call work is graph-safe (static shapes per key, no host
        reads); outputs are the graph's buffers, overwritten by its next replay."""
        return self._graphs(key, fn, *args)

    def _stop_ids(self, stop_tokens) -> list[int]:
        if stop_tokens is None:
            eos = self.eos_token_id
            stop = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        else:
            stop = [int(s) for s in stop_tokens]
        if len(stop) > _MAX_STOP:
            raise ConfigError(f"at most {_MAX_STOP} stop tokens are supported; got {len(stop)}")
        return stop

    def _collect(self, bsz, stop, max_new, n_out) -> list[list[int]]:
        rows = self._out[:bsz, : max_new + 1].tolist()
        counts = n_out.tolist()
        out = []
        for row, n in zip(rows, counts):
            row = row[: min(n, max_new)]
            for i, t in enumerate(row):
                if t in stop:
                    row = row[: i + 1]
                    break
            out.append(row)
        return out

    def _new_tokens(self, bsz, sent, stop, max_new, n_out) -> list[list[int]]:
        full = self._collect(bsz, stop, max_new, n_out)
        new = []
        for b in range(bsz):
            new.append(full[b][sent[b]:])
            sent[b] = len(full[b])
        return new
