"""The editable form of a compressed model: integer latents, steps, scales and stored tensors.

It is what :func:`~.compress.compress` produces before entropy coding, what fine-tuning edits
(:mod:`.reparam`), and what the v2 writer (:func:`~.format.v2.assemble`) codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import VAECompressionConfig
from .format.layout import ChunkLayout
from .transform import Transform


@dataclass
class CodedTensor:
    """A coded tensor between stages: its layout, row scales (on the quarter-octave grid) and,
    on the encode side, its normalised chunks (None once decoded from a container)."""

    name: str
    dtype: torch.dtype
    layout: ChunkLayout
    scales: torch.Tensor
    chunks: torch.Tensor | None


@dataclass
class Latents:
    """Everything a container is built from, on the decode side.

    ``reference`` is a state dict with the model's names, shapes and dtypes (its values are not
    used: meta tensors do); ``symbols[i]`` are the integer latents of ``coded[i]``, decoded with
    ``steps[i]``; ``stored`` holds every other tensor in its storage dtype (floats rounded to
    ``config.raw_dtype``, coded as floats with ``config.vector_mantissa_bits``; integers exact).
    """

    reference: dict[str, torch.Tensor]
    coded: list[CodedTensor]
    symbols: list[torch.Tensor]
    steps: list[float]
    stored: dict[str, torch.Tensor]
    transform: Transform
    config: VAECompressionConfig
    fp32_bytes: int | None = None  # size of the fp32 safetensors of the same weights

    def decode_tensor(self, i: int) -> torch.Tensor:
        """The weights of ``coded[i]``, computed exactly as the v2 decoder computes them."""
        c = self.coded[i]
        return self.transform.decode_weights(self.symbols[i], self.steps[i], i, c.layout, c.scales).to(c.dtype)
