"""DeepSeek-V3 multi-token-prediction modules (arXiv 2412.19437): modules, loss, drafter."""

from flashtune.decoding.drafters.mtp.drafter import MTPDrafter
from flashtune.decoding.drafters.mtp.modules import (CONFIG_NAME, WEIGHTS_NAME, MTPConfig, MTPLayer, MTPLoss,
                                                     MTPModules, SharedHead, WithMTP)

__all__ = ["MTPConfig", "MTPLayer", "MTPLoss", "MTPModules", "MTPDrafter", "SharedHead", "WithMTP",
           "CONFIG_NAME", "WEIGHTS_NAME"]
