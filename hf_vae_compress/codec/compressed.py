"""The container object: :class:`CompressedModel` loads, decodes, reports and saves a container
of any readable format version (v1 read only, v2 read and written)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from . import v1, v2
from .config import VAECompressionConfig
from .container import CONTAINER_NAME, ContainerError, folder_container, read_container, serialize
from .latents import Latents
from .transform import transform_class

# what report() counts as side information: not the coded weights themselves
SIDE_PARTS = ("tables", "scales", "decoder", "header")


class CompressedModel:
    """A compressed checkpoint: the container's header and tensors, held in memory."""

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor]):
        self.header = header
        self.tensors = tensors
        # How this object was produced (wall-clock seconds, the checkpoint a run resumed from).
        # Never written: the header holds only what the inputs determine, so the same model,
        # config and seed give the same bytes, however long the run took or how often it resumed.
        self.stats: dict = {}

    @property
    def version(self) -> int:
        return self.header["format_version"]

    @property
    def config(self) -> VAECompressionConfig:
        """The configuration the container was written with. Containers older than output-aware
        rounding do not name a rounding: they were rounded to nearest."""
        return VAECompressionConfig.from_dict({"rounding": "nearest", **self.header["config"]})

    def to_bytes(self) -> bytes:
        """The exact bytes of the container file (a v2 header sealed with its stored-bytes hash)."""
        header = self.header if self.version == 1 else v2.seal(self.header, self.tensors)
        return serialize(header, self.tensors)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONTAINER_NAME
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CompressedModel":
        """Load from a container file or a folder holding one (see :func:`~.container.folder_container`)."""
        path = Path(path)
        _, header, tensors = read_container(folder_container(path) if path.is_dir() else path)
        return cls(header, tensors)

    def _plan(self):
        if self.version == 1:
            raise ContainerError("this needs a version-2 container; version-1 containers decode but cannot be "
                                 "edited: recompress the model")
        return v2.plan(self.header, self.tensors)

    @property
    def portable(self) -> bool:
        """Whether this container decodes to the same bits on every machine (no float decoder network)."""
        return transform_class(self.header["transform"]["kind"]).portable

    def iter_decoded(self, progress: bool = False,
                     allow_unverified: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs in state-dict order, decoded one tensor at a time (a lower memory
        peak than :meth:`decode`), each checked as soon as it is decoded.

        A v2 container's stored bytes are checked first (a mismatch is corruption); its whole-model
        SHA-256 is checked when the generator ends: the last pair comes out before it, and
        :class:`IntegrityError` is raised after it on a mismatch. A float decoder network's output
        that differs on this machine raises :class:`MachineDependentError`, unless
        ``allow_unverified`` (default: the ``HF_VAE_COMPRESS_ALLOW_UNVERIFIED_DECODE`` environment
        variable) lets it through, unverified, with a warning.
        """
        if self.version == 1:
            return v1.iter_decoded(self.header, self.tensors, allow_unverified)
        return v2.iter_decoded(self._plan(), progress, unverified_ok=allow_unverified)

    def decode(self, progress: bool = False, allow_unverified: bool | None = None) -> dict[str, torch.Tensor]:
        """The dense state dict, every tensor and the whole model checked (see :meth:`iter_decoded`)."""
        return dict(self.iter_decoded(progress, allow_unverified))

    def stored_bytes_verified(self) -> bool:
        """Check the stored bytes alone, without decoding: True when they match their SHA-256 (raises
        :class:`IntegrityError` when they do not), False when the container records no such hash
        (version 1, and version 2 before it was added)."""
        return self.version != 1 and self._plan().stored_verified

    def unpack(self) -> Latents:
        """The container as editable :class:`Latents` (no checks: what fine-tuning starts from)."""
        return v2.unpack(self._plan(), self.header["fp32_safetensors_bytes"])

    def report(self) -> dict:
        """Bytes per part, bits per weight and per-tensor rates of the container as it is written.

        ``parts["header"]`` is what the other parts leave of the file: the header, the hashes and
        the safetensors framing. ``side_information_bytes`` sums the parts that are not coded
        weights (tables, scales, decoder, header); coded 1-D tensors (``vectors``) are weights.
        """
        total = len(self.to_bytes())
        sizes = self._part_sizes()
        sizes["header"] = total - sum(sizes.values())
        entries = self.header["tensors"]
        floats = [e for e in entries if e["dtype"].startswith(("float", "bfloat"))]
        num_weights = sum(math.prod(e["shape"]) for e in floats)
        layers = []
        for e in entries:
            nbytes = self._layer_bytes(e)
            if nbytes is not None:
                layers.append(dict(name=e["name"], shape=e["shape"], step=e["step"], bytes=nbytes,
                                   bits_per_weight=8 * nbytes / math.prod(e["shape"])))
        side = sum(sizes.get(p, 0) for p in SIDE_PARTS)
        return dict(total_bytes=total, parts=sizes, num_weights=num_weights, bits_per_weight=8 * total / num_weights,
                    fp32_safetensors_bytes=self.header["fp32_safetensors_bytes"],
                    ratio_vs_fp32=self.header["fp32_safetensors_bytes"] / total, layers=layers,
                    format_version=self.version, side_information_bytes=side,
                    side_information_fraction=side / total)

    def _part_sizes(self) -> dict[str, int]:
        if self.version == 1:
            return v1.report_parts(self.tensors)
        groups = {"bitstreams": ("streams",), "tables": ("tables",), "scales": ("scales",), "vectors": ("vectors",),
                  "decoder": ("decoder.",), "raw": ("raw.",)}
        return {part: sum(v.numel() * v.element_size() for k, v in self.tensors.items() if k.startswith(prefixes))
                for part, prefixes in groups.items()}

    def _layer_bytes(self, entry: dict) -> int | None:
        """A coded tensor's own bytes: its streams and tables (v2), plus its scales (v1)."""
        if self.version == 1:
            return v1.layer_bytes(entry)
        if "streams" not in entry:
            return None
        return sum(m + p for m, p in entry["streams"])
