"""Stage 2: cut a tensor into fixed-size chunks of normalised weights, and put it back together.

A tensor is viewed as rows (output channels: dim 0 after dropping leading singleton dims), each
row is divided by its RMS scale and cut into chunks of ``chunk_size`` consecutive values, padding
the row's end with zeros. For a 3x3 convolution and ``chunk_size=9`` a chunk is one kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .streams import quantize_scales


@dataclass(frozen=True)
class ChunkLayout:
    shape: tuple[int, ...]
    rows: int
    row_len: int
    chunk_size: int

    @classmethod
    def of(cls, shape: tuple[int, ...], chunk_size: int) -> "ChunkLayout":
        dims = list(shape)
        while len(dims) > 1 and dims[0] == 1:
            dims.pop(0)
        rows = dims[0]
        return cls(tuple(shape), rows, math.prod(dims) // rows, chunk_size)

    @property
    def chunks_per_row(self) -> int:
        return -(-self.row_len // self.chunk_size)

    @property
    def num_chunks(self) -> int:
        return self.rows * self.chunks_per_row

    @property
    def padded_len(self) -> int:
        return self.chunks_per_row * self.chunk_size


def row_scales(tensor: torch.Tensor, layout: ChunkLayout, per_channel: bool) -> torch.Tensor:
    """RMS per row (or one for the whole tensor), rounded to the quarter-octave grid the container stores."""
    rows = tensor.detach().float().reshape(layout.rows, layout.row_len)
    rms = rows.pow(2).mean(1).sqrt() if per_channel else rows.pow(2).mean().sqrt().expand(layout.rows)
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    return torch.from_numpy(quantize_scales(rms.numpy()))


def to_chunks(tensor: torch.Tensor, layout: ChunkLayout, scales: torch.Tensor) -> torch.Tensor:
    """(num_chunks, chunk_size) normalised chunks, row-major."""
    rows = tensor.detach().float().reshape(layout.rows, layout.row_len) / scales[:, None]
    rows = torch.nn.functional.pad(rows, (0, layout.padded_len - layout.row_len))
    return rows.reshape(layout.num_chunks, layout.chunk_size)


def from_chunks(chunks: torch.Tensor, layout: ChunkLayout, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: drop the padding, undo the scales, restore the shape."""
    rows = chunks.reshape(layout.rows, layout.padded_len)[:, : layout.row_len]
    return (rows * scales[:, None]).reshape(layout.shape)
