"""The container object: :class:`CompressedModel` loads, decodes, reports and saves a container
of any readable format version, through the version's reader (:mod:`.format.registry`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import VAECompressionConfig
from .folding import BATCHNORM_FOLDED
from .format.fields import stored_config
from .format.framing import CONTAINER_NAME, folder_container, serialize
from .format.registry import WRITER, read, reader
from .latents import Latents
from .transform import transform_class

# what report() counts as side information: not the coded weights themselves
SIDE_PARTS = ("tables", "scales", "decoder", "header")


class CompressedModel:
    """A compressed checkpoint: the container's header and tensors, held in memory."""

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor]):
        self.header = header
        self.tensors = tensors
        self._reader = reader(header["format_version"])
        # How this object was produced (wall-clock seconds, the checkpoint a run resumed from).
        # Never written: the header holds only what the inputs determine, so the same model,
        # config and seed give the same bytes, however long the run took or how often it resumed.
        self.stats: dict = {}

    @classmethod
    def from_latents(cls, latents: Latents, progress: bool = False, side: dict | None = None) -> "CompressedModel":
        """Entropy-code :class:`Latents` into a container of the version this library writes
        (``side``: its coded side parts, when the caller already has them)."""
        return cls(*WRITER.assemble(latents, progress, side))

    @property
    def version(self) -> int:
        return self.header["format_version"]

    @property
    def config(self) -> VAECompressionConfig:
        """The configuration the container was written with."""
        return stored_config(self.header)

    def to_bytes(self) -> bytes:
        """The exact bytes of the container file (sealed with its stored-bytes hash where the version has one)."""
        return serialize(self._reader.seal(self.header, self.tensors), self.tensors)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONTAINER_NAME
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CompressedModel":
        """Load from a container file or a folder holding one (see :func:`~.format.framing.folder_container`)."""
        path = Path(path)
        _, header, tensors = read(folder_container(path) if path.is_dir() else path)
        return cls(header, tensors)

    @property
    def names_verified(self) -> bool:
        """Whether the format's checks cover tensor names (version 1 hashed only their bytes)."""
        return self._reader.NAMES_VERIFIED

    @property
    def batchnorm_folded(self) -> int:
        """How many BatchNorm layers the container stores folded (:mod:`.folding`); 0 for containers
        written before folding, and for a header whose count is not a non-negative integer (the
        header is untrusted and nothing decodes from this count)."""
        count = self.header.get(BATCHNORM_FOLDED, 0)
        return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0

    @property
    def portable(self) -> bool:
        """Whether this container decodes to the same bits on every machine (no float decoder network)."""
        return transform_class(self.header["transform"]["kind"]).portable

    def iter_decoded(self, progress: bool = False,
                     allow_unverified: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs in state-dict order, decoded one tensor at a time (a lower memory
        peak than :meth:`decode`), each checked as soon as it is decoded.

        A v2 container's stored bytes are checked first (a mismatch is corruption). A container
        written before the stored-bytes hash has its whole-model SHA-256 checked when the generator
        ends: the last pair comes out before it, and :class:`IntegrityError` is raised after it on a
        mismatch (version 1: one SHA-256 per tensor, as it is decoded). A float decoder network's output
        that differs on this machine raises :class:`MachineDependentError`, unless
        ``allow_unverified`` (default: the ``HF_VAE_COMPRESS_ALLOW_UNVERIFIED_DECODE`` environment
        variable) lets it through, unverified, with a warning.
        """
        return self._reader.iter_decoded(self.header, self.tensors, progress, allow_unverified)

    def decode(self, progress: bool = False, allow_unverified: bool | None = None) -> dict[str, torch.Tensor]:
        """The dense state dict, every tensor and the whole model checked (see :meth:`iter_decoded`)."""
        return dict(self.iter_decoded(progress, allow_unverified))

    def decode_into(self, targets: dict[str, torch.Tensor], progress: bool = False,
                    allow_unverified: bool | None = None) -> None:
        """Decode every tensor into ``targets`` (e.g. a built model's ``state_dict()``: tensors that share
        storage with its parameters), which must name exactly the container's tensors.

        Checked as :meth:`iter_decoded`. Where the format can (version 2, identity-coded float32
        weights), the weights are dequantised straight into the targets' storage from the decoding
        threads: no decoded copy of the model is ever held, and no second pass copies it in. Every
        other tensor is copied in (cast to the target's dtype) as it comes. A failed check raises and
        leaves ``targets`` part-written.
        """
        into = {"into": targets} if getattr(self._reader, "DECODES_INTO", False) else {}  # v1 (frozen) cannot
        written = set()
        with torch.no_grad():
            for name, tensor in self._reader.iter_decoded(self.header, self.tensors, progress, allow_unverified, **into):
                if name not in targets:
                    raise KeyError(f"the container holds {name!r}, which the targets do not")
                if tensor is not targets[name]:
                    _copy_in(targets[name], tensor)
                written.add(name)
        if written != set(targets):
            raise KeyError(f"the container does not cover {sorted(set(targets) - written)[:5]}")

    def stored_bytes_verified(self) -> bool:
        """Check the stored bytes alone, without decoding: True when they match their SHA-256 (raises
        :class:`IntegrityError` when they do not), False when the container records no such hash
        (version 1, and version 2 before it was added)."""
        return self._reader.stored_verified(self.header, self.tensors)

    def unpack(self) -> Latents:
        """The container as editable :class:`Latents` (no checks: what fine-tuning starts from)."""
        return self._reader.unpack(self.header, self.tensors)

    def report(self) -> dict:
        """Bytes per part, bits per weight and per-tensor rates of the container as it is written.

        ``parts["header"]`` is what the other parts leave of the file: the header, the hashes and
        the safetensors framing. ``side_information_bytes`` sums the parts that are not coded
        weights (tables, scales, decoder, header); coded 1-D tensors (``vectors``) are weights.
        ``num_weights`` counts every floating-point value of the model, coded or stored: the
        denominator of every bits-per-weight figure this library reports. Where the transform
        chooses per tensor (``vae-int``; ``auto`` writes one), each layer also says whether it
        decodes through its learned ``"map"`` or as the ``"identity"``.
        """
        total = len(self.to_bytes())
        sizes = self._reader.report_parts(self.tensors)
        sizes["header"] = total - sum(sizes.values())
        entries = self.header["tensors"]
        num_weights = sum(math.prod(e["shape"]) for e in entries if e["dtype"].startswith(("float", "bfloat")))
        layers = []
        for e in entries:
            nbytes = self._reader.layer_bytes(e)
            if nbytes is not None:
                layers.append(dict(name=e["name"], shape=e["shape"], step=e["step"], bytes=nbytes,
                                   bits_per_weight=8 * nbytes / math.prod(e["shape"])))
        maps = self.header.get("transform", {}).get("linear_maps")
        if maps is not None:  # a per-tensor choice (vae-int, auto): which coded tensors kept a learned map
            for index, layer in enumerate(layers):
                layer["transform"] = "map" if index in maps else "identity"
        side = sum(sizes.get(p, 0) for p in SIDE_PARTS)
        return dict(total_bytes=total, parts=sizes, num_weights=num_weights, bits_per_weight=8 * total / num_weights,
                    fp32_safetensors_bytes=self.header["fp32_safetensors_bytes"],
                    ratio_vs_fp32=self.header["fp32_safetensors_bytes"] / total, layers=layers,
                    format_version=self.version, side_information_bytes=side,
                    side_information_fraction=side / total)


def _copy_in(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a decoded tensor into its target. A float32 CPU copy is a plain copy on this thread:
    ``Tensor.copy_`` would run on torch's intra-op threads while the decoding threads still run,
    and on a busy 2-core machine that contention made a load with mapped tensors several times slower."""
    if (target.dtype == tensor.dtype == torch.float32 and target.device.type == tensor.device.type == "cpu"
            and target.shape == tensor.shape and target.is_contiguous() and tensor.is_contiguous()):
        np.copyto(target.detach().numpy(), tensor.detach().numpy())
    else:
        target.copy_(tensor)
