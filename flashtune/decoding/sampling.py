"""Turning logits into the sampling distribution p.

`probs(logits, temperature, top_k, top_p)` is *the* target distribution of every decoding mode: plain sampling
draws from it, and the lossless speculative rules (verify.py) must compare drafts against exactly this p.
Temperature 0 means greedy (argmax) and has no distribution; callers branch on `is_greedy` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtune.errors import check_range


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_range("temperature", self.temperature, 0.0)
        check_range("top_k", self.top_k, 0, integer=True)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return cls(**d)


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> float32 probabilities [..., V] after temperature, top-k and top-p (nucleus) filtering.

    Top-k keeps the k largest logits (ties at the k-th value are kept). Top-p keeps the smallest set of most
    likely tokens whose probability reaches top_p (the token that crosses the threshold is kept).
    """
    if params.is_greedy:
        raise ValueError("greedy decoding has no sampling distribution; use argmax")
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        p = p.masked_fill(drop, 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p

