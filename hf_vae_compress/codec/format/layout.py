"""How a tensor is cut into chunks of normalised weights, and put back together.

A tensor is viewed as rows (output channels: dim 0 after dropping leading singleton dims), each
row divided by its scale and cut into chunks of ``chunk_size`` consecutive values, the row's end
padded with zeros. For a 3x3 convolution and ``chunk_size=9`` a chunk is one kernel. The header
stores only shapes and the chunk size: this geometry is what turns them into symbol counts and
decoded chunks back into tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def from_chunks(chunks: torch.Tensor, layout: ChunkLayout, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`~..chunking.to_chunks`: drop the padding, undo the scales, restore the shape."""
    rows = chunks.reshape(layout.rows, layout.padded_len)[:, : layout.row_len]
    return (rows * scales[:, None]).reshape(layout.shape)
