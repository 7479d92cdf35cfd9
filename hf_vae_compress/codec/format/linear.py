"""The portable VAE's decode: what a ``vae-int`` tensor's symbols and stored maps mean.

A coded tensor with a stored map has an int16 matrix ``M`` (chunk_size x chunk_size) and a
power-of-two exponent ``e``; its decoder is the linear map ``M * 2**e`` applied to each chunk's
integer symbols, times the tensor's step and the row's scale. Per weight, the meaning is:

1. ``acc = sum_k M[j, k] * s[k]``, an exact integer. The reader refuses a tensor whose bound
   ``B = max|s| * max_j sum_k |M[j, k]|`` (exact Python integers) reaches ``2**53``
   (:func:`check_bound`), so ``|acc| <= B < 2**53``.
2. ``acc * 2**e``, exact (a power of two; the exponent range keeps every such value far from
   float64's overflow and subnormal range: ``2**53 * 2**EXPONENT_MAX`` and ``2**EXPONENT_MIN``).
3. ``float32(.)``: one IEEE rounding to nearest even, which every IEEE platform implements
   identically (``cvtsd2ss``, ``fcvt``, CUDA's ``__double2float_rn``).
4. ``* float32(step * scale)``: the row factor of :func:`~.identity.row_factors` (the product of
   step and scale in float64, rounded once), one IEEE float32 multiply, correctly rounded.

Steps 3 and 4 are the identity decode's two roundings (:mod:`.identity`): for ``M = 2**14 * I``
and ``e = -14`` this decode gives the identity's bits. A tensor with no stored map decodes with
the identity arithmetic itself.

How steps 1-3 are computed, and why it is exact (a float matrix product, :func:`accumulator`):
the product ``s @ (M * 2**e)^T`` is taken by the BLAS in float64, or in float32 when ``B < 2**24``
(which every realistic map and latent meets: int16 entries, small symbols). Both operands are
exact in that type (``|M| < 2**15``, ``|s| <= B``; a zero map makes every product a zero whatever
``s`` rounds to). Every product ``M[j, k] * s[k] * 2**e`` and every partial sum of any subset of
them is an integer multiple of ``2**e`` of magnitude at most ``B * 2**e``: with ``B`` below the
type's ``2**p`` (p = 24 or 53 significand bits) and ``2**e`` a normal number of the type
(``2**-100``), each is representable, so every addition and every fused multiply-add is exact,
whatever order, blocking, SIMD width or thread split the BLAS uses. The result is
``acc * 2**e`` itself; in float32 that is already step 3's value (representable, so the rounding
is the identity), in float64 step 3 is one conversion. One thing an exact sum does not fix is the
sign of a zero: a chunk whose products are all ``-0.0`` (zero symbols through negative entries)
may sum to ``-0.0`` or ``+0.0`` depending on how the BLAS starts its accumulator, while the
integer's ``0`` means ``+0.0``; adding ``+0.0`` (``-0 + +0 = +0`` in round-to-nearest, every other
value unchanged) makes it ``+0.0``. No subnormal appears (the smallest nonzero value is
``2**e >= 2**-100``), so flush-to-zero modes change nothing. This needs only that the gemm
computes sums of the products in its working type, which any BLAS gemm does; a gemm allowed to
drop precision (torch's ``float32_matmul_precision`` below "highest" lets oneDNN use bf16 on CPU)
would not be, which is why this is numpy's gemm and not torch's. The integer product of step 1
is the reference the tests compare against, bit for bit.

The BLAS runs on blocks of chunks small enough that OpenBLAS keeps each on the calling thread
(:data:`GEMM_BLOCK`): tensors already decode in parallel on the container's threads, and OpenBLAS's
own threads on top of them (spinning on a shared machine) made one large product 20-60x slower.
numpy releases the GIL in every pass, so the threads overlap.

The encoder side (:func:`quantize_matrix`) is not part of the meaning of a container: it is how
the writer picks ``M`` and ``e``, and lives here next to the limits the reader checks.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .identity import row_factors
from .layout import ChunkLayout

MATRIX_MAX = (1 << 15) - 1  # int16; -32768 is never written, so that |M| <= MATRIX_MAX holds row by row
EXPONENT_MIN, EXPONENT_MAX = -100, 20  # stored exponents (int8); see step 2
EXACT_LIMIT = 1 << 53  # a bound below this is exact in float64 (steps 1-3): what a container may hold
FLOAT32_EXACT_LIMIT = 1 << 24  # a bound below this is exact in float32 as well
# Chunks x chunk_size**2 per gemm: OpenBLAS runs a gemm of m * n * k below 65536 * 4 on the calling
# thread (its SMP threshold), so a block stays single-threaded (speed only; exactness never depends on it).
GEMM_BLOCK = (1 << 18) - 1


def row_l1_max(matrix: np.ndarray) -> int:
    """``max_j sum_k |M[j, k]|`` as an exact Python integer."""
    return int(np.abs(matrix.astype(np.int64)).sum(1).max(initial=0))


def symbol_limit(matrix: np.ndarray) -> int:
    """The largest ``|symbol|`` for which :func:`check_bound` holds: what the encoder clips to."""
    l1 = row_l1_max(matrix)
    return (EXACT_LIMIT - 1) // l1 if l1 else (1 << 31) - 1


def bound(symbols: np.ndarray, matrix: np.ndarray) -> int:
    """``B = max|s| * max_j sum_k |M[j, k]|`` (exact Python integers): no accumulator, and no
    partial sum of one in any order, exceeds it in magnitude."""
    largest = max(int(symbols.max(initial=0)), -int(symbols.min(initial=0)))  # no int32 negation
    return largest * row_l1_max(matrix)


def check_bound(symbols: np.ndarray, matrix: np.ndarray) -> int:
    """The bound :func:`bound`; ValueError unless every accumulator is provably below ``2**53`` (step 1)."""
    largest = bound(symbols, matrix)
    if largest >= EXACT_LIMIT:
        raise ValueError(f"symbols through a map of row sum {row_l1_max(matrix)} exceed 2**53")
    return largest


def check_map(matrix: np.ndarray, exponent: int) -> None:
    """ValueError unless ``matrix`` and ``exponent`` are a map a container may store."""
    if matrix.dtype != np.int16 or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a stored map is a square int16 matrix, got {matrix.dtype} {matrix.shape}")
    if int(matrix.min(initial=0)) < -MATRIX_MAX:
        raise ValueError("a stored map holds -32768")
    if not EXPONENT_MIN <= exponent <= EXPONENT_MAX:
        raise ValueError(f"map exponent {exponent} is outside [{EXPONENT_MIN}, {EXPONENT_MAX}]")


def accumulator(symbols: np.ndarray, matrix: np.ndarray) -> type[np.floating]:
    """The float type whose gemm is exact for these symbols (see the module docstring): float32
    when the bound is below ``2**24``, else float64; ValueError when it reaches ``2**53``."""
    return np.float32 if check_bound(symbols, matrix) < FLOAT32_EXACT_LIMIT else np.float64


def decoded_blocks(symbols: np.ndarray, matrix: np.ndarray, exponent: int,
                   chunks_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
    """Steps 1-3 on (chunks, chunk_size) integer ``symbols``, ``chunks_per_block`` chunks at a time:
    ``(first chunk, float32 chunks)``, the chunks in one buffer reused for the next block."""
    dtype = accumulator(symbols, matrix)
    weights = np.ascontiguousarray((matrix.astype(np.float64) * math.ldexp(1.0, exponent)).T.astype(dtype))  # exact
    size = min(chunks_per_block, len(symbols))
    operand = np.empty((size, matrix.shape[0]), dtype=dtype)
    product = np.empty_like(operand)
    rounded = product if dtype == np.float32 else np.empty(product.shape, dtype=np.float32)
    for start in range(0, len(symbols), chunks_per_block):
        n = min(chunks_per_block, len(symbols) - start)
        np.copyto(operand[:n], symbols[start: start + n], casting="unsafe")  # exact (|s| <= B), or times 0
        np.matmul(operand[:n], weights, out=product[:n])  # exact: acc * 2**e
        np.add(product[:n], 0.0, out=product[:n])  # -0.0 -> +0.0, nothing else changes
        if rounded is not product:
            np.copyto(rounded[:n], product[:n], casting="same_kind")  # step 3: one rounding
        yield start, rounded[:n]


def gemm_chunks(chunk_size: int) -> int:
    """Chunks per single-threaded gemm (:data:`GEMM_BLOCK`), at least one."""
    return max(1, GEMM_BLOCK // (chunk_size * chunk_size))


def decode_chunks(symbols: np.ndarray, matrix: np.ndarray, exponent: int) -> np.ndarray:
    """Steps 1-3: float32 ``(M * 2**e) @ s`` of (chunks, chunk_size) int32 ``symbols``, exactly."""
    out = np.empty(symbols.shape, dtype=np.float32)
    for start, chunks in decoded_blocks(symbols, matrix, exponent, gemm_chunks(matrix.shape[0])):
        out[start: start + len(chunks)] = chunks
    return out


def decode_weights(symbols: torch.Tensor, matrix: np.ndarray, exponent: int, step: float, layout: ChunkLayout,
                   scales: torch.Tensor) -> torch.Tensor:
    """The float32 tensor of a coded tensor's (chunks, chunk_size) integer symbols through its map.

    Row block by row block (whole rows, so the padding is dropped by a strided view): the block's
    chunks from :func:`decoded_blocks`, then step 4 written straight into the output, while the
    block is still in cache."""
    out = np.empty(layout.shape, dtype=np.float32)
    rows = out.reshape(layout.rows, layout.row_len)
    factors = row_factors(step, scales)[:, None]
    per_row = max(1, layout.chunks_per_row)
    rows_per_block = max(1, gemm_chunks(layout.chunk_size) // per_row)
    for start, chunks in decoded_blocks(symbols.numpy(), matrix, exponent, rows_per_block * per_row):
        first, last = start // per_row, (start + len(chunks)) // per_row
        block = chunks.reshape(last - first, layout.padded_len)[:, : layout.row_len]
        np.multiply(block, factors[first:last], out=rows[first:last])  # step 4: float32 * float32
    return torch.from_numpy(out)


def quantize_matrix(matrix: np.ndarray) -> tuple[np.ndarray, int]:
    """The stored form of a float map: ``(M, e)`` with ``M = round(D / 2**e)`` in int16 and the
    smallest ``e`` for which it fits, so the largest entry keeps 15 significant bits (a relative
    error of at most 2**-15 of the largest entry; fp16 keeps 11 bits). A zero map gets ``e = 0``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    largest = float(np.abs(matrix).max(initial=0.0))
    if largest == 0.0:
        return np.zeros(matrix.shape, dtype=np.int16), 0
    exponent = math.frexp(largest)[1] - 15  # largest / 2**e in [2**14, 2**15)
    while np.abs(np.round(matrix / math.ldexp(1.0, exponent))).max() > MATRIX_MAX:  # rounding up to 2**15
        exponent += 1
    exponent = min(max(exponent, EXPONENT_MIN), EXPONENT_MAX)
    scaled = np.clip(np.round(matrix / math.ldexp(1.0, exponent)), -MATRIX_MAX, MATRIX_MAX)
    return scaled.astype(np.int16), exponent


def dequantize_matrix(matrix: np.ndarray, exponent: int) -> np.ndarray:
    """``M * 2**e`` as float64 (exact): the float view of a stored map, for the encoder and training."""
    return matrix.astype(np.float64) * math.ldexp(1.0, exponent)
