"""Parallel multi-token heads (Gloeckle et al., arXiv 2404.19737): heads, loss, drafter."""

from flashtune.decoding.drafters.parallel.drafter import ParallelDrafter
from flashtune.decoding.drafters.parallel.heads import (CONFIG_NAME, WEIGHTS_NAME, ParallelHeads, ParallelHeadsConfig,
                                                        ParallelHeadsLoss, WithParallelHeads)

__all__ = ["ParallelHeads", "ParallelHeadsConfig", "ParallelHeadsLoss", "WithParallelHeads", "ParallelDrafter",
           "CONFIG_NAME", "WEIGHTS_NAME"]
