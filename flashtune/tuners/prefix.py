"""Prefix-tuning: trained key/value prefixes in every attention layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190.

Each prefixed attention gets P extra key/value pairs per layer, from a table P_theta: [P, 2 * L * H * d_h]
(H = num_key_value_heads under GQA). While training, the table is reparameterized as
MLP(Embedding(P, d)) = Linear(mid, 2 L H d_h)(tanh(Linear(d, mid)(E))); `materialize_prefix` replaces the MLP
by the table it computes, which is also what the file holds (`prompt_embeddings`, as Hugging Face PEFT saves).

Injection uses hooks, never forked model code:
- decoder-only: a forward pre-hook on the base transformer seeds an empty `DynamicCache` with the prefix
  (cache slots [0, P), no RoPE applied), prepends P ones to a 2-D attention mask, and offsets positions so
  real tokens sit at P + cumsum(mask) - 1, which keeps `generate`, KV caches and left padding right. Other
  cache classes are left alone: their owner (the decoding engine) puts `prefix_key_values(model)` in them;
- encoder-decoder (BART): three independent prefixes. Encoder self-attention gets its prefix through a
  per-layer one-shot cache, decoder self-attention and cross-attention through the `EncoderDecoderCache`
  seeded before the first decoder step; the 4-D masks of the encoder and cross attentions get P visible
  columns. The prefix is never marked as padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from flashtune.errors import AdapterLoadError, ConfigError, FlashtuneError, check_range
from flashtune.tuners.base import TunerConfig, Tuner, get_state, is_encoder_decoder, resolve_name

_HOOKS_ATTR = "_flashtune_prefix_hooks"
_KEYS = {"encoder": "encoder_prompt_embeddings", "self": "prompt_embeddings", "cross": "cross_prompt_embeddings"}
SEQ2SEQ_TYPE = "PREFIX_TUNING_SEQ2SEQ"


@dataclasses.dataclass
class PrefixConfig(TunerConfig):
    """Prefix-tuning settings.

    num_virtual_tokens: P, prefix length (>= 1); Li & Liang used 10 for table-to-text, 200 for summarization.
    prefix_projection: reparameterize the table as MLP(Embedding) while training (True), or train the table
    directly. encoder_hidden_size: the MLP's middle width (512 for table-to-text, 800 for XSUM).
    prefix_dropout: dropout on the prefix table while training, in [0, 1).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 10
    prefix_projection: bool = True
    encoder_hidden_size: int = 512
    prefix_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_range("num_virtual_tokens", self.num_virtual_tokens, 1, integer=True)
        check_range("encoder_hidden_size", self.encoder_hidden_size, 1, integer=True)
        check_range("prefix_dropout", self.prefix_dropout, 0.0, 1.0, high_open=True)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection={self.prefix_projection!r} must be True or False")

    def to_peft_dict(self, model: nn.Module) -> dict[str, Any]:
        out = super().to_peft_dict(model)
        geo = geometry(model)
        layers, heads, head_dim = geo["self"]
        # The file holds the materialized table, so PEFT must read it as a plain embedding (no projection).
        out.update(num_layers=layers, num_attention_heads=heads, token_dim=heads * head_dim,
                   num_transformer_submodules=1, prefix_projection=False, init_weights=None,
                   modules_to_save=None)
        if is_encoder_decoder(model):
            out["peft_type"] = SEQ2SEQ_TYPE
            out["num_transformer_submodules"] = 3
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "PrefixConfig":
        if data.get("peft_type") == "PREFIX_TUNING" and data.get("num_transformer_submodules", 1) != 1:
            raise AdapterLoadError("this is a PEFT encoder-decoder prefix (one table shared by decoder self- and "
                                   "cross-attention); flashtune reads PEFT prefixes of decoder-only models")
        return cls(num_virtual_tokens=data.get("num_virtual_tokens"), prefix_projection=False,
                   encoder_hidden_size=data.get("encoder_hidden_size") or 512,
                   prefix_dropout=data.get("prefix_dropout", 0.0))


def geometry(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Per prefixed site ("self"; plus "encoder" and "cross" for encoder-decoders): (layers, kv heads, head_dim)."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if is_encoder_decoder(model):
        enc_h, dec_h, d = cfg.encoder_attention_heads, cfg.decoder_attention_heads, cfg.d_model
        dec = (cfg.decoder_layers, dec_h, d // dec_h)
        return {"encoder": (cfg.encoder_layers, enc_h, d // enc_h), "self": dec, "cross": dec}
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"self": (cfg.num_hidden_layers, heads, head_dim)}


class PrefixTable(nn.Module):
    """One site's prefix: a table [P, 2 L H d_h], or MLP(Embedding(P, d)) producing it."""

    def __init__(self, config: PrefixConfig, layers: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.prefix_len, self.layers, self.heads, self.head_dim = config.num_virtual_tokens, layers, heads, head_dim
        width = 2 * layers * heads * head_dim
        if config.prefix_projection:
            self.embedding = nn.Embedding(self.prefix_len, hidden)
            self.transform = nn.Sequential(nn.Linear(hidden, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
        else:
            self.embedding = nn.Embedding(self.prefix_len, width)
            self.transform = None
        self.dropout = nn.Dropout(config.prefix_dropout)

    def table(self) -> torch.Tensor:
        """[P, 2 L H d_h]."""
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    @torch.no_grad()
    def materialize(self) -> None:
        if self.transform is None:
            return
        table = self.table()
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.transform = None

    def layer_kv(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each [batch, H, P, d_h]."""
        t = self.dropout(self.table()).to(dtype)  # [P, 2L*H*dh]
        t = t.view(self.prefix_len, 2 * self.layers, self.heads, self.head_dim).permute(1, 2, 0, 3)  # [2L, H, P, dh]
        shape = (batch, self.heads, self.prefix_len, self.head_dim)
        return [(t[2 * i].unsqueeze(0).expand(shape), t[2 * i + 1].unsqueeze(0).expand(shape))
                for i in range(self.layers)]


class PrefixEncoder(nn.Module):
    def __init__(self, config: PrefixConfig, model: nn.Module) -> None:
        super().__init__()
        hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
            else model.config.hidden_size
        self.sites = nn.ModuleDict({site: PrefixTable(config, *geo, hidden) for site, geo in geometry(model).items()})


def _live_prefix(model: nn.Module) -> PrefixEncoder | None:
    state = get_state(model)
    name = state.live if state is not None else None
    container = model._modules.get("flashtune_prefix")
    return container[name] if name is not None and container is not None and name in container else None


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _batch_len(args, kwargs) -> tuple[int, int]:
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("hidden_states")
    return x.shape[0], x.shape[1]


def _prefix_2d_mask(mask: torch.Tensor | None, prefix_len: int, past: int, new: int) -> torch.Tensor | None:
    """Prepend P ones to a 2-D mask that covers only real tokens; leave one that already covers the prefix."""
    if mask is None or mask.dim() != 2:
        return mask
    if mask.shape[1] + prefix_len == past + new:
        return torch.cat([mask.new_ones(mask.shape[0], prefix_len), mask], dim=1)
    if mask.shape[1] != past + new:
        raise FlashtuneError(f"attention_mask has {mask.shape[1]} columns; with a prefix of {prefix_len} and "
                             f"{past} cached and {new} new tokens it needs {past + new - prefix_len} (or "
                             f"{past + new} including the prefix)")
    return mask


def _widen_4d_mask(mask, prefix_len: int):
    """Give a 4-D attention mask [B, 1, Tq, Tk] P visible key columns on the left."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask
    fill = True if mask.dtype == torch.bool else 0.0
    return torch.cat([mask.new_full((*mask.shape[:-1], prefix_len), fill), mask], dim=-1)


def _check_no_checkpointing(model: nn.Module) -> None:
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        raise FlashtuneError("prefix-tuning cannot train with gradient checkpointing (a recomputed layer would "
                             "append its prefix to the cache twice); call model.gradient_checkpointing_disable()")


def _decoder_only_hook(model: nn.Module):
    from transformers import DynamicCache

    def hook(module, args, kwargs):
        enc = _live_prefix(model)
        if enc is None:
            return None
        _check_no_checkpointing(model)
        table = enc.sites["self"]
        batch, new = _batch_len(args, kwargs)
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, DynamicCache):
            return None  # a caller-managed cache (e.g. a static one) carries the prefix itself: prefix_key_values
        if cache is None or cache.get_seq_length() == 0:
            cache = cache if cache is not None else DynamicCache(config=model.config)
            for i, (k, v) in enumerate(table.layer_kv(batch, _model_dtype(model))):
                cache.update(k, v, i)
            kwargs["past_key_values"] = cache
        past, p = cache.get_seq_length(), table.prefix_len
        mask = _prefix_2d_mask(kwargs.get("attention_mask"), p, past, new)
        if mask is not None:
            kwargs["attention_mask"] = mask
        if kwargs.get("position_ids") is not None:  # given in real-token coordinates: the prefix comes first
            kwargs["position_ids"] = kwargs["position_ids"] + p
        elif mask is not None and mask.dim() == 2:
            # Real tokens at P + cumsum(mask) - 1 (left padding and masked prefixes included).
            pos = (mask.long().cumsum(-1) - 1)[:, -new:]
            kwargs["position_ids"] = pos.clamp(min=0)
        return args, kwargs

    return hook


class _OneShotPrefix:
    """Stands in for a cache in one encoder self-attention call: update() returns prefix + the new K/V."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return torch.cat([self.k, key_states], dim=-2), torch.cat([self.v, value_states], dim=-2)


def _encoder_self_hook(model: nn.Module, layer: int):
    def hook(module, args, kwargs):
        enc = _live_prefix(model)
        if enc is None:
            return None
        table = enc.sites["encoder"]
        batch, _ = _batch_len(args, kwargs)
        k, v = table.layer_kv(batch, _model_dtype(model))[layer]
        kwargs["past_key_values"] = _OneShotPrefix(k, v)
        kwargs["attention_mask"] = _widen_4d_mask(kwargs.get("attention_mask"), table.prefix_len)
        return args, kwargs

    return hook


def _cross_hook(model: nn.Module):
    def hook(module, args, kwargs):
        enc = _live_prefix(model)
        if enc is None:
            return None
        kwargs["attention_mask"] = _widen_4d_mask(kwargs.get("attention_mask"), enc.sites["cross"].prefix_len)
        return args, kwargs

    return hook


def _seq2seq_decoder_hook(model: nn.Module):
    from transformers import DynamicCache, EncoderDecoderCache

    def hook(module, args, kwargs):
        enc = _live_prefix(model)
        if enc is None:
            return None
        _check_no_checkpointing(model)
        batch, new = _batch_len(args, kwargs)
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        if not isinstance(cache, EncoderDecoderCache):
            raise FlashtuneError("prefix-tuning an encoder-decoder model needs an EncoderDecoderCache "
                                 f"(got {type(cache).__name__})")
        dtype = _model_dtype(model)
        if cache.self_attention_cache.get_seq_length() == 0:
            for site, target in (("self", cache.self_attention_cache), ("cross", cache.cross_attention_cache)):
                for i, (k, v) in enumerate(enc.sites[site].layer_kv(batch, dtype)):
                    target.update(k, v, i)
            for i in range(enc.sites["cross"].layers):
                cache.is_updated[i] = False  # the encoder's K/V still have to be appended after the prefix
        kwargs["past_key_values"] = cache
        past = cache.self_attention_cache.get_seq_length()
        mask = _prefix_2d_mask(kwargs.get("attention_mask"), enc.sites["self"].prefix_len, past, new)
        if mask is not None:
            kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def _register_hooks(model: nn.Module) -> None:
    if model.__dict__.get(_HOOKS_ATTR):
        return
    handles = []
    if is_encoder_decoder(model):
        encoder, decoder = model.get_encoder(), model.get_decoder()
        try:
            enc_attn = [layer.self_attn for layer in encoder.layers]
            cross_attn = [layer.encoder_attn for layer in decoder.layers]
        except AttributeError:
            raise ConfigError(f"prefix-tuning supports BART-style encoder-decoders (layers with self_attn and "
                              f"encoder_attn); {type(model).__name__} is not one") from None
        for i, attn in enumerate(enc_attn):
            handles.append(attn.register_forward_pre_hook(_encoder_self_hook(model, i), with_kwargs=True))
        for attn in cross_attn:
            handles.append(attn.register_forward_pre_hook(_cross_hook(model), with_kwargs=True))
        handles.append(decoder.register_forward_pre_hook(_seq2seq_decoder_hook(model), with_kwargs=True))
    else:
        base = getattr(model, "base_model", model)
        handles.append(base.register_forward_pre_hook(_decoder_only_hook(model), with_kwargs=True))
    model.__dict__[_HOOKS_ATTR] = handles


def _remove_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS_ATTR, []):
        handle.remove()


class PrefixTuner(Tuner):
    config_cls = PrefixConfig
    cannot_merge_reason = ("a prefix adds key/value pairs to attention rather than changing weights; keep it "
                           "attached (the decoding engine reads it with prefix_key_values)")

    def inject(self, model: nn.Module, config: PrefixConfig, name: str, state) -> None:
        if getattr(model, "config", None) is None:
            raise ConfigError("prefix-tuning needs a Hugging Face model with a config")
        weight = next(model.parameters())
        encoder = PrefixEncoder(config, model).to(weight.device)
        if "flashtune_prefix" not in model._modules:
            model.flashtune_prefix = nn.ModuleDict()
        model.flashtune_prefix[name] = encoder
        _register_hooks(model)

    def remove(self, model: nn.Module, name: str, state) -> None:
        container = model._modules.get("flashtune_prefix")
        if container is not None and name in container:
            del container[name]
        if container is not None and not len(container):
            del model.flashtune_prefix
            _remove_hooks(model)

    def _sites(self, model: nn.Module, name: str) -> dict[str, PrefixTable]:
        return dict(model.flashtune_prefix[name].sites.items())

    def adapter_parameters(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for site, table in self._sites(model, name).items():
            if table.transform is not None:
                raise FlashtuneError("materialize_prefix(model) first: the prefix is still an MLP")
            out[_KEYS[site]] = table.embedding.weight
        return out

    def trainable_parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        return list(model.flashtune_prefix[name].parameters())

    def adapter_state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {_KEYS[site]: table.table().detach() for site, table in self._sites(model, name).items()}


def materialize_prefix(model: nn.Module, adapter_name: str | None = None) -> None:
    """Replace the prefix's reparameterization MLP by the table it computes (after training)."""
    name = resolve_name(model, adapter_name)
    if "flashtune_prefix" not in model._modules or name not in model.flashtune_prefix:
        raise FlashtuneError(f"adapter {name!r} is not a prefix adapter")
    trainable = any(p.requires_grad for p in model.flashtune_prefix[name].parameters())
    for table in model.flashtune_prefix[name].sites.values():
        table.materialize()
        table.embedding.weight.requires_grad_(trainable)


def prefix_key_values(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The active prefix adapter's decoder self-attention prefix, per layer (k, v): [1, H_kv, P, d_h], computed
    without dropout or gradients (None when no prefix adapter is active)."""
    enc = _live_prefix(model)
    if enc is None:
        return None
    table = enc.sites["self"]
    with torch.no_grad():
        t = table.table().to(_model_dtype(model))  # [P, 2L*H*dh]
        t = t.view(table.prefix_len, 2 * table.layers, table.heads, table.head_dim).permute(1, 2, 0, 3)
        return [(t[2 * i].unsqueeze(0).clone(), t[2 * i + 1].unsqueeze(0).clone()) for i in range(table.layers)]
