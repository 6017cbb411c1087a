"""`flashtune generate` / `train-heads`: argument errors are one-line FlashtuneErrors, before any model loads."""

from flashtune.cli import build_parser, main


def test_generate_needs_a_prompt(capsys):
    assert main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_speculative_medusa_needs_heads(capsys):
    assert main(["generate", "--prompt", "Hi", "--speculative", "medusa"]) == 2
    assert "--heads" in capsys.readouterr().err


def test_generate_invariant_needs_a_gpu(capsys):
    assert main(["generate", "--prompt", "Hi", "--invariant", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--invariant" in err and "CUDA" in err and len(err.strip().splitlines()) == 1


def test_train_heads_parser_defaults():
    args = build_parser().parse_args(["train-heads", "--out", "x"])
    assert (args.method, args.stage, args.num_heads, args.tree_nodes) == ("medusa", 1, 4, 63)
    assert not args.no_self_distill


def test_heads_recipe_validation():
    import pytest

    from flashtune.recipes.heads import MedusaRecipe
    from flashtune.errors import ConfigError

    with pytest.raises(ConfigError, match="stage"):
        MedusaRecipe(stage=3)
    with pytest.raises(ConfigError, match="num_heads"):
        MedusaRecipe(num_heads=0)
    r = MedusaRecipe(steps=5)
    assert MedusaRecipe.from_dict(r.to_dict()) == r


def test_generate_rejects_a_bad_tree(capsys):
    assert main(["generate", "--prompt", "Hi", "--tree", "big"]) == 2
    assert "--tree" in capsys.readouterr().err


def test_tree_choice_from_saved_accuracies(tmp_path):
    import json

    import pytest

    from flashtune.cli.generate import _choose_tree
    from flashtune.decoding import Engine, MedusaHeads
    from flashtune.errors import ConfigError
    from tiny import tiny_model

    model = tiny_model("llama")
    heads = MedusaHeads.for_model(model.lm_head.weight, num_heads=2, topk=2)
    engine = Engine(model, max_batch_size=1, max_seq_len=96)
    with pytest.raises(ConfigError, match="head_accuracy.json"):
        _choose_tree(heads, engine, tmp_path, "auto", 1)
    (tmp_path / "head_accuracy.json").write_text(json.dumps([[0.9, 0.05], [0.7, 0.1]]))
    assert _choose_tree(heads, engine, tmp_path, "3", 1).tree.num_nodes == 4
    chosen = _choose_tree(heads, engine, tmp_path, "auto", 1)
    assert chosen is None or chosen.tree.num_nodes - 1 in (3, 6)  # 2 heads x top-2 fill at most 6 nodes


def test_train_heads_refuses_an_export_format_before_training(capsys, tmp_path):
    assert main(["train-heads", "--method", "medusa", "--export", "sglang", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "sglang serves no medusa" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h").exists()
