"""Version-1 containers (written before format v2) still decode as they did, on any machine.

The digests were recorded with the version-1 code itself (commit 3b3aae2), before the v2 work
began: the two classifier headline artifacts as committed (identity transform) and a tiny timm
model with the VAE transform, whose decoder network v1 also stored.

What v1 can promise everywhere differs by transform. The identity transform's decode is exact
integer and IEEE arithmetic: its weights are pinned bit for bit. The VAE's decoder is a float
network whose output bits depend on the CPU's kernels, so what is pinned there is what is
portable: the integer symbols and the row scales the bitstreams decode to, and the stored
tensors. Its decoded weights either match the hashes recorded by the writer, or are refused as
machine-dependent (never called corrupt), and load, unverified, only on the explicit opt-in.
"""

import hashlib
from pathlib import Path

import pytest
import torch

from hf_vae_compress import CompressedModel
from hf_vae_compress.codec.format import v1
from hf_vae_compress.codec.format.layout import ChunkLayout
from hf_vae_compress.codec.format.registry import read
from hf_vae_compress.codec.format.integrity import MachineDependentError

V1 = Path(__file__).resolve().parent / "data" / "v1"
DIGESTS = {
    "fmnist-mobilenetv3.vaec.safetensors": "1eacb3de0a2f9710c2c2abac31a3528c96feab721db50d34723c78297487b98f",
    "fmnist-vit.vaec.safetensors": "f366633d9ff7aa75d5e61b6bdf8c2712a9be464f8137c4337d888d10caf29be9",
    "tiny-timm-vae.vaec.safetensors": "ec0b9856bfcffe7c2ea94bc8b3a8af6c532fee3b02e3da857ad3533cf7404336",
}
IDENTITY = ["fmnist-mobilenetv3.vaec.safetensors", "fmnist-vit.vaec.safetensors"]
VAE = "tiny-timm-vae.vaec.safetensors"
# recorded from the v1 VAE fixture: its coded symbols and scales, and its stored (non-coded) tensors
VAE_SYMBOLS = "f29e2f20693e5bd65572e76d8ed58b5220cbba79b602ed1e582ac57e725ebe86"
VAE_STORED = "e061bd40f4b022336755c6c32572db8c564eaaf726f2da54921f54f4f1f57ccd"


def _digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Names, dtypes, shapes and bytes of every tensor, in order."""
    h = hashlib.sha256()
    for name, value in state_dict.items():
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _symbols_digest(path: Path) -> str:
    """SHA-256 of every coded tensor's decoded integer symbols and fp16 row scales, in order
    (v1's own stream readers: the part of a VAE decode that is exact everywhere)."""
    _, header, tensors = read(path)
    cursors = {k: v1._Cursor(tensors[k]) for k in ("streams", "tables", "scales")}
    h = hashlib.sha256()
    for entry in header["tensors"]:
        if entry["codec"] != "raw":
            layout = ChunkLayout.of(tuple(entry["shape"]), header["transform"]["chunk_size"])
            h.update(v1._entry_symbols(entry, layout, cursors, header["config"]["table_precision"]).tobytes())
            h.update(cursors["scales"].take(layout.rows).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", IDENTITY)
def test_v1_identity_container_decodes_bit_identically(name):
    assert _digest(CompressedModel.load(V1 / name).decode()) == DIGESTS[name]


def test_v1_vae_container_decodes_its_streams_exactly_and_its_float_output_honestly():
    path = V1 / VAE
    assert _symbols_digest(path) == VAE_SYMBOLS
    compressed = CompressedModel.load(path)
    assert not compressed.portable and not compressed.stored_bytes_verified()
    try:
        assert _digest(compressed.decode(allow_unverified=False)) == DIGESTS[VAE]  # a machine like the writer's
    except MachineDependentError as err:  # any other machine: refused, and not as a corrupt file
        assert "corrupt" not in str(err) and "HF_VAE_COMPRESS_ALLOW_UNVERIFIED_DECODE" in str(err)
    unverified = compressed.decode(allow_unverified=True)
    coded = {e["name"] for e in compressed.header["tensors"] if e["codec"] != "raw"}
    assert _digest({k: v for k, v in unverified.items() if k not in coded}) == VAE_STORED
    assert all(torch.isfinite(unverified[k]).all() for k in coded)
