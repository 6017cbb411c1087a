"""`flashtune generate` / `train-heads`: argument errors are one-line FlashtuneErrors, before any model loads."""

from flashtune.cli import build_parser, main


def test_generate_needs_a_prompt(capsys):
    assert main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_speculative_medusa_needs_heads(capsys):
    assert main(["generate", "--prompt", "Hi", "--speculative", "medusa"]) == 2
    assert "--heads" in capsys.readouterr().err


def test_train_heads_parser_defaults():
    args = build_parser().parse_args(["train-heads", "--out", "x"])
    assert (args.method, args.stage, args.num_heads, args.tree_nodes) == ("medusa", 1, 4, 63)
    assert not args.no_self_distill


def test_heads_recipe_validation():
    import pytest

    from flashtune.cli.heads import HeadsRecipe
    from flashtune.errors import ConfigError

    with pytest.raises(ConfigError, match="stage"):
        HeadsRecipe(stage=3)
    with pytest.raises(ConfigError, match="num_heads"):
        HeadsRecipe(num_heads=0)
    r = HeadsRecipe(steps=5)
    assert HeadsRecipe.from_dict(r.to_dict()) == r
