"""Session fixtures: one tiny checkpoint per family (see tests/tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, make_hf_model, save_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (folder, transformers model), built once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family)
        out[family] = (save_checkpoint(model, root / family), model)
    return out


@pytest.fixture
def qwen3_dir(checkpoints) -> Path:
    return checkpoints["qwen3_moe"][0]

