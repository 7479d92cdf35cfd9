"""Integrity checks of decoded weights.

Format v2 keeps one cryptographic hash and one cheap checksum per tensor:

* a CRC-32 of each decoded tensor's bytes, checked as soon as that tensor is decoded, so a corrupt
  file names the tensor it broke (zlib's CRC-32, computed by ISA-L where its wheel is installed:
  see :func:`crc32_update`; either releases the GIL, so it runs on the decoding threads, block by
  block as a tensor is written);
* one SHA-256 over the whole decoded model (every tensor's name, shape and bytes in header order):
  a cryptographic identity of exactly the weights the encoder measured. It is checked, when the last
  tensor is out, only for containers written before the stored-bytes hash below; a sealed container's
  stored bytes already cover names, shapes and every coded byte, so its decoded bytes are not hashed
  a second time.

and, written since format v2 gained it, one SHA-256 of the *stored* bytes (the header's JSON and
every stored part), checked before anything is decoded. It is what tells the two failures apart:

* the stored bytes fail their hash: the file is corrupt (damaged in transfer or on disk);
* the stored bytes are intact but a decoded tensor fails its CRC-32: for a transform whose decoder
  is a float network (the VAE), that network gave other bits on this machine than on the writer's
  (other CPU kernels: AVX2, AVX-512, MKL's code paths, CUDA). That is :class:`MachineDependentError`,
  never "corrupt". An integer-only decoder (the identity transform) cannot differ: there it is
  corruption, or a decoder bug.

Version 1 stored one SHA-256 per tensor; at 32 B each that was most of a small model's header.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from typing import Iterable

import numpy as np
import torch

from .framing import ContainerError

logger = logging.getLogger(__name__)

# The explicit opt-in that loads a container whose float decoder output cannot be verified bit for
# bit on this machine. An environment variable, so that every loader (transformers'
# from_pretrained, timm's create_model, the CLI, remote code) honours it without a new argument.
ALLOW_UNVERIFIED_ENV = "HF_VAE_COMPRESS_ALLOW_UNVERIFIED_DECODE"


class IntegrityError(ContainerError):
    """Decoded data does not match the checksums recorded at compression time."""


class MachineDependentError(IntegrityError):
    """A float decoder network gave other bits here than where the container was written.

    Not corruption: the stored bytes are intact (or, in containers older than the stored-bytes
    hash, decoded cleanly). The weights are close to the measured ones but cannot be verified.
    """


def allow_unverified(explicit: bool | None = None) -> bool:
    """Whether unverifiable float-decoder output may load: the argument, else the environment."""
    if explicit is not None:
        return explicit
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


def machine_dependent(name: str, kind: str, stored_verified: bool) -> MachineDependentError:
    """The error for a float decoder's output that fails its checksum on this machine."""
    stored = ("its stored bytes are intact (their SHA-256 matches)" if stored_verified else
              "its bitstreams decoded cleanly (this container predates the stored-bytes hash, so damage "
              "cannot be ruled out separately)")
    return MachineDependentError(
        f"decoded {name!r} differs from the weights measured when the container was written, but {stored}. "
        f"The container uses the {kind!r} transform, whose float decoder network gives other bits on other "
        "CPUs and GPUs (AVX2, AVX-512, MKL or CUDA kernels), so its weights cannot be verified bit for bit on this "
        f"machine. To load them anyway, unverified, set {ALLOW_UNVERIFIED_ENV}=1 (or pass allow_unverified=True); "
        "to publish a container that decodes identically everywhere, recompress with --transform identity "
        "(the default).")


def warn_unverified(names: list[str], kind: str) -> None:
    if names:
        logger.warning("%d tensors decoded by the %r transform's float decoder could not be verified bit for bit "
                       "on this machine (%s set): loaded unverified, e.g. %s", len(names), kind,
                       ALLOW_UNVERIFIED_ENV, names[:3])


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in place (a view, no copy) for hashing."""
    return memoryview(_byte_array(tensor))


def _byte_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


# ISA-L's CRC-32 (the ``isal`` wheel, a dependency) is zlib's CRC-32, the same function, computed
# with carry-less multiplies: about 30 GB/s on one core where Python's zlib gives 2–4 GB/s, which
# made the checksum a third of an identity container's decode. A wheel, not a system library found
# through ctypes, gives every user on a platform it is built for the same speed; elsewhere zlib
# computes the same values. Both release the GIL, so the checksum runs on the decoding threads.
try:
    from isal.isal_zlib import crc32 as _FAST_CRC32
except ImportError:  # no wheel for this platform
    _FAST_CRC32 = None


def crc32_update(crc: int, data: np.ndarray) -> int:
    """``zlib.crc32(data, crc)`` of a C-contiguous array's bytes, through ISA-L when installed."""
    if not data.flags.c_contiguous:
        raise ValueError("a CRC-32 is taken of contiguous bytes only")
    return (_FAST_CRC32 or zlib.crc32)(data, crc)


def crc32(tensor: torch.Tensor) -> int:
    return crc32_update(0, _byte_array(tensor))


def crc32_blocks(blocks: Iterable[np.ndarray]) -> int:
    """The CRC-32 of consecutive contiguous blocks' bytes, chained: the :func:`crc32` of the whole
    when the blocks tile it in order. Fed each block as a decoder writes it, the checksum reads the
    bytes from cache instead of making a second pass over the tensor in memory."""
    crc = 0
    for block in blocks:
        crc = crc32_update(crc, block)
    return crc


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


STORED_HASH_FIELD = "stored_sha256"


def stored_sha256(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of everything a container stores: its header JSON (without this hash's own field)
    and every part, by name, dtype, shape and bytes, in name order.

    The header is hashed as compact JSON in its own key order, which ``json.loads`` keeps and
    Python's float repr round-trips, so writer and reader hash the same text.
    """
    digest = ModelHash()
    text = json.dumps({k: v for k, v in header.items() if k != STORED_HASH_FIELD}, separators=(",", ":"))
    digest.update("header", torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8))
    for name in sorted(tensors):
        digest.update(name, tensors[name])
    return digest.digest().hex()
