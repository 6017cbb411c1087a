"""FlashAttention in Triton (arXiv:2205.14135, arXiv:2307.08691): forward and backward with causal, GQA/MQA,
variable-length, KV-offset, prefix and tree masks, plus a Hugging Face attention implementation "flashtune".

    from flashtune.attention import flash_attention, attention_reference, register
"""

from .hf import register
from .interface import flash_attention
from .reference import attention_reference

__all__ = ["flash_attention", "attention_reference", "register"]
