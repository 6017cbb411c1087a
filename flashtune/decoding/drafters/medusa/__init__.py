"""Medusa heads (Cai et al., arXiv 2401.10774): the drafter and its training loss."""

from flashtune.decoding.drafters.medusa.heads import CONFIG_NAME, WEIGHTS_NAME, MedusaConfig, MedusaHeads
from flashtune.decoding.drafters.medusa.train import HeadsLM, MedusaLoss, head_accuracy

__all__ = ["MedusaConfig", "MedusaHeads", "HeadsLM", "MedusaLoss", "head_accuracy", "CONFIG_NAME", "WEIGHTS_NAME"]
