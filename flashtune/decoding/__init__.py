"""Fast decoding: a static-cache engine, sampling, and speculative decoding (drafters/, lossless rules).

    from flashtune.decoding import Engine, MedusaHeads
    engine = Engine(model, tokenizer)
    out = engine.generate("Hello", max_new_tokens=64, speculative=heads)
"""

from flashtune.decoding.engine import Engine, GenerationOutput
from flashtune.decoding.drafters.base import Drafter
from flashtune.decoding.drafters.medusa import MedusaConfig, MedusaHeads
from flashtune.decoding.sampling import SamplingParams
from flashtune.decoding.tree import build_tree, default_tree, tree_buffers

__all__ = ["Engine", "GenerationOutput", "Drafter", "SamplingParams", "MedusaHeads", "MedusaConfig",
           "tree_buffers", "default_tree", "build_tree"]
