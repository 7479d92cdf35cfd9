"""Shared fixtures: tiny timm and transformers models saved in their native formats, small data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_vae_compress import CONTAINER_NAME, CompressedModel, IntegrityError
from hf_vae_compress.codec.format.integrity import MachineDependentError
from hf_vae_compress.data import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_pretrained_cfg, load_fashion_mnist,
)
from hf_vae_compress.models import save_timm


def assert_damage_is_corrupt(path: Path, part: str, out_dir: Path, bit: int) -> None:
    """Flip ``bit`` in the middle of the stored ``part`` of the container at ``path`` (damage on
    disk) and check the load is refused as corrupt, never as machine-dependent, even with the
    unverified-decode opt-in."""
    raw = bytearray(path.read_bytes())
    stored = CompressedModel.load(path).tensors[part].numpy().tobytes()
    offset = raw.find(stored)
    assert offset > 0 and stored
    raw[offset + len(stored) // 2] ^= bit
    damaged = out_dir / CONTAINER_NAME
    damaged.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="corrupt") as caught:
        CompressedModel.load(damaged).decode(allow_unverified=True)  # the opt-in never excuses damage
    assert not isinstance(caught.value, MachineDependentError)


def tiny_timm(name: str = "test_resnet", seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, in_chans=1, num_classes=10,
                             pretrained_cfg_overlay=fashion_mnist_pretrained_cfg()).eval()


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=10,
                       id2label=dict(enumerate(FASHION_MNIST_CLASSES)))
    return ViTForImageClassification(config).eval()


def save_vit(model: torch.nn.Module, folder) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[FASHION_MNIST_MEAN],
                      image_std=[FASHION_MNIST_STD]).save_pretrained(folder)


@pytest.fixture(scope="session")
def timm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-timm")
    save_timm(tiny_timm(), folder)
    return folder


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    save_vit(tiny_vit(), folder)
    return folder


@pytest.fixture(scope="session")
def small_test_set(tmp_path_factory):
    """The first 200 Fashion-MNIST test images, saved with `save_to_disk` (a dataset folder)."""
    folder = tmp_path_factory.mktemp("fmnist-small")
    load_fashion_mnist("test").select(range(200)).save_to_disk(str(folder))
    return folder
