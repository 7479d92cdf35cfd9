"""Version-1 containers (written before format v2) still decode bit-identically.

The digests were recorded with the version-1 code itself (commit 3b3aae2), before the v2 work
began: the two classifier headline artifacts as committed (identity transform) and a tiny timm
model with the VAE transform, whose decoder network v1 also stored.
"""

import hashlib
from pathlib import Path

import pytest
import torch

from hf_vae_compress import CompressedModel

V1 = Path(__file__).resolve().parent / "data" / "v1"
DIGESTS = {
    "fmnist-mobilenetv3.vaec.safetensors": "1eacb3de0a2f9710c2c2abac31a3528c96feab721db50d34723c78297487b98f",
    "fmnist-vit.vaec.safetensors": "f366633d9ff7aa75d5e61b6bdf8c2712a9be464f8137c4337d888d10caf29be9",
    "tiny-timm-vae.vaec.safetensors": "ec0b9856bfcffe7c2ea94bc8b3a8af6c532fee3b02e3da857ad3533cf7404336",
}


def _digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Names, dtypes, shapes and bytes of every tensor, in order."""
    h = hashlib.sha256()
    for name, value in state_dict.items():
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_v1_container_decodes_bit_identically(name):
    assert _digest(CompressedModel.load(V1 / name).decode()) == DIGESTS[name]
