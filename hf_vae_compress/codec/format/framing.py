"""The container file: one safetensors file that checks itself, and where a folder keeps it.

It is deliberately named ``weights.vaec.safetensors``: no stock loader looks for that name, so one
finds no weights and fails loudly instead of loading something wrong. Version-1 folders named it
``model.vaec.safetensors``, which ``from_pretrained(repo, variant="vaec")`` asks for by name and
reads as a plain checkpoint (random weights after a warning); that name is still read, never
written. Nothing in it is pickled.

This module is the safetensors layer shared by every format version: one metadata key,
``format = "hf-vae-compress/<version>"``, so foreign files are told apart at once and a reader
refuses versions newer than it knows (one key, because safetensors writes its metadata map in
hash order and several keys would make two saves of the same model differ byte for byte), and a
``header`` entry holding zlib-compressed JSON. What the other entries mean is the version's own
module: :mod:`.v1` (frozen, read only) and :mod:`.v2` (written), chosen in :mod:`.registry`.

Concatenating parts keeps per-tensor framing out of the file: with one safetensors entry per
tensor, the index alone cost more than the bitstreams of a small ViT.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Collection

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .limits import MAX_HEADER_BYTES

CONTAINER_NAME = "weights.vaec.safetensors"
LEGACY_CONTAINER_NAMES = ("model.vaec.safetensors",)  # written by version 1: read, never written
FORMAT_NAME = "hf-vae-compress"
QUANT_METHOD = "hf_vae_compress"  # config.json's quantization_config.quant_method of a compressed folder


class ContainerError(ValueError):
    """A file that is not a valid container of a format version this library can read."""


def folder_container(directory: str | Path) -> Path:
    """The container file of a folder: the one its ``config.json`` names, else the one file under
    today's or a legacy name (two of them, with no config to choose, is refused: picking one would
    be a guess); a path that does not exist when there is none."""
    directory = Path(directory)
    named = _config_container(directory)
    if named is not None:
        return directory / named
    present = [name for name in (CONTAINER_NAME, *LEGACY_CONTAINER_NAMES) if (directory / name).is_file()]
    if len(present) > 1:
        raise ContainerError(f"{directory} holds {len(present)} containers ({', '.join(present)}) and no config.json "
                             "names one: remove the stale one, or load the file by its path")
    return directory / (present[0] if present else CONTAINER_NAME)


def is_compressed_config(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) is a compressed folder's: its quantization config is ours."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def container_name(config: dict) -> str:
    """The container file a compressed ``config.json`` names (older configs name none: the default)."""
    name = config["quantization_config"].get("container") or CONTAINER_NAME
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise ContainerError(f"quantization_config names the container {name!r}, which is not a plain file name")
    return name


def _config_container(directory: Path) -> str | None:
    """The container file name a compressed folder's ``config.json`` records, if it records one."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ContainerError(f"{path} is not valid JSON: {err}") from err
    return container_name(config) if is_compressed_config(config) else None


def serialize(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The exact bytes of a container file, in the format version its header names."""
    packed = np.frombuffer(zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9), dtype=np.uint8)
    everything = {"header": torch.from_numpy(packed.copy()), **{k: v.contiguous() for k, v in tensors.items()}}
    return save(everything, metadata={"format": f"{FORMAT_NAME}/{header['format_version']}"})


def read_container(path: str | Path, readable: Collection[int]) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """Read and validate a container's framing: (version, header, tensors); raises
    :class:`ContainerError` on anything foreign, truncated, too large to be a header, or of a
    format version not in ``readable`` (checked before any tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            version = _check_format(path, f.metadata() or {}, readable)
            # copies: safetensors may hand out views of its memory map, and decoded tensors that
            # alias the file would change if the file were rewritten after loading (found by the fuzzer)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ContainerError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    packed = tensors.pop("header", None)
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ContainerError(f"{path} has no valid header")
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(packed.numpy().tobytes(), MAX_HEADER_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            raise ContainerError(f"{path}: header is truncated or larger than {MAX_HEADER_BYTES} bytes")
        header = json.loads(text)
    except (zlib.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ContainerError(f"{path} has no valid header: {err}") from err
    if not isinstance(header, dict) or header.get("format_version") != version:
        raise ContainerError(f"{path}: header field format_version does not match the file's format {version}")
    return version, header, tensors


def _check_format(path: Path, metadata: dict, readable: Collection[int]) -> int:
    name, _, version = str(metadata.get("format", "")).partition("/")
    if name != FORMAT_NAME:
        raise ContainerError(f"{path} is not an {FORMAT_NAME} container (format={metadata.get('format')!r})")
    if not version.isdigit() or int(version) not in readable:
        raise ContainerError(
            f"{path} has format version {version!r}; this library reads versions {', '.join(map(str, sorted(readable)))}. "
            "Upgrade hf-vae-compress to read it."
        )
    return int(version)
