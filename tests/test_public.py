import subprocess
import sys

import flashtune


def test_every_public_name_resolves():
    for name in flashtune.__all__:
        assert getattr(flashtune, name) is not None, name


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flashtune.nope


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "flashtune", "--help"], capture_output=True, text=True, check=True)
    for command in ("finetune", "eval", "generate", "train-heads", "demo", "agent"):
        assert command in out.stdout, command
