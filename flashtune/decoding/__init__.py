"""Fast decoding: a static-cache engine, sampling, and speculative decoding (Medusa trees, lossless rules).

    from flashtune.decoding import Engine, MedusaHeads
    engine = Engine(model, tokenizer)
    out = engine.generate("Hello", max_new_tokens=64, speculative=heads)
"""

from flashtune.decoding.engine import Drafter, Engine, GenerationOutput
from flashtune.decoding.sampling import SamplingParams
from flashtune.decoding.tree import build_tree, default_tree, tree_buffers

try:  # Medusa heads land after the engine core
    from flashtune.decoding.medusa import MedusaConfig, MedusaHeads
except ImportError:  # pragma: no cover
    pass

__all__ = ["Engine", "GenerationOutput", "Drafter", "SamplingParams", "MedusaHeads", "MedusaConfig",
           "tree_buffers", "default_tree", "build_tree"]
