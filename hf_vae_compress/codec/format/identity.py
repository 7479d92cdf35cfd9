"""The identity transform's decode: what an identity-coded tensor's symbols mean.

One multiply per weight, ``float32(symbol) * float32(step * row scale)``, the product of
step and scale taken in float64 and rounded once. Every operation is correctly rounded IEEE
arithmetic, so the result is the same bits on every CPU and GPU: what lets an identity container
be verified everywhere (and the VAE's float network not). However the work is cut (whole tensor,
row blocks, any thread), each weight gets exactly these two roundings, so the bits never depend
on it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .layout import ChunkLayout

# Output bytes per block: small enough that a block's symbols and weights stay in a core's L2
# cache while a checksum reads them back, large enough that the per-block Python cost (a few us)
# is noise.
BLOCK_BYTES = 1 << 18


def row_factors(step: float, scales: torch.Tensor) -> np.ndarray:
    """Each row's ``float32(step * scale)``: the product in float64, rounded once."""
    return (scales.double() * step).float().numpy()


def decode_blocks(symbols: np.ndarray, step: float, layout: ChunkLayout, scales: torch.Tensor,
                  out: np.ndarray) -> Iterator[np.ndarray]:
    """Write the weights of a coded tensor's (chunks, chunk_size) int32 ``symbols`` into ``out`` (a
    C-contiguous float32 array of ``layout``'s size, e.g. a model parameter's own storage), row
    block by row block, yielding each finished block (contiguous) while it is still in cache.

    Per block, two vectorised passes that stay in cache: the symbols converted to float32 into
    ``out``, then multiplied there by their row's factor (the conversion is exact for any symbol a
    tensor can hold, and correctly rounded otherwise, as numpy's own cast in a mixed-type multiply).
    The padding is dropped by a strided view. ``symbols`` may be strided (a ``dims`` stream layout
    read in place): each block is gathered into a small contiguous buffer first. numpy releases the
    GIL in both passes, so tensors decode in parallel on threads.
    """
    factors = row_factors(step, scales)[:, None]
    rows = out.reshape(layout.rows, layout.row_len)
    contiguous = symbols.flags.c_contiguous
    coded = (symbols.reshape(layout.rows, layout.padded_len) if contiguous
             else symbols.reshape(layout.rows, layout.chunks_per_row, layout.chunk_size))
    per_block = max(1, BLOCK_BYTES // (4 * layout.padded_len))
    gathered = None if contiguous else np.empty((min(per_block, layout.rows),) + coded.shape[1:], dtype=np.int32)
    for start in range(0, layout.rows, per_block):
        stop = min(start + per_block, layout.rows)
        block = coded[start:stop]
        if gathered is not None:
            np.copyto(gathered[: stop - start], block)
            block = gathered[: stop - start].reshape(stop - start, layout.padded_len)
        weights = rows[start:stop]
        np.copyto(weights, block[:, : layout.row_len], casting="unsafe")
        np.multiply(weights, factors[start:stop], out=weights)
        yield weights


def decode_weights(symbols: torch.Tensor, step: float, layout: ChunkLayout, scales: torch.Tensor) -> torch.Tensor:
    """The float32 tensor of a coded tensor's (chunks, chunk_size) integer symbols."""
    out = np.empty(layout.shape, dtype=np.float32)
    for _ in decode_blocks(symbols.numpy(), step, layout, scales, out):
        pass
    return torch.from_numpy(out)
