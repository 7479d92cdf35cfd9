"""The portable VAE's decode: what a ``vae-int`` tensor's symbols and stored maps mean.

A coded tensor with a stored map has an int16 matrix ``M`` (chunk_size x chunk_size) and a
power-of-two exponent ``e``; its decoder is the linear map ``M * 2**e`` applied to each chunk's
integer symbols, times the tensor's step and the row's scale. Per weight, in this order:

1. ``acc = sum_k M[j, k] * s[k]`` in int64. Integer arithmetic is exact and associative: any
   summation order, blocking, SIMD width or thread split gives the same integer. It cannot
   overflow: ``|acc| <= max|s| * max_j sum_k |M[j, k]|``, and the reader refuses a tensor whose
   bound (exact Python integers) reaches ``2**53`` (:func:`check_bound`), far below int64's range.
2. ``float64(acc)``: exact, because ``|acc| < 2**53`` (the float64 significand). No rounding
   happens, so no conversion routine can differ (this is why the int64 value is not converted
   straight to float32: that one rounding is correctly rounded by x86's ``cvtsi2ss`` and ARM's
   ``scvtf``, but a compiler may route int64 -> float32 through float64 on some targets, a double
   rounding; int64 -> float64 below ``2**53`` leaves nothing to route).
3. ``* 2.0**e`` in float64: exact (a power of two; the exponent range keeps the product far from
   float64's overflow and subnormal range: ``2**53 * 2**EXPONENT_MAX`` and ``2**EXPONENT_MIN``).
4. ``float32(.)``: one IEEE rounding to nearest even, which every IEEE platform implements
   identically (``cvtsd2ss``, ``fcvt``, CUDA's ``__double2float_rn``).
5. ``* float32(step * scale)``: the row factor of :func:`~.identity.row_factors` (the product of
   step and scale in float64, rounded once), one IEEE float32 multiply, correctly rounded.

Steps 4 and 5 are the identity decode's two roundings (:mod:`.identity`): for ``M = 2**14 * I``
and ``e = -14`` this decode gives the identity's bits. A tensor with no stored map decodes with
the identity arithmetic itself. Every operation is exact or one correctly-rounded IEEE operation
on the same inputs, so the output bits are the same on every CPU and GPU however the work is cut.

The encoder side (:func:`quantize_matrix`) is not part of the meaning of a container: it is how
the writer picks ``M`` and ``e``, and lives here next to the limits the reader checks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .identity import row_factors
from .layout import ChunkLayout

MATRIX_MAX = (1 << 15) - 1  # int16; -32768 is never written, so that |M| <= MATRIX_MAX holds row by row
EXPONENT_MIN, EXPONENT_MAX = -100, 20  # stored exponents (int8); see step 3
EXACT_LIMIT = 1 << 53  # |acc| below this converts to float64 exactly (step 2)
BLOCK_CHUNKS = 1 << 15  # chunks per int64 block: bounds the accumulator's memory on large tensors


def row_l1_max(matrix: np.ndarray) -> int:
    """``max_j sum_k |M[j, k]|`` as an exact Python integer."""
    return int(np.abs(matrix.astype(np.int64)).sum(1).max(initial=0))


def symbol_limit(matrix: np.ndarray) -> int:
    """The largest ``|symbol|`` for which :func:`check_bound` holds: what the encoder clips to."""
    l1 = row_l1_max(matrix)
    return (EXACT_LIMIT - 1) // l1 if l1 else (1 << 31) - 1


def check_bound(symbols: np.ndarray, matrix: np.ndarray) -> None:
    """ValueError unless every accumulator is provably below ``2**53`` (step 1 and 2)."""
    largest = int(np.abs(symbols.astype(np.int64)).max(initial=0))
    if largest * row_l1_max(matrix) >= EXACT_LIMIT:
        raise ValueError(f"symbols up to {largest} through a map of row sum {row_l1_max(matrix)} exceed 2**53")


def check_map(matrix: np.ndarray, exponent: int) -> None:
    """ValueError unless ``matrix`` and ``exponent`` are a map a container may store."""
    if matrix.dtype != np.int16 or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a stored map is a square int16 matrix, got {matrix.dtype} {matrix.shape}")
    if int(matrix.min(initial=0)) < -MATRIX_MAX:
        raise ValueError("a stored map holds -32768")
    if not EXPONENT_MIN <= exponent <= EXPONENT_MAX:
        raise ValueError(f"map exponent {exponent} is outside [{EXPONENT_MIN}, {EXPONENT_MAX}]")


def decode_chunks(symbols: np.ndarray, matrix: np.ndarray, exponent: int) -> np.ndarray:
    """Steps 1-4: float32 ``(M * 2**e) @ s`` of (chunks, chunk_size) int32 ``symbols``, exactly."""
    check_bound(symbols, matrix)
    out = np.empty(symbols.shape, dtype=np.float32)
    weights = matrix.astype(np.int64).T
    power = math.ldexp(1.0, exponent)
    for start in range(0, len(symbols), BLOCK_CHUNKS):
        block = symbols[start: start + BLOCK_CHUNKS].astype(np.int64) @ weights  # exact
        exact = block.astype(np.float64)  # exact: |block| < 2**53
        exact *= power  # exact: a power of two in range
        out[start: start + BLOCK_CHUNKS] = exact  # one rounding to nearest even
    return out


def decode_weights(symbols: torch.Tensor, matrix: np.ndarray, exponent: int, step: float, layout: ChunkLayout,
                   scales: torch.Tensor) -> torch.Tensor:
    """The float32 tensor of a coded tensor's (chunks, chunk_size) integer symbols through its map."""
    chunks = decode_chunks(symbols.numpy(), matrix, exponent)
    rows = chunks.reshape(layout.rows, layout.padded_len)[:, : layout.row_len]
    rows = rows * row_factors(step, scales)[:, None]  # step 5: float32 * float32
    return torch.from_numpy(np.ascontiguousarray(rows).reshape(layout.shape))


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
