"""Stage 6: the container, one safetensors file that checks itself.

It is deliberately named ``model.vaec.safetensors``, not ``model.safetensors``, so a stock loader
finds no weights and fails loudly instead of loading something wrong. Nothing in it is pickled.

Layout (every part is counted in the reported bytes):

* safetensors metadata: one key, ``format = "hf-vae-compress/<version>"``, so foreign files are
  told apart at once (one key, because safetensors writes its metadata map in hash order and
  several keys would make two saves of the same model differ byte for byte);
* ``header``: the JSON header (codec config, transform, tensor table), zlib-compressed;
* ``sha256``: one 32-byte SHA-256 per tensor-table entry, of the decoded tensor;
* ``streams`` (uint8), ``tables`` (uint16 counts), ``scales`` (fp16): all coded tensors'
  bitstreams, probability tables and row scales, concatenated in tensor-table order;
* ``raw.<dtype>``: the stored tensors, flattened and concatenated per storage dtype;
* ``decoder.*``: the decoder's weights (fp16).

Concatenating parts keeps the per-tensor framing out of the file: with one safetensors entry per
tensor, the index alone cost more than the bitstreams of a small ViT.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

CONTAINER_NAME = "model.vaec.safetensors"
FORMAT_NAME = "hf-vae-compress"
FORMAT_VERSION = 1


class ContainerError(ValueError):
    """A file that is not a valid container of a format version this library can read."""


def serialize(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The exact bytes of a container file."""
    packed = np.frombuffer(zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9), dtype=np.uint8)
    everything = {"header": torch.from_numpy(packed.copy()), **{k: v.contiguous() for k, v in tensors.items()}}
    return save(everything, metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"})


def read_container(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a container's framing; raises :class:`ContainerError` on anything foreign."""
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_format(path, f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ContainerError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    try:
        header = json.loads(zlib.decompress(tensors.pop("header").numpy().tobytes()))
    except (KeyError, zlib.error, json.JSONDecodeError) as err:
        raise ContainerError(f"{path} has no valid header") from err
    return header, tensors


def _check_format(path: Path, metadata: dict) -> None:
    name, _, version = str(metadata.get("format", "")).partition("/")
    if name != FORMAT_NAME:
        raise ContainerError(f"{path} is not an {FORMAT_NAME} container (format={metadata.get('format')!r})")
    if not version.isdigit() or not 1 <= int(version) <= FORMAT_VERSION:
        raise ContainerError(
            f"{path} has format version {version!r}; this library reads versions 1..{FORMAT_VERSION}. "
            "Upgrade hf-vae-compress to read it."
        )
