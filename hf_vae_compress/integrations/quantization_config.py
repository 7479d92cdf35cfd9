"""The ``quantization_config`` of a compressed checkpoint's ``config.json``, as one dataclass.

:func:`hf_vae_compress.hub.save_pretrained` writes it, and the transformers quantizer's
``HfVaeCompressConfig`` is this dataclass behind transformers' ``QuantizationConfigMixin``: one
list of fields, defaults and checks for the writer and every reader. This module imports neither
transformers nor timm, so saving or pushing a timm model never needs transformers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass

import torch

from ..codec import CONTAINER_NAME, QUANT_METHOD, CompressedModel, container_name

logger = logging.getLogger(__name__)


@dataclass
class QuantizationConfig:
    """What a compressed ``config.json`` says about its weights (plain JSON, in this field order).

    ``container``: the file holding the compressed weights; ``dtype``: the dtype of the decoded
    floating-point weights, which ``from_pretrained(dtype="auto")`` uses when the model config names
    none. ``format_version``, ``bits_per_weight`` and ``codec_version`` are informational: what a
    reader checks is the container's own header. The defaults are what a config written before a
    field existed means.
    """

    quant_method: str = QUANT_METHOD
    container: str = CONTAINER_NAME
    dtype: str | None = "float32"
    format_version: int = 1
    bits_per_weight: float | None = None
    codec_version: str | None = None

    def __post_init__(self) -> None:
        """Refuse what would make a loader read the wrong file or build the model in a non-float dtype."""
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quantization_config.quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}: "
                             "not an hf_vae_compress checkpoint")
        container_name({"quantization_config": {"container": self.container}})  # the codec's rule for the name
        dtype = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else None
        if self.dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"quantization_config.dtype is {self.dtype!r}, not a floating-point torch dtype "
                             "(float32, float16, bfloat16): restore the config.json saved with the model")

    @classmethod
    def of(cls, compressed: CompressedModel, bits_per_weight: float) -> QuantizationConfig:
        """The config of a container about to be written: its most common floating-point dtype (first
        seen wins a tie), its format and library versions, and the measured rate."""
        header = compressed.header
        float_dtypes = Counter(e["dtype"] for e in header["tensors"] if e["dtype"].startswith(("float", "bfloat")))
        return cls(
            dtype=float_dtypes.most_common(1)[0][0] if float_dtypes else "float32",
            format_version=header.get("format_version", 1),
            bits_per_weight=round(bits_per_weight, 4),
            codec_version=header.get("library", {}).get("hf_vae_compress", "unknown"),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantizationConfig:
        """The fields this version knows; fields a newer hf_vae_compress added are left out (and
        logged), since the container's header, not the config, decides whether it can be read."""
        known = {f.name for f in dataclasses.fields(cls)}
        newer = sorted(set(data) - known)
        if newer:
            logger.info("quantization_config fields unknown to this hf_vae_compress, ignored: %s", newer)
        return cls(**{k: v for k, v in data.items() if k in known})
