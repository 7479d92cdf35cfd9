"""The one way a compressed checkpoint becomes a model, used by every loader.

The CLI (``evaluate``, ``push``), :func:`hf_vae_compress.create_model` (timm), the transformers
quantizer and the remote-code shim all ask :func:`find_container` whether a folder is compressed,
and all fit the decoded weights to the model with :func:`fit_state_dict`, so they refuse the same
bad checkpoints with the same messages and can never disagree about what a folder holds.

A folder is compressed when its ``config.json`` carries ``quantization_config.quant_method =
"hf_vae_compress"`` (everything this library writes today; the config names the container file),
or, for folders written by ``hf-vae-compress compress`` before it wrote that config, when it
holds a container file under today's or the version-1 name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from .codec import (
    ALLOW_UNVERIFIED_ENV, CONTAINER_NAME, CompressedModel, ContainerError, allow_unverified, container_name,
    folder_container, is_compressed_config,
)
from .models import build_empty, load_model, read_config

logger = logging.getLogger(__name__)


def named_container(config: dict) -> str | None:
    """The container file a compressed folder's ``config.json`` names; None for any other config.

    What can be asked of a Hub repository with only its config downloaded (timm's ``hf-hub:``
    loader then downloads exactly this file); :func:`find_container` asks it of a local folder to
    tell a compressed folder whose container is missing from a plain one.
    """
    return container_name(config) if is_compressed_config(config) else None


def find_container(folder: str | Path) -> Path | None:
    """The container of a compressed model folder; None for a plain (uncompressed) folder."""
    folder = Path(folder)
    path = folder_container(folder)  # the one config.json names, else the one file present
    if path.is_file():
        return path
    if (folder / "config.json").is_file() and named_container(read_config(folder)) is not None:
        raise FileNotFoundError(f"{folder} is a compressed checkpoint but its container {path.name} is missing")
    return None


def fit_state_dict(decoded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str | Path,
                   rename: Callable[[str], str] | None = None, names_verified: bool = True) -> dict[str, torch.Tensor]:
    """The decoded weights named, ordered and typed as ``expected`` (a state dict, meta tensors
    will do); raises on any missing, unexpected or mis-shaped key.

    ``rename`` maps a decoded name the model does not know to the model's name for it (e.g.
    transformers' legacy renamings, or TimmWrapper's ``timm_model.`` prefix). Floating-point
    tensors are cast only when the model was built in another dtype on purpose; any other dtype
    mismatch (an integer buffer decoded as floats, or the reverse) is refused.

    ``names_verified=False`` (a version-1 container: its hashes cover each tensor's bytes, not its
    name) also asks that the tensors come in the model's state-dict order, the order the writer
    took them in: two same-shaped tensors whose names were swapped would otherwise load silently
    into each other's places. The opt-in for unverified decodes lets an order mismatch through.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in decoded.items():
        target = key if key in expected or rename is None else rename(key)
        if target in renamed:
            raise RuntimeError(f"decoded weights {key!r} and another both map to {target!r}")
        renamed[target] = tensor
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise RuntimeError(
            f"the decoded weights of {source} do not fit the model: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if not names_verified:
        _check_writer_order(list(renamed), list(expected), source)
    out = {}
    for key, ref in expected.items():
        tensor = renamed[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise RuntimeError(f"decoded {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(ref.shape)}")
        if tensor.dtype != ref.dtype and not (tensor.is_floating_point() and ref.is_floating_point()):
            # integer buffers are stored exactly: another dtype is a damaged or foreign header (a
            # version-1 hash covers bytes, not dtypes), never something to cast
            raise RuntimeError(f"decoded {key!r} is {tensor.dtype}, the model expects {ref.dtype}")
        if tensor.dtype != ref.dtype:
            tensor = tensor.to(ref.dtype)
        out[key] = tensor
    return out


def _check_writer_order(decoded: list[str], expected: list[str], source: str | Path) -> None:
    if decoded == expected:
        return
    first = next(i for i, (a, b) in enumerate(zip(decoded, expected)) if a != b)
    message = (f"{source} is a version-1 container, whose hashes do not cover tensor names, and its tensors are "
               f"not in the model's order (position {first}: {decoded[first]!r} where the model has "
               f"{expected[first]!r}), so it cannot be shown that every weight carries its own name")
    if not allow_unverified():
        raise ContainerError(f"{message}. Recompress the model to write format 2, which verifies names, or set "
                             f"{ALLOW_UNVERIFIED_ENV}=1 to load it unverified.")
    logger.warning("%s; loading it unverified (%s set)", message, ALLOW_UNVERIFIED_ENV)


def decode_container(container: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The container's state dict, every tensor checked against its recorded hash (raises
    :class:`~hf_vae_compress.ContainerError` / ``IntegrityError`` otherwise), and whether its
    format verifies tensor names (for :func:`fit_state_dict`)."""
    compressed = CompressedModel.load(container)
    return compressed.decode(), compressed.names_verified


def load_into(model: torch.nn.Module, container: str | Path) -> torch.nn.Module:
    """Decode ``container`` into ``model``'s weights, strictly.

    The names, shapes and dtypes in the container's header are fitted to the model before anything
    is decoded; then each tensor is written into its parameter as it is decoded and checked
    (:meth:`~hf_vae_compress.CompressedModel.decode_into`: identity-coded weights are dequantised
    straight into the parameters' storage), so the model is never held twice. A failed check
    raises, and the model, part-written, is not returned.
    """
    compressed = CompressedModel.load(container)
    try:
        declared = {e["name"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
                    for e in compressed.header["tensors"]}
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as err:
        raise ContainerError(f"{container}: the container's tensor table is malformed: {err}") from err
    targets = model.state_dict()  # tensors that share storage with the model's parameters and buffers
    fit_state_dict(declared, {k: v.to("meta") for k, v in targets.items()}, container,
                   names_verified=compressed.names_verified)
    compressed.decode_into(targets)
    return model


def load_compressed(folder: str | Path) -> torch.nn.Module:
    """Build the architecture from a compressed folder's config and load the decoded weights, in eval mode."""
    container = find_container(folder)
    if container is None:
        raise FileNotFoundError(f"{folder} holds no {CONTAINER_NAME}: not a compressed model folder")
    return load_into(build_empty(folder), container).eval()


def load_folder(folder: str | Path) -> torch.nn.Module:
    """A compressed or plain model folder, loaded in eval mode."""
    return load_compressed(folder) if find_container(folder) is not None else load_model(folder)
