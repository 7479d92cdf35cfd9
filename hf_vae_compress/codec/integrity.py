"""Integrity checks of decoded weights.

Format v2 keeps one cryptographic hash and one cheap checksum per tensor:

* a CRC-32 of each decoded tensor's bytes, checked as soon as that tensor is decoded, so a corrupt
  file names the tensor it broke (zlib's CRC-32 runs at ~3.7 GB/s and releases the GIL, so it runs
  on the decoding threads);
* one SHA-256 over the whole decoded model (every tensor's bytes in header order), checked when
  the last tensor is out: a cryptographic identity of exactly the weights the encoder measured.

Version 1 stored one SHA-256 per tensor; at 32 B each that was most of a small model's header.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import torch

from .container import ContainerError


class IntegrityError(ContainerError):
    """Decoded data does not match the checksums recorded at compression time."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in place (a view, no copy) for hashing."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(tensor))


def sha256_hex(tensor: torch.Tensor | np.ndarray) -> str:
    """One tensor's SHA-256 (what version-1 containers store per tensor)."""
    data = tensor_bytes(tensor) if isinstance(tensor, torch.Tensor) else memoryview(np.ascontiguousarray(tensor).reshape(-1))
    return hashlib.sha256(data).hexdigest()


class ModelHash:
    """The whole-model SHA-256, fed tensor by tensor in header order.

    Each tensor's name, dtype and shape go in with its bytes: a header whose names were swapped
    (or whose shapes were reshaped) decodes the same bytes under other keys, which only a hash of
    the names catches.
    """

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        key = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        self._hash.update(struct.pack("<Q", len(key)) + key)
        self._hash.update(tensor_bytes(tensor))

    def digest(self) -> bytes:
        return self._hash.digest()
