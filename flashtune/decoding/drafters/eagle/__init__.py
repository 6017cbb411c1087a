"""EAGLE-3 drafters (Li et al., arXiv 2503.01840): the draft model, drafting (chain or EAGLE-2's dynamic tree),
self-synthesised training data (Magpie) and the served layouts. Training with the training-time test is a recipe:
flashtune/recipes/eagle.py.

    from flashtune.decoding.drafters.eagle import Eagle3Draft, Eagle3Drafter
    engine.generate(prompts, speculative=Eagle3Drafter(Eagle3Draft.load(dir, model), depth=6, topk=8))
"""

from flashtune.decoding.drafters.eagle.draft import Eagle3Drafter
from flashtune.decoding.drafters.eagle.model import Eagle3Config, Eagle3Draft, default_aux_layers

__all__ = ["Eagle3Config", "Eagle3Draft", "Eagle3Drafter", "default_aux_layers"]
