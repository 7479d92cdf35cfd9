"""Stage 2: cut a tensor into fixed-size chunks of normalised weights (the encoder's side).

The geometry (:class:`~.format.layout.ChunkLayout`) and its inverse belong to the format; what is
chosen here, at compression time, is each row's scale: its RMS, on the grid the container stores.
"""

from __future__ import annotations

import torch

from .format.grid import quantize_scales
from .format.layout import ChunkLayout


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
