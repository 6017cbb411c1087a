"""Recipes: typed configs plus one function each, composing tuners, training, data and evaluation.

`cli/` and `bench/` call these; recipes never import `cli/`. Import the submodule you need, e.g.
`from flashtune.recipes.finetune import FinetuneConfig, run_finetune`.
"""
