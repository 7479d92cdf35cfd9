"""timm's ``create_model`` for hf-vae-compress checkpoints (imports timm only when called).

``"hf-hub:org/name[@revision]"`` and ``"local-dir:/path"`` are the two names under which timm
loads a checkpoint folder. For either, the folder (for the Hub: its ``config.json`` and, when that
config names one, its container, in the Hub cache) is asked :func:`~hf_vae_compress.loading.find_container`
whether it is compressed, the same question every other loader asks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..loading import find_container, load_into, named_container
from ..models import model_format, read_config


def _checkpoint_folder(model_name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The local folder behind a ``local-dir:`` or ``hf-hub:`` name; None for any other name.

    For the Hub only ``config.json`` and the container it names are downloaded (into the Hub
    cache, whose snapshot folder of the revision is returned): a repository's other weight files
    are never fetched.
    """
    if model_name.startswith("local-dir:"):
        return Path(model_name[len("local-dir:"):])
    if not model_name.startswith("hf-hub:"):
        return None
    from huggingface_hub import hf_hub_download

    repo, _, revision = model_name[len("hf-hub:"):].partition("@")
    config = Path(hf_hub_download(repo, "config.json", revision=revision or None, cache_dir=cache_dir))
    container = named_container(read_config(config.parent))
    if container is not None:
        hf_hub_download(repo, container, revision=revision or None, cache_dir=cache_dir)
    return config.parent


def create_model(model_name: str, pretrained: bool = True, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` that also loads hf-vae-compress checkpoints.

    ``"hf-hub:org/name[@revision]"`` or ``"local-dir:/path"`` naming a compressed timm checkpoint:
    the architecture is built by timm from the folder's ``config.json`` (``pretrained=False``), and
    the decoded weights (SHA-256 checked) are loaded strictly (:func:`~hf_vae_compress.loading.load_into`):
    a missing or unexpected key raises. Any other name (or an uncompressed checkpoint) goes to
    ``timm.create_model`` unchanged. Like timm, the model is returned in training mode; call ``.eval()``.
    """
    import timm

    folder = _checkpoint_folder(model_name, kwargs.get("cache_dir")) if pretrained else None
    container = find_container(folder) if folder is not None else None
    if container is None:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if model_format(read_config(folder)) != "timm":
        raise ValueError(f"{model_name} is a compressed transformers checkpoint, not a timm one: load it with "
                         "`import hf_vae_compress` and transformers' AutoModelForImageClassification.from_pretrained")
    return load_into(timm.create_model(model_name, pretrained=False, **kwargs), container)
