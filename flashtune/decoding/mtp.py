"""Multi-token prediction (MTP) modules in the style of DeepSeek-V3, trained on a base model and used as drafts.

Paper: "DeepSeek-V3 Technical Report", DeepSeek-AI, arXiv 2412.19437, §2.2 (Multi-Token Prediction).

Module k (k = 1..D) at trunk position i reads the previous depth's hidden state h^{k-1}_i (h^0 = the base
model's final hidden state, after its final norm) and the embedding of the token t_{i+k}:

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      2d -> d, no bias
    h^k_i  = block_k(h'^k_{<=i})                                     one causal decoder layer of the base's type
    P^k    = softmax(lm_head(shared_head.norm(h^k_i)))               predicts t_{i+k+1}

The concatenation order [embedding; hidden] is the one of DeepSeek-V3's released weights (its paper writes
the reverse). Emb and lm_head are the base model's own tensors (bound, never copied or saved). The block is
an instance of the base model's own Hugging Face decoder-layer class (LlamaDecoderLayer, Qwen2DecoderLayer,
GPT2Block, ...), so any model family whose layers transformers implements works. RoPE positions are the trunk
indices i.

Files: `mtp_config.json` + `mtp.safetensors`, tensors named as DeepSeek-V3 names its MTP layer,
`model.layers.{N + k - 1}.{enorm,hnorm,eh_proj,shared_head.norm,self_attn...,mlp...}.weight` with N the base
model's number of layers; `load_state_dict_deepseek` reads that layout (the shared `embed_tokens` and
`shared_head.head` tensors, if present, are skipped: the base's are used).

Loss (SPEC §2.2): L^k is the cross-entropy of P^k_i against t_{i+k+1}; L_MTP = (λ/D)·Σ_k L^k, added to the
main LM loss when the trunk is trained too. λ follows a step schedule in training tokens (0.3, then 0.1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashtune.decoding.model import RMSNorm, SlotMask, prepare_mask
from flashtune.errors import ConfigError, FlashtuneError, check_choice, check_range
from flashtune.fileio import atomic_save_safetensors, atomic_write_json

CONFIG_NAME = "mtp_config.json"
WEIGHTS_NAME = "mtp.safetensors"
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# Reading the parts of a Hugging Face decoder-only model that the MTP modules (and the parallel heads) share.

def trunk(model) -> nn.Module:
    """The model's decoder stack (LlamaModel, GPT2Model, ...), whose forward gives `last_hidden_state`."""
    inner = getattr(model, "base_model", None)
    if inner is None or inner is model:
        raise FlashtuneError(f"{type(model).__name__} has no decoder stack; pass a causal LM (e.g. LlamaForCausalLM)")
    return inner


def decoder_layers(model) -> nn.ModuleList:
    inner = trunk(model)
    for name in ("layers", "h"):
        layers = getattr(inner, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise FlashtuneError(f"cannot find the decoder layers of {type(model).__name__}; supported: Llama-family, GPT-2")


def final_norm(model) -> nn.Module:
    inner = trunk(model)
    for name in ("norm", "ln_f"):
        norm = getattr(inner, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise FlashtuneError(f"cannot find the final norm of {type(model).__name__}; supported: Llama-family, GPT-2")


def rotary(model):
    """The base's rotary-embedding module (no parameters), or None for absolute-position models like GPT-2."""
    return getattr(trunk(model), "rotary_emb", None)


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
        block.apply(model._init_weights) if hasattr(model, "_init_weights") else None
        block.to(dtype=last_param(last).dtype, device=last_param(last).device)
    set_layer_index(block, index)
    for p in block.parameters():
        p.requires_grad_(True)
    return block


def last_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


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


def run_block(block: nn.Module, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rope,
              cache=None) -> torch.Tensor:
    """One Hugging Face decoder layer on x [B, q, d] at `positions` [B, q], additive mask [B, 1, q, k]."""
    kwargs = {}
    if rope is not None:
        kwargs["position_embeddings"] = rope(x, positions)
    out = block(x, attention_mask=mask, position_ids=positions, past_key_values=cache, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def rms_norm(model, d: int) -> nn.Module:
    eps = getattr(model.config, "rms_norm_eps", None) or getattr(model.config, "layer_norm_epsilon", 1e-6)
    p = last_param(decoder_layers(model)[-1])
    return nn.RMSNorm(d, eps=eps, device=p.device, dtype=p.dtype)



def write_heads(directory, tensors: dict, config, config_name: str = CONFIG_NAME,
                weights_name: str = WEIGHTS_NAME) -> Path:
    """Write `config.to_dict()` and `tensors` into `directory` (config_name + weights_name), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / weights_name, tensors, {"format": "pt"})
    atomic_write_json(directory / config_name, config.to_dict())
    return directory


def read_heads(directory, config_cls, model, what: str, method: str, config_name: str = CONFIG_NAME,
               weights_name: str = WEIGHTS_NAME):
    """(config, tensors) written by `write_heads`, after checking the files exist and fit `model`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / config_name).is_file() or not (directory / weights_name).is_file():
        raise FlashtuneError(f"{directory} holds no {what} ({config_name} + {weights_name}); "
                             f"train them with `flashtune train-heads --method {method}`")
    config = config_cls.from_dict(json.loads((directory / config_name).read_text()))
    check_base(asdict(config), model)
    return config, load_file(str(directory / weights_name))


def check_base(saved: dict, model) -> None:
    """Raise unless the base model has the shape the modules were trained for."""
    cfg = model.config
    want = {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd,
            "vocab_size": cfg.vocab_size}
    for key, value in want.items():
        if saved.get(key) not in (None, "", 0, value):
            raise FlashtuneError(f"heads were trained for {key}={saved[key]!r} but the base model has {value!r}; "
                                 f"load them with the base model they were trained on")


def base_dims(model) -> dict:
    cfg = model.config
    return {"model_type": cfg.model_type, "hidden_size": getattr(cfg, "hidden_size", None) or cfg.n_embd,
            "vocab_size": cfg.vocab_size, "num_base_layers": len(decoder_layers(model))}


# ----------------------------------------------------------------------------------------------------------

@dataclass
class MTPConfig:
    """MTP modules. depth: D modules in sequence. λ is `lambda_initial` for the first `lambda_switch_tokens`
    training tokens (None: always), then `lambda_final` (DeepSeek-V3: 0.3 for 10T tokens, then 0.1).
    recycle: which output of a module feeds the next one ("pre_norm" as DeepSeek-V3 trains and vLLM drafts,
    "post_norm" as SGLang drafts). init: the block starts as a copy of the base's last layer or at random.
    The remaining fields describe the base model and are filled in by `MTPModules.build`."""

    depth: int = 1
    lambda_initial: float = 0.3
    lambda_final: float = 0.1
    lambda_switch_tokens: int | None = None
    recycle: str = "pre_norm"
    init: str = "last_layer"
    model_type: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    num_base_layers: int = 0

    def __post_init__(self):
        check_range("depth", self.depth, 1, 16, integer=True)
        check_range("lambda_initial", self.lambda_initial, 0.0)
        check_range("lambda_final", self.lambda_final, 0.0)
        if self.lambda_switch_tokens is not None:
            check_range("lambda_switch_tokens", self.lambda_switch_tokens, 0, integer=True)
        check_choice("recycle", self.recycle, ("pre_norm", "post_norm"))
        check_choice("init", self.init, ("last_layer", "random"))

    def lam(self, tokens_seen: int) -> float:
        """λ after `tokens_seen` training tokens."""
        if self.lambda_switch_tokens is not None and tokens_seen >= self.lambda_switch_tokens:
            return self.lambda_final
        return self.lambda_initial

    def to_dict(self) -> dict:
        return {"method": "mtp", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MTPConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"method"}
        if unknown:
            raise ConfigError(f"unknown MTP config field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


class SharedHead(nn.Module):
    """DeepSeek-V3's `shared_head`: its own final norm; the output projection is the base's lm_head."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm


class MTPLayer(nn.Module):
    """One MTP module: enorm, hnorm, eh_proj, a decoder block and shared_head.norm (names as DeepSeek-V3)."""

    def __init__(self, model, index: int, init: str):
        super().__init__()
        d = base_dims(model)["hidden_size"]
        p = last_param(decoder_layers(model)[-1])
        self.enorm = rms_norm(model, d)
        self.hnorm = rms_norm(model, d)
        self.eh_proj = nn.Linear(2 * d, d, bias=False, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            # [embedding half | hidden half]: the hidden half starts as the identity so that a new module
            # begins as "the base's last layer applied again", the embedding half small and random.
            self.eh_proj.weight.normal_(0.0, 0.02)
            self.eh_proj.weight[:, d:].copy_(torch.eye(d, dtype=p.dtype, device=p.device))
        self.block = new_block(model, index, init)
        self.shared_head = SharedHead(copy.deepcopy(final_norm(model)))
        for q in self.shared_head.parameters():
            q.requires_grad_(True)

    def forward(self, h: torch.Tensor, e: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rope,
                cache=None) -> torch.Tensor:
        """h [B, q, d] previous depth's hidden, e [B, q, d] embeddings of the tokens one ahead -> [B, q, d]
        (the block's output, before shared_head.norm)."""
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))  # [B, q, 2d] -> [B, q, d]
        return run_block(self.block, x, positions, mask, rope, cache)


class MTPModules(nn.Module):
    """D MTP modules bound to a base causal LM (its embedding, lm_head and rotary tables are shared).

    Build new ones with `MTPModules.build(model, depth=...)`, or load with `MTPModules.load(dir, model)`.
    """

    def __init__(self, config: MTPConfig, model, fresh: bool = False):
        super().__init__()
        self.config = config
        # fresh: new layers of the base's class rather than copies (for loading, and for a base whose last
        # layer already carries LoRA wrappers)
        init = "random" if fresh else config.init
        self.layers = nn.ModuleList(MTPLayer(model, m, init) for m in range(config.depth))
        self.bind(model)

    @classmethod
    def build(cls, model, depth: int = 1, **kwargs) -> "MTPModules":
        """New modules for `model` (build them before attaching LoRA to it: the block copies its last layer)."""
        return cls(MTPConfig(depth=depth, **kwargs, **base_dims(model)), model)

    def bind(self, model) -> None:
        """Share the base's embedding, output head and rotary tables: the same tensors, never copies."""
        check_base(asdict(self.config), model)
        self.__dict__["_base"] = model  # not a registered submodule: not saved, not moved, not trained here

    @property
    def base(self):
        return self.__dict__["_base"]

    @property
    def embed_tokens(self) -> nn.Module:
        return self.base.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def logits(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """Module m's output [B, q, d] -> logits [B, q, V]."""
        normed = self.layers[m].shared_head.norm(out)
        return self.lm_head(normed.to(self.lm_head.weight.dtype))

    def recycled(self, m: int, out: torch.Tensor) -> torch.Tensor:
        """What module m passes on to the next depth."""
        return self.layers[m].shared_head.norm(out) if self.config.recycle == "post_norm" else out

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Teacher-forced pass over whole sequences.

        hidden [B, T, d]: the base's final hidden states; input_ids [B, T]; attention_mask [B, T] (1 = token).
        Returns a list of D tensors [B, T, d]: entry k-1 at position i is module k's output h^k_i, which
        predicts token i+k+1 (positions i > T-k-2 have no target and only see padding ahead).
        """
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        valid = attention_mask.bool() if attention_mask is not None else None
        mask = causal_mask(positions, positions, valid, hidden.dtype)
        mask = mask.masked_fill(torch.eye(T, dtype=torch.bool, device=mask.device), 0.0)  # no empty rows
        rope = rotary(self.base)
        dtype = self.layers[0].eh_proj.weight.dtype  # the modules may train in fp32 on a bf16 base
        outs, h = [], hidden.to(dtype)
        mask = mask.to(dtype)
        for m, layer in enumerate(self.layers):
            k = m + 1
            ahead = F.pad(input_ids[:, k:], (0, k), value=0)  # [B, T]: token i+k at position i
            out = layer(h, self.embed_tokens(ahead).to(dtype), positions, mask, rope)
            outs.append(out)
            h = self.recycled(m, out)
        return outs

    def depth_losses(self, outs: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """Cross-entropy L^k of each module against labels shifted by k+1 (label -100 is ignored)."""
        losses = []
        for m, out in enumerate(outs):
            shift = m + 2
            T = labels.shape[1]
            if T <= shift:
                raise FlashtuneError(f"sequences of {T} tokens are too short for MTP depth {m + 1}; "
                                     f"use sequences longer than {shift} tokens or a smaller depth")
            logits = self.logits(m, out[:, : T - shift])  # [B, T-k-1, V]
            target = labels[:, shift:]  # [B, T-k-1]
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          ignore_index=IGNORE_INDEX))
        return losses

    # ---- files ---------------------------------------------------------------------------------------
    def deepseek_state_dict(self) -> dict[str, torch.Tensor]:
        """Own tensors under DeepSeek-V3 names: model.layers.{N+m}.<name>, the block's names unprefixed."""
        out = {}
        first = self.config.num_base_layers
        for m, layer in enumerate(self.layers):
            for name, t in layer.state_dict().items():
                name = name[len("block."):] if name.startswith("block.") else name
                out[f"model.layers.{first + m}.{name}"] = t
        return out

    def load_state_dict_deepseek(self, tensors: dict[str, torch.Tensor], first_layer: int | None = None) -> None:
        """Load tensors named as DeepSeek-V3's MTP layers (layer index `first_layer` + m for module m; by
        default the smallest layer index that holds an `eh_proj`). eh_proj's input is [enorm(emb); hnorm(h)]."""
        if first_layer is None:
            found = sorted(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.") and ".eh_proj." in k)
            if not found:
                raise FlashtuneError("no `model.layers.N.eh_proj.weight` tensor found; these are not MTP weights")
            first_layer = found[0]
        for m, layer in enumerate(self.layers):
            prefix = f"model.layers.{first_layer + m}."
            own = layer.state_dict()
            state = {}
            for name in own:
                file_name = prefix + (name[len("block."):] if name.startswith("block.") else name)
                if file_name not in tensors:
                    raise FlashtuneError(f"MTP weights miss {file_name}; the file is for another model or depth")
                if tensors[file_name].shape != own[name].shape:
                    raise FlashtuneError(f"{file_name} has shape {tuple(tensors[file_name].shape)}, expected "
                                         f"{tuple(own[name].shape)}; the weights are for another base model")
                state[name] = tensors[file_name]
            layer.load_state_dict(state)

    def save(self, directory) -> Path:
        """Write mtp_config.json + mtp.safetensors (DeepSeek-V3 tensor names) into `directory`, atomically."""
        return write_heads(directory, self.deepseek_state_dict(), self.config)

    @classmethod
    def load(cls, directory, model) -> "MTPModules":
        """Modules saved by `save`, bound to `model` (which must be the base they were trained on)."""
        config, tensors = read_heads(directory, MTPConfig, model, "MTP modules", "mtp")
        mtp = cls(config, model, fresh=True)
        mtp.load_state_dict_deepseek(tensors, first_layer=config.num_base_layers)
        return mtp


# ----------------------------------------------------------------------------------------------------------
# Training: the base and the modules in one nn.Module (so `fit` finds every trainable parameter), and the loss.

class WithMTP(nn.Module):
    """The base model plus its MTP modules, for `flashtune.training.fit`. Trainable parameters: the MTP
    modules, and whatever of the base requires grad (LoRA after `attach`, for joint training)."""

    def __init__(self, model, mtp: MTPModules):
        super().__init__()
        self.model = model
        self.mtp = mtp

    def base_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())


class MTPLoss:
    """`loss_fn(wrapper, batch)` for `fit`: L = [L_main if the base trains] + (λ/D)·Σ_k L^k.

    batch: `input_ids` [B, T], optional `attention_mask` [B, T], optional `labels` [B, T] (-100 = ignored;
    default: input_ids with padding ignored). λ comes from the config's schedule over the tokens this loss
    has seen (`tokens_seen`, counted from non-ignored labels; set it when resuming). `last` keeps the most
    recent parts (main, per-depth, λ) for logging.
    """

    def __init__(self, config: MTPConfig, tokens_seen: int = 0):
        self.config = config
        self.tokens_seen = tokens_seen
        self.last: dict = {}

    def __call__(self, wrapper: WithMTP, batch: dict) -> torch.Tensor:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        joint = wrapper.base_trainable() and wrapper.training
        with torch.set_grad_enabled(joint and torch.is_grad_enabled()):
            hidden = trunk(wrapper.model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not joint:
            hidden = hidden.detach()
        lam = self.config.lam(self.tokens_seen)
        depth = wrapper.mtp(hidden, input_ids, attention_mask)
        depth_losses = wrapper.mtp.depth_losses(depth, labels)
        loss = (lam / self.config.depth) * torch.stack(depth_losses).sum()
        main = None
        if joint:
            logits = wrapper.model.get_output_embeddings()(hidden[:, :-1]).float()  # [B, T-1, V]
            main = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            loss = loss + main
        if wrapper.training:
            self.tokens_seen += int((labels != IGNORE_INDEX).sum())
        self.last = {"lambda": lam, "main": None if main is None else float(main.detach()),
                     **{f"mtp_{m + 1}": float(x.detach()) for m, x in enumerate(depth_losses)}}
        return loss


# ----------------------------------------------------------------------------------------------------------
# Drafting: the modules as a speculative drafter for `Engine.generate(..., speculative=MTPDrafter(...))`.

def _compact_block(hf_block: nn.Module, engine) -> nn.Module:
    """The engine's own compact decoder block (model.py: fused q/k/v, static cache, CUDA-graph safe) loaded
    with an MTP block's Hugging Face weights, on the engine's device and dtype."""
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


def _engine_norm(norm: nn.Module, engine) -> nn.Module:
    """An RMSNorm as the engine's own class (one fused kernel on CUDA), a LayerNorm as is; on the engine's
    device and dtype."""
    if isinstance(norm, nn.LayerNorm):
        out = copy.deepcopy(norm)
    else:
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        out = RMSNorm(norm.weight.shape[0], eps)
        with torch.no_grad():
            out.weight.copy_(norm.weight)
        out.fused = engine.model.fast
    return out.to(device=engine.device, dtype=engine.dtype).eval()


class MTPDrafter:
    """Drafts k tokens per step with MTP modules (module j mod D at step j, DeepSeek-V3 §2.3 / vLLM), verified
    by the engine in one forward pass with the lossless rules of verify.py.

    k: drafted tokens per step. tree_width: 1 drafts a chain; c > 1 also offers the top-c candidates of every
    step as siblings of the chain's node (a tree verified by the tree rules; the chain continues from the top-1).
    temperature: None drafts argmax tokens (one-hot q); a number samples drafts from softmax(logits / T) and
    hands that q to speculative sampling (chain only). seed seeds the draft sampler.

    The modules keep their own static KV cache (the engine's KVCache class, one layer per module, slot =
    position). After each verification the accepted positions are fed through the modules again ("catch-up"),
    so module 1's cache always holds exactly what training computed: (h^0_i, t_{i+1}) for every committed i.
    The catch-up's last accepted position reads the new root, so module 1's output there is the next step's
    first draft: it is kept (`_pending`) and the next `propose` starts from it instead of running module 1
    again (one module pass per step saved).
    Modules 2..D are caught up on the same positions with the tokens then known (exact where t_{i+m} was
    accepted). All state lives in preallocated tensors updated in place, so a greedy step (propose, verify,
    accept) is captured whole in the engine's CUDA graph; `stateless` is therefore True (graph-safe).
    """

    stateless = True

    def __init__(self, mtp: MTPModules, k: int = 3, tree_width: int = 1, temperature: float | None = None,
                 seed: int = 0):
        from flashtune.decoding.tree import tree_buffers

        check_range("k", k, 1, 16, integer=True)
        check_range("tree_width", tree_width, 1, 16, integer=True)
        if temperature is not None:
            check_range("temperature", temperature, 0.0, low_open=True)
            if tree_width > 1:
                raise ConfigError("sampled drafts (temperature) need tree_width=1; trees use argmax candidates")
        self.mtp, self.k, self.width, self.temperature, self.seed = mtp, k, tree_width, temperature, seed
        paths = [[0] * (j - 1) + [i] for j in range(1, k + 1) for i in range(tree_width)]
        self.tree = tree_buffers(paths, topk=tree_width)  # node 1 + (j-1)*c + i: rank i at depth j
        self._engine = None
        self.trace: list | None = None  # set to [] to record each step's first-draft q/logits and acceptance

    def acceptance_stats(self) -> dict:
        """Since the last `start`: steps (summed over rows), the share of steps whose first draft was accepted,
        and the mean tokens per step (accepted drafts + 1). Rows that finished early still count their extra
        steps; pass stop_tokens=[] and equal lengths for clean numbers."""
        steps, first, accepted = (float(x) for x in self._stats)
        return {"row_steps": steps, "first_token_acceptance": first / max(steps, 1.0),
                "mean_accepted_length": accepted / max(steps, 1.0) + 1.0}

    # ---- setup ---------------------------------------------------------------------------------------
    def _setup(self, engine) -> None:
        """Device copies of the modules as engine blocks, and the static cache and counters."""
        dev, dt = engine.device, engine.dtype
        layers = self.mtp.layers
        self.blocks = [_compact_block(layer.block, engine) for layer in layers]
        self.enorm = [_engine_norm(layer.enorm, engine) for layer in layers]
        self.hnorm = [_engine_norm(layer.hnorm, engine) for layer in layers]
        self.eh_proj = [copy.deepcopy(layer.eh_proj).to(dev, dt).eval() for layer in layers]
        self.head_norm = [_engine_norm(layer.shared_head.norm, engine) for layer in layers]
        a = engine.model.args
        self.slots = engine.max_seq_len + 2 * (self.k + 2)
        from flashtune.decoding.cache import KVCache

        self.cache = KVCache(len(layers), engine.max_batch_size, a.n_kv_heads, self.slots, a.head_dim, dt, dev)
        self.L = torch.zeros(engine.max_batch_size, dtype=torch.long, device=dev)  # = the engine's lengths
        self.first = 0  # slots [0, first) hold a prefix-tuning prefix in the engine; the modules skip them
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(self.seed)
        self._stats = torch.zeros(3, dtype=torch.long, device=dev)  # row steps, first accepted, accepted
        # module 1's output at trunk position L - 1 with token t_L (the root): the next first draft's state
        self._pending = torch.zeros(engine.max_batch_size, a.dim, dtype=dt, device=dev)
        self._engine = engine
        self.graph_version = getattr(self, "graph_version", 0) + 1  # graphs of older buffers are stale

    # ---- one pass of all modules over some positions -------------------------------------------------
    def _module(self, m: int, h, tokens, slots, mask):
        """Module m on h [B, q, d] and next tokens [B, q] at cache slots [B, q] -> output [B, q, d]."""
        model = self._engine.model
        e = model.embed(tokens)
        en, hn = self.enorm[m], self.hnorm[m]
        if model.backend == "triton" and isinstance(en, RMSNorm) and isinstance(hn, RMSNorm):
            from flashtune.decoding.kernels import rms_norm_pair

            d = e.shape[-1]
            cat = rms_norm_pair(e.reshape(-1, d), h.reshape(-1, d), en.weight, hn.weight, en.eps, hn.eps)
            cat = cat.view(*e.shape[:-1], 2 * d)
        else:
            cat = torch.cat([en(e), hn(h)], dim=-1)
        x = self.eh_proj[m](cat)  # [B, q, 2d] -> [B, q, d]
        rope = model.rope(slots, x.dtype)
        a = model.args
        mask = prepare_mask(mask, model.backend, slots.shape[1], self.slots, a.n_kv_heads,
                            a.n_heads // a.n_kv_heads, x.dtype)
        return self.blocks[m](x, rope, self.cache, m, slots, mask, model.backend, model.fast)

    def _recycle(self, m: int, out, normed=None):
        """The state module m + 1 reads: module m's output, or its head-normed form (`normed` when the caller
        already has it)."""
        if self.mtp.config.recycle != "post_norm":
            return out
        return self.head_norm[m](out) if normed is None else normed

    def _causal(self, slots):
        """Slots [B, q] (consecutive per row) see the keys from `first` up to their own slot."""
        return SlotMask(slots[:, 0], None, self.first)

    def _catch_up(self, h0, stream, slots):
        """Write every module's K/V at slots [B, q]; module m reads tokens stream[:, m : m + q]. Returns
        module 1's output [B, q, d]."""
        q = slots.shape[1]
        mask = self._causal(slots)
        h, first = h0, None
        for m in range(len(self.blocks)):
            out = self._module(m, h, stream[:, m:m + q], slots, mask)
            first = out if first is None else first
            h = self._recycle(m, out)
        return first

    # ---- the engine's drafter interface (engine.py) --------------------------------------------------
    def start(self, engine, hidden, tokens, lengths, root) -> None:
        """After the prefill: the prompt's positions, (h^0_i, t_{i+1}), go through the modules; at the last
        one t_{i+1} is the root, so module 1's output there is the first step's first draft."""
        if self._engine is not engine:
            self._setup(engine)
        bsz, t = tokens.shape
        self.first = engine.cache.prefix_len
        if bsz > self.L.shape[0]:
            raise ConfigError(f"batch of {bsz} exceeds the engine's max_batch_size={self.L.shape[0]}")
        self._stats.zero_()
        engine.graphed(("mtp-start", id(self), self.graph_version, bsz, t, self.first), self._start, hidden,
                       tokens, lengths, root)

    def _start(self, hidden, tokens, lengths, root):
        bsz, t = tokens.shape
        self.L[:bsz].copy_(lengths + self.first)
        depth = len(self.blocks)
        stream = torch.cat([tokens[:, 1:], tokens.new_zeros(bsz, depth)], dim=1)  # t_{i+1} at i (pad after)
        stream.scatter_(1, (lengths - 1)[:, None], root[:, None])
        slots = self.first + torch.arange(t, device=tokens.device)[None].expand(bsz, t)
        out = self._catch_up(hidden.to(self._engine.dtype), stream, slots)
        ar = torch.arange(bsz, device=tokens.device)
        self._pending[:bsz].copy_(out[ar, lengths - 1])

    def propose(self, hidden, root):
        """hidden [B, d] (the target's state at slot L-1), root [B] (the token at slot L) -> (tree tokens
        [B, 1 + k*c], q [B, k, V] or None)."""
        bsz = root.shape[0]
        depth = len(self.blocks)
        n = self.L[:bsz] - 1  # [B]: the trunk position whose state we hold
        h, tok = hidden.to(self._engine.dtype)[:, None], root
        nodes, qs = [root[:, None]], []
        for j in range(self.k):
            m = j % depth
            slot = (n + j - m)[:, None]  # [B, 1]: module m of cycle j // D sits at trunk position n + j - m
            if j == 0:  # module 1 at position n with the root: computed by the last catch-up (or start)
                out = self._pending[:bsz, None]
            elif depth == 1 or j < depth:  # first cycle (slot = n): the committed slots and its own
                out = self._module(m, h, tok[:, None], slot, self._causal(slot))
            else:  # committed slots [first, n], plus this module's drafts of this step, D slots apart (n + D, ...)
                mask = SlotMask(slot[:, 0], None, self.first, gap=n + 1, stride=depth)
                out = self._module(m, h, tok[:, None], slot, mask)
            normed = self.head_norm[m](out)
            logits = self._engine.model.lm_head(normed)[:, 0]  # [B, V]
            if self.temperature is not None:
                q = torch.softmax(logits.float() / self.temperature, dim=-1)
                tok = torch.multinomial(q, 1, generator=self.gen)[:, 0]
                qs.append(q)
                nodes.append(tok[:, None])
                if self.trace is not None and j == 0:
                    self.trace.append({"q": q.clone(), "draft": tok.clone()})
            else:
                # [B, c]; argmax for a chain (one reduction instead of a radix top-k's five kernels)
                top = torch.argmax(logits, -1, keepdim=True) if self.width == 1 else torch.topk(
                    logits, self.width, dim=-1).indices
                tok = top[:, 0]
                nodes.append(top)
                if self.trace is not None and j == 0:
                    self.trace.append({"logits": logits.float().clone()})
            h = self._recycle(m, out, normed)
        return torch.cat(nodes, dim=1), (torch.stack(qs, dim=1) if qs else None)

    def accept(self, hidden, tree_tokens, acc, path) -> None:
        """After verification: catch the modules up on slots L..L+a (the accepted positions) and advance L."""
        bsz, d1 = path.shape
        L = self.L[:bsz]
        a = acc.accepted
        self._stats += torch.stack([torch.ones_like(a), a.clamp(max=1), a]).sum(1)  # rows, first accepted, accepted
        if self.trace is not None:
            self.trace[-1]["accepted"] = a.clone()
        path_tokens = tree_tokens.gather(1, path)  # [B, D+1]: root, then the path's drafts
        stream = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)  # the token after each node
        stream.scatter_(1, acc.accepted[:, None], acc.next[:, None])  # ... valid up to `accepted`
        stream = torch.cat([stream, stream.new_zeros(bsz, len(self.blocks))], dim=1)
        h = hidden.gather(1, path[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, D+1, d]
        slots = L[:, None] + torch.arange(d1, device=path.device)[None]
        out = self._catch_up(h.to(self._engine.dtype), stream, slots)
        self._pending[:bsz].copy_(out[torch.arange(bsz, device=path.device), a])
        # Rows the engine has finished stop growing there; here they keep stepping, so they are clamped to keep
        # every slot they touch (up to L + k) below the engine's max_seq_len (its rope table's size). An active
        # row never reaches the clamp: the engine stops it once L + k + 1 > max_seq_len.
        L.copy_((L + acc.accepted + 1).clamp(max=self._engine.max_seq_len - self.k - 1))
