import os
import sys

# Triton decides at decoration time whether @triton.jit kernels run in its CPU interpreter, so the switch
# must be set before any test module imports flashtune.attention (xdist workers share one interpreter).
import torch as _torch  # noqa: E402

if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Keep CPU tests deterministic and light on a 2-core machine: one thread per xdist worker (two workers
# already fill both cores), two threads when run in one process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest on one thread; other test workers share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved to disk with the character tokenizer (which has a chat template): what the
    CLI tests pass as --model."""
    from test_data import char_tokenizer
    from tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)
