"""What every drafter shares: the engine's drafter protocol, the parts of a Hugging Face model that heads read,
head configs and files, the engine-side copies of head weights, and the teacher-forced losses and accuracies.

Speculative decoding: Leviathan et al. (arXiv 2211.17192) for the lossless rules, Medusa (arXiv 2401.10774) for
candidate trees. The methods live beside this file, one folder each: medusa/, mtp/, parallel/ (and eagle/).

The protocol (`Drafter`), as the engine (engine.py) calls it once per `generate` / `stream` call:

    tree: TreeBuffers          the shape of every proposal (a chain: tree_buffers(chain_paths(k)))
    stateless: bool            True if a step (propose, verify, accept), greedy or sampling, may be captured
                               whole in a CUDA graph: all state in preallocated tensors updated in place, no
                               host reads, randomness only from `engine.noise`
    trunk: bool (optional)     True: every `hidden` below is the input of the target's last decoder layer
                               instead of its final (normed) output (parallel heads draft from it); a tuple
                               of layer ids: the concatenated inputs of those layers, [..., len(ids) * d]
                               (EAGLE-3 drafts from a low, a middle and a high layer)
    graph_version (optional)   bumped whenever the drafter reallocates buffers its graphs read
    graph_state() (optional)   the tensors a step updates in place that position the drafter (committed
                               lengths, the pending state): the engine restores them after a capture's warm-up
                               runs, so that the first step of a call advances them once, not four times
                               (cache slots past them are rewritten before they are read)
    start(engine, hidden [B, T, d], tokens [B, T], lengths [B], root [B]) -> None
                               after the prompt's prefill: its hidden states, its tokens (right-padded), true
                               lengths (prefix excluded) and the first generated token (the first step's root).
                               `engine.noise` is the call's step noise (sampling.StepNoise, None for greedy
                               calls): a drafter that samples draws from it (`noise.categorical(q)` in
                               `propose`), never from a generator of its own, so that every call's draft
                               randomness is fresh, reproducible from its seed, and the step stays capturable
                               in a CUDA graph (the engine refills the noise from the call's generator before
                               each step).
    propose(hidden [B, d], root [B]) -> (tree_tokens [B, N], q [B, N-1, V] | None)
                               hidden: the target's state at the last accepted node (the one whose logits gave
                               `root`). q: the distribution each non-root token was drawn from (sampling chain
                               drafters); None means fixed candidates (argmax / top-k), exact without q.
    accept(hidden [B, N, d], tree_tokens [B, N], acc: Acceptance, path [B, D+1]) -> None
                               after verification: the target's states at all N nodes and the chosen path's
                               node indices (valid up to acc.accepted); the drafter catches its own caches up on
                               the accepted positions, so its state always equals a pass over the committed text.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.errors import ConfigError, FlashtuneError
from flashtune.fileio import atomic_save_safetensors, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from flashtune.decoding.engine import Engine
    from flashtune.decoding.tree import TreeBuffers
    from flashtune.decoding.verify import Acceptance

IGNORE_INDEX = -100


class Drafter(Protocol):
    tree: "TreeBuffers"
    stateless: bool

    def start(self, engine: "Engine", hidden, tokens, lengths, root) -> None: ...
    def propose(self, hidden, root): ...
    def accept(self, hidden, tree_tokens, acc: "Acceptance", path) -> None: ...


# ----------------------------------------------------------------------------------------------------------
# The parts of a Hugging Face decoder-only model that heads read or copy.

def trunk(model) -> nn.Module:
    """The model's decoder stack (LlamaModel, GPT2Model, ...), whose forward gives `last_hidden_state`."""
    inner = getattr(model, "base_model", None)
    if inner is None or inner is model:
        raise FlashtuneError(f"{type(model).__name__} has no decoder stack; pass a causal LM (e.g. LlamaForCausalLM)")
    return inner


def _trunk_part(model, names: tuple[str, str], kind: type, what: str):
    """The decoder stack's attribute named names[0] (Llama family) or names[1] (GPT-2), of type `kind`."""
    inner = trunk(model)
    for name in names:
        part = getattr(inner, name, None)
        if isinstance(part, kind):
            return part
    raise FlashtuneError(f"cannot find the {what} of {type(model).__name__}; supported: Llama-family, GPT-2")


def decoder_layers(model) -> nn.ModuleList:
    return _trunk_part(model, ("layers", "h"), nn.ModuleList, "decoder layers")


def final_norm(model) -> nn.Module:
    return _trunk_part(model, ("norm", "ln_f"), nn.Module, "final norm")


def rotary(model):
    """The base's rotary-embedding module (no parameters), or None for absolute-position models like GPT-2."""
    return getattr(trunk(model), "rotary_emb", None)


def last_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def set_layer_index(block: nn.Module, index: int) -> None:
    """Give a copied decoder layer its own cache index (the attention module asks the cache by this index)."""
    for module in block.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index


def new_block(model, index: int, init: str) -> nn.Module:
    """A decoder layer of the base's own class: a copy of its last layer (init="last_layer") or freshly
    initialized (init="random", the Hugging Face initializer of the base)."""
    last = decoder_layers(model)[-1]
    if init == "last_layer":
        block = copy.deepcopy(last)
    else:
        cls = type(last)
        try:
            block = cls(model.config, layer_idx=index)
        except TypeError:
            block = cls(model.config)
        if hasattr(model, "_init_weights"):
            block.apply(model._init_weights)
        block.to(dtype=last_param(last).dtype, device=last_param(last).device)
    set_layer_index(block, index)
    for p in block.parameters():
        p.requires_grad_(True)
    return block


def rms_norm(model, d: int) -> nn.Module:
    eps = getattr(model.config, "rms_norm_eps", None) or getattr(model.config, "layer_norm_epsilon", 1e-6)
    p = last_param(decoder_layers(model)[-1])
    return nn.RMSNorm(d, eps=eps, device=p.device, dtype=p.dtype)


def causal_mask(positions_q: torch.Tensor, positions_k: torch.Tensor, key_valid: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, q, k]: 0 where key position <= query position (and the key is valid),
    the dtype's minimum elsewhere. positions_q [B, q], positions_k [B, k], key_valid [B, k] bool or None."""
    allowed = positions_k[:, None, :] <= positions_q[:, :, None]  # [B, q, k]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def sequence_mask(B: int, T: int, attention_mask, dtype, device):
    """(positions [B, T], additive mask [B, 1, T, T]) for a teacher-forced pass over whole sequences; the
    diagonal is always open so that padded rows never softmax over nothing."""
    positions = torch.arange(T, device=device).expand(B, T)
    valid = attention_mask.bool() if attention_mask is not None else None
    mask = causal_mask(positions, positions, valid, dtype)
    return positions, mask.masked_fill(torch.eye(T, dtype=torch.bool, device=device), 0.0)


def run_block(block: nn.Module, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rope,
              cache=None) -> torch.Tensor:
    """One Hugging Face decoder layer on x [B, q, d] at `positions` [B, q], additive mask [B, 1, q, k]."""
    kwargs = {}
    if rope is not None:
        kwargs["position_embeddings"] = rope(x, positions)
    out = block(x, attention_mask=mask, position_ids=positions, past_key_values=cache, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def base_dims(model) -> dict:
    """What a heads file records about the base it was trained for."""
    cfg = model.config
    return {"model_type": cfg.model_type, "hidden_size": getattr(cfg, "hidden_size", None) or cfg.n_embd,
            "vocab_size": cfg.vocab_size, "num_base_layers": len(decoder_layers(model))}


def check_dims(saved: dict, have: dict, where: str) -> None:
    """Raise one line unless the dims a heads file was trained for (`saved`) match the model's (`have`)."""
    for key in ("model_type", "hidden_size", "vocab_size"):
        if key in have and saved.get(key) not in (None, "", 0, have[key]):
            raise FlashtuneError(f"{where} were trained for a model with {key}={saved[key]!r} but this model has "
                                 f"{key}={have[key]!r}; load them with the base model they were trained for")


def check_base(saved: dict, model) -> None:
    """Raise unless the base model has the shape the heads were trained for."""
    check_dims(saved, base_dims(model), "these heads")


class BoundToBase:
    """Mixin for drafter modules that use the base model's embedding, output head and rotary tables without
    owning them (MTP modules, parallel heads): `bind(model)` checks the shapes and keeps a reference outside
    the module tree, so the base is never saved, moved or trained with the drafter. Needs `self.config`
    (a dataclass of the base's dimensions) and `self.logits(m, x)`."""

    def bind(self, model) -> None:
        check_base(dataclasses.asdict(self.config), model)
        self.__dict__["_base"] = model  # not a registered submodule

    @property
    def base(self):
        return self.__dict__["_base"]

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def offset_logits(self, m: int, x: torch.Tensor) -> torch.Tensor:  # the training interface's name
        return self.logits(m, x)


def check_engine(saved: dict, engine, what: str) -> None:
    """The same check against a decoding engine (its compact copy of the target)."""
    a = engine.model.args
    check_dims(saved, {"hidden_size": a.dim, "vocab_size": a.vocab_size}, what)


# ----------------------------------------------------------------------------------------------------------
# Configs and head files.

@dataclasses.dataclass
class BaseDims:
    """The base model a drafter binds to, as `base_dims(model)` reads it when the drafter is built (MTP
    modules, parallel heads) and `check_base` compares it when a file is loaded."""

    model_type: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    num_base_layers: int = 0


class DraftConfig:
    """Mixin for the drafters' config dataclasses: JSON round trip with a `method` tag, unknown fields refused."""

    METHOD: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"method": self.METHOD, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"a {cls.METHOD} config must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"method"}
        if unknown:
            raise ConfigError(f"unknown {cls.METHOD} config field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        if d.get("method", cls.METHOD) != cls.METHOD:
            raise ConfigError(f"this config is for method {d['method']!r}, not {cls.METHOD!r}; "
                              f"pass --speculative {d['method']}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:  # a field of the wrong type that the dataclass check did not name
            raise ConfigError(f"bad {cls.METHOD} config: {exc}") from None


def write_heads(directory, tensors: dict, config, config_name: str, weights_name: str) -> Path:
    """Write `config.to_dict()` and `tensors` into `directory` (config_name + weights_name), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_save_safetensors(directory / weights_name, tensors, {"format": "pt"})
    atomic_write_json(directory / config_name, config.to_dict())
    return directory


def read_json(path) -> dict:
    """A JSON file, or one line naming the file when it is not readable JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlashtuneError(f"{path} is not a readable JSON file ({type(exc).__name__}); re-create it "
                             "(re-train or re-export the heads)") from None


def read_tensors(path) -> dict[str, torch.Tensor]:
    """A safetensors file, or one line naming the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FlashtuneError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:80]}); "
                             "re-train or re-export the heads") from None


def read_heads(directory, config_cls, what: str, config_name: str, weights_name: str, model=None):
    """(config, tensors) written by `write_heads`, after checking the files exist, parse, and fit `model`."""
    directory = Path(directory)
    if not (directory / config_name).is_file() or not (directory / weights_name).is_file():
        raise FlashtuneError(f"{directory} holds no {what} ({config_name} + {weights_name}); "
                             f"train them with `flashtune train-heads --method {config_cls.METHOD}`")
    config = config_cls.from_dict(read_json(directory / config_name))
    if model is not None:
        check_dims(dataclasses.asdict(config), base_dims(model), f"the {what} in {directory}")
    return config, read_tensors(directory / weights_name)


def check_state(module: nn.Module, state: dict, path) -> None:
    """Raise one line unless `state` has exactly the module's tensor names and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise FlashtuneError(f"{path} does not match its config (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); the file is damaged or for another model")
    for name, t in own.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise FlashtuneError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected "
                                 f"{tuple(t.shape)}; the file is for another model")


class CatchUpState:
    """For drafters that keep their own caches, positioned by `L` (the committed lengths, long [max batch]) and
    `_pending` (the state the next proposal starts from): graph-safe (`stateless`), and `graph_state` names
    those two for the engine to keep through a capture's warm-up runs."""

    stateless = True

    def graph_state(self) -> tuple:
        return (self.L, self._pending)


# ----------------------------------------------------------------------------------------------------------
# Engine-side copies of head weights (decoding/model.py's compact classes: fused, static cache, graph-safe).

def compact_block(hf_block: nn.Module, engine) -> nn.Module:
    """The engine's own compact decoder block loaded with a Hugging Face decoder layer's weights, on the
    engine's device and dtype (with the engine's CUDA arithmetic when it runs it)."""
    from flashtune.decoding.model import Block, _convert

    a = dataclasses.replace(engine.model.args, n_layers=1)
    empty = torch.empty(0)
    if a.arch == "llama":
        sd = {f"model.layers.0.{k}": v for k, v in hf_block.state_dict().items()}
        sd.update({"model.embed_tokens.weight": empty, "model.norm.weight": empty})
    else:
        sd = {f"transformer.h.0.{k}": v for k, v in hf_block.state_dict().items()}
        sd.update({f"transformer.{k}": empty for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")})
    own = {k[len("layers.0."):]: v for k, v in _convert(a, sd).items() if k.startswith("layers.0.")}
    block = Block(a)
    block.load_state_dict(own)
    if engine.model.fast:  # the engine's CUDA arithmetic (model.DecoderModel.enable_fast), for this block too
        rows = a.n_heads * a.head_dim
        with torch.no_grad():
            block.wqkv.weight[:rows] *= a.head_dim ** -0.5
            if block.wqkv.bias is not None:
                block.wqkv.bias[:rows] *= a.head_dim ** -0.5
        for m in block.modules():
            if hasattr(m, "fused"):
                m.fused = True
    return block.to(device=engine.device, dtype=engine.dtype).eval()


def engine_norm(norm: nn.Module, engine) -> nn.Module:
    """An RMSNorm as the engine's own class (one fused kernel on CUDA), a LayerNorm as is; on the engine's
    device and dtype."""
    from flashtune.decoding.model import RMSNorm

    if isinstance(norm, nn.LayerNorm):
        out = copy.deepcopy(norm)
    else:
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        out = RMSNorm(norm.weight.shape[0], eps)
        with torch.no_grad():
            out.weight.copy_(norm.weight)
        out.fused = engine.model.fast
    return out.to(device=engine.device, dtype=engine.dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# Training: the base and its heads as one module, and the teacher-forced losses every method shares.
#
# A heads module used for training provides
#     features(model, input_ids, attention_mask) -> (hidden [B, T, d], feats): the base's final hidden state
#                                                  and what the heads read (the same, or the trunk's z)
#     offsets(feats, input_ids, attention_mask) -> list of K tensors [B, T, d']: entry m at position t
#                                                  predicts token t + m + 2
#     offset_logits(m, x [..., d']) -> logits [..., V]

class WithHeads(nn.Module):
    """The base model plus its heads, as one module for a training loop: every trainable parameter (the heads,
    and whatever of the base requires grad, e.g. LoRA) is found by `.parameters()`."""

    def __init__(self, model, heads: nn.Module):
        super().__init__()
        self.model = model
        self.heads = heads

    def base_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())


def batch_labels(batch: dict) -> tuple:
    """(input_ids, attention_mask, labels) of a batch; labels default to input_ids with padding ignored."""
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids, mask, labels


def offset_losses(heads, outs: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of offset m (predicting t + m + 2) against the labels, over positions with a label; only
    those positions go through the (vocabulary-sized) output layer. A term without labels is 0."""
    T = labels.shape[1]
    losses = []
    for m, out in enumerate(outs):
        shift = m + 2
        if T <= shift:
            raise FlashtuneError(f"sequences of {T} tokens are too short for {len(outs)} draft offsets; use "
                                 f"sequences longer than {len(outs) + 1} tokens or fewer heads")
        target = labels[:, shift:]
        valid = target != IGNORE_INDEX
        x = out[:, : T - shift][valid]  # [n, d']
        if x.shape[0] == 0:
            losses.append(out.sum() * 0.0)
            continue
        losses.append(F.cross_entropy(heads.offset_logits(m, x).float(), target[valid]))
    return losses


def lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor, teacher_logits=None) -> torch.Tensor:
    """The base's own next-token loss from its final hidden state [B, T, d]: cross-entropy, or with
    `teacher_logits` [B, T, V] the KL(teacher || student) of self-distillation."""
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][valid]).float()  # [n, V]
    if teacher_logits is None:
        return F.cross_entropy(logits, target[valid])
    teacher = teacher_logits[:, :-1][valid].float()
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


@torch.no_grad()
def offset_accuracy(wrapper: WithHeads, batches, topk: int = 1) -> torch.Tensor:
    """Teacher-forced top-k table [K, topk]: acc[m, j] = share of labelled positions where offset m's rank-j
    candidate is the right token."""
    heads = wrapper.heads
    dev = last_param(heads).device
    hits = counts = None
    for batch in batches:
        ids, mask, labels = batch_labels({k: v.to(dev) for k, v in batch.items()})
        _, feats = heads.features(wrapper.model, ids, mask)
        outs = heads.offsets(feats, ids, mask)
        if hits is None:
            hits = torch.zeros(len(outs), topk, dtype=torch.float64)
            counts = torch.zeros(len(outs), dtype=torch.float64)
        T = ids.shape[1]
        for m, out in enumerate(outs):
            shift = m + 2
            if T <= shift:
                continue
            target = labels[:, shift:]
            valid = target != IGNORE_INDEX
            top = torch.topk(heads.offset_logits(m, out[:, : T - shift][valid]), topk, dim=-1).indices  # [n, k]
            hits[m] += (top == target[valid][:, None]).sum(0).double().cpu()
            counts[m] += float(valid.sum())
    if hits is None:
        raise FlashtuneError("no held-out batches to measure the heads on; use more prompts")
    return hits / counts.clamp_min(1)[:, None]


class HeadsLoss:
    """`loss_fn(wrapper, batch)` for a training loop: main + Σ_m w_m·CE_m, where CE_m is offset m's loss
    (`offset_losses`), w_m comes from `weights()` and `main` is the base's own LM loss when the base trains
    (`joint`; with `distill`, the KL to the base with its adapters disabled). `last` keeps the parts."""

    name = "head"  # log keys: f"{name}_{m + key_offset}"
    key_offset = 1

    def __init__(self, distill: bool = False):
        self.distill = distill
        self.last: dict = {}

    def weights(self, n: int, wrapper, labels) -> list[float]:
        return [1.0] * n

    def joint(self, wrapper) -> bool:
        return wrapper.base_trainable() and wrapper.training

    def __call__(self, wrapper: WithHeads, batch: dict) -> torch.Tensor:
        ids, mask, labels = batch_labels(batch)
        joint = self.joint(wrapper)
        heads = wrapper.heads
        with torch.set_grad_enabled(joint and torch.is_grad_enabled()):
            hidden, feats = heads.features(wrapper.model, ids, mask)
        if not joint:
            feats = feats.detach()
        losses = offset_losses(heads, heads.offsets(feats, ids, mask), labels)
        w = self.weights(len(losses), wrapper, labels)
        loss = sum(wi * li for wi, li in zip(w, losses))
        main = None
        if joint:
            teacher = None
            if self.distill:
                from flashtune.tuners import disable_adapters

                with torch.no_grad(), disable_adapters(wrapper.model):
                    teacher = wrapper.model(input_ids=ids, attention_mask=mask).logits
            main = lm_loss(wrapper.model, hidden, labels, teacher)
            loss = main + loss
        self.last = {"main": None if main is None else float(main.detach()),
                     **{f"{self.name}_{m + self.key_offset}": float(x.detach()) for m, x in enumerate(losses)}}
        return loss
