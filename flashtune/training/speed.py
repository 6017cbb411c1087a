"""Speed and memory switches for training a frozen base with adapters: activation checkpointing, compilation.

Activation checkpointing (Chen et al., Training Deep Nets with Sublinear Memory Cost, arXiv:1604.06174)
keeps only each decoder block's input and recomputes the block in backward: with a frozen base and LoRA,
backward needs the activations but no weight gradients of the base, so the recomputed forward costs about a
third more compute for most of the activation memory back. `torch.compile` fuses the many small elementwise
kernels of a decoder block (RMSNorm in fp32, rotary embeddings, SiLU gating, LoRA scaling); compiling blocks
one by one lets every block reuse one compiled graph.
"""

from __future__ import annotations

import torch

from flashtune.errors import ConfigError


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: the longest nn.ModuleList of identical module types."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}; "
                          f"turn off compile / gradient_checkpointing for this model")
    return best


def enable_checkpointing(model: torch.nn.Module, fraction: float = 1.0) -> int:
    """Recompute the activations of the first `fraction` of the blocks in backward; return how many.

    Uses Hugging Face's per-block switch (non-reentrant torch.utils.checkpoint). Checkpointing only some
    blocks trades the memory of the others' activations for less recompute: the memory left after the
    weights decides the fraction.
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient_checkpointing; set it to 0")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = decoder_blocks(model)
    keep = round(fraction * len(blocks))
    for i, block in enumerate(blocks):
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = i < keep
    return sum(bool(getattr(b, "gradient_checkpointing", False)) for b in blocks)


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """torch.compile each transformer block in place (they share one graph); return how many were compiled."""
    import torch._dynamo

    blocks = decoder_blocks(model)
    # Blocks differ in constants (e.g. their layer index): allow one compiled variant per block, not 8.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 2 * len(blocks) + 8))
    # The first block's input would be the only one without requires_grad (the embeddings are frozen), which
    # costs a second compilation of the same graph; make it require grad like the others.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
