"""Saving a trained transformers model in its library's native layout, for the training recipes."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_transformers(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """``save_pretrained`` with the weights stored in ``dtype`` while the config keeps float32, so
    ``from_pretrained`` computes in fp32 (storage dtype is a size choice, not a compute one)."""
    original = next(model.parameters()).dtype
    model.to(dtype).save_pretrained(folder)
    model.to(original)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
