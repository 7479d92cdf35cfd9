"""Integrations with other libraries' loaders: the transformers quantizer and the remote-code shim.

``register_transformers()`` registers ``quant_method="hf_vae_compress"`` with transformers (idempotent).
``REMOTE_CODE_DIR`` holds the file(s) (``modeling_*.py``) copied into every pushed repository for
``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).with_name("remote_code")
REMOTE_CODE_MODULE = "modeling_hf_vae_compress"
# auto class -> class in the shim module; the model's own task's entry is written as `auto_map` into config.json
REMOTE_CODE_AUTO_MAP = {
    "AutoModelForImageClassification": f"{REMOTE_CODE_MODULE}.HfVaeCompressForImageClassification",
    "AutoModelForObjectDetection": f"{REMOTE_CODE_MODULE}.HfVaeCompressForObjectDetection",
}


def register_transformers() -> None:
    """Make ``from_pretrained`` decode ``hf_vae_compress`` checkpoints (imports transformers)."""
    from .transformers_quantizer import register

    register()


__all__ = ["REMOTE_CODE_AUTO_MAP", "REMOTE_CODE_DIR", "REMOTE_CODE_MODULE", "register_transformers"]
