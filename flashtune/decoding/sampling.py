"""Turning logits into the sampling distribution p.

`probs(logits, temperature, top_k, top_p)` is *the* target distribution of every decoding mode: plain sampling
draws from it, and the lossless speculative rules (verify.py) must compare drafts against exactly this p.
Temperature 0 means greedy (argmax) and has no distribution; callers branch on `is_greedy` first.

`StepNoise` holds a decoding step's random numbers: uniforms drawn from the call's generator before the step
runs, handed out in a fixed order, turned into draws by `sample_from` (inverse transform). A step captured in
a CUDA graph then holds no random-number kernel of its own: every replay reads the same slots, refilled with
fresh numbers before it.
"""

from __future__ import annotations

import math
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


def sample_from(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw from every row of p [..., V] (non-negative weights, any total) given uniforms u [...] in [0, 1):
    the token i with c_(i-1) <= u * c_V < c_i for the running sums c (inverse transform sampling, exact up to
    float32 sums; zero-weight tokens are never drawn). -> long [...]."""
    c = torch.cumsum(p.float(), dim=-1)
    x = u[..., None].float() * c[..., -1:]
    return torch.searchsorted(c, x, right=True)[..., 0].clamp_(max=p.shape[-1] - 1)


class StepNoise:
    """Uniforms in [0, 1) for one decoding step (see the module's docstring): `refill(generator)` before each
    step, then `start()` at its beginning; `uniform(*shape)` and `categorical(p)` take the next slots."""

    def __init__(self, size: int, device):
        self.buf = torch.zeros(size, device=device)
        self.pos = 0

    def refill(self, generator: torch.Generator | None) -> None:
        self.buf.uniform_(generator=generator)
        self.pos = 0

    def start(self) -> None:
        self.pos = 0

    def uniform(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if self.pos + n > self.buf.numel():
            raise RuntimeError(f"a step asked for more than the {self.buf.numel()} random numbers reserved for it")
        out = self.buf[self.pos: self.pos + n].view(shape)
        self.pos += n
        return out

    def categorical(self, p: torch.Tensor) -> torch.Tensor:
        """One draw from each row of p [..., V] -> long [...]."""
        return sample_from(p, self.uniform(*p.shape[:-1]))

