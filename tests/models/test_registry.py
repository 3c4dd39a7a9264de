"""Loading an HF family by name or from config.json, with errors that name the config key."""

from __future__ import annotations

import pytest

from vlmtrain.models.registry import load_adapter
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl


def test_load_adapter_checks_path_and_family(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_adapter("qwen2_vl", tmp_path / "nowhere")
    path = save_tiny_qwen_vl(tmp_path / "q", family="qwen2_vl")
    with pytest.raises(ValueError, match="model.family=llava.*'qwen2_vl'"):
        load_adapter("llava", path)
    adapter = load_adapter("auto", path, frame_size=16)
    assert adapter.family == "qwen2_vl" and adapter.frame_size == (16, 16)
