"""Fixtures: tiny random checkpoints in the real Dream format (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamlm.model import DreamModel
from dreamlm.tiny import make_tiny_checkpoint, tiny_tokenizer


def pytest_configure(config) -> None:
    """An empty model cache for the whole run: a developer's pulled models never change what the tests see (the
    default model of generate/infill is the pulled smollm2 when there is one)."""
    import os
    import tempfile

    os.environ["DREAMLM_HOME"] = tempfile.mkdtemp(prefix="dreamlm-test-home-")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A sharded bf16 Dream-format checkpoint (vocab.json + merges.txt tokenizer)."""
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_tiny_checkpoint(path, seed=0, max_shard_size="60KB")
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> DreamModel:
    return DreamModel.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def long_model() -> DreamModel:
    """A float32 random model with a 1024-token context (for the 512-token schedule)."""
    from dreamlm.tiny import tiny_config

    config = tiny_config(tiny_tokenizer(), hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64,
                         context=1024)
    return DreamModel(config).init_weights(1).eval()
