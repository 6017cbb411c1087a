"""Drafters for speculative decoding: one protocol (base.py) and one folder per method.

    medusa/    Medusa heads (Cai et al., arXiv 2401.10774)
    mtp/       DeepSeek-V3 multi-token-prediction modules (arXiv 2412.19437)
    parallel/  parallel multi-token heads (Gloeckle et al., arXiv 2404.19737)
    eagle/     EAGLE-3 (Li et al., arXiv 2503.01840)
    export.py  the layouts vLLM, SGLang and `speculators` load, and back
"""

from flashtune.decoding.drafters.base import Drafter, WithHeads
from flashtune.decoding.drafters.medusa import HeadsLM, MedusaConfig, MedusaHeads, MedusaLoss
from flashtune.decoding.drafters.mtp import MTPConfig, MTPDrafter, MTPLoss, MTPModules, WithMTP
from flashtune.decoding.drafters.parallel import (ParallelDrafter, ParallelHeads, ParallelHeadsConfig,
                                                  ParallelHeadsLoss, WithParallelHeads)

__all__ = ["Drafter", "WithHeads", "MedusaConfig", "MedusaHeads", "MedusaLoss", "HeadsLM", "MTPConfig",
           "MTPModules", "MTPDrafter", "MTPLoss", "WithMTP", "ParallelHeads", "ParallelHeadsConfig",
           "ParallelDrafter", "ParallelHeadsLoss", "WithParallelHeads"]
