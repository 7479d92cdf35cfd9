"""The value grids a container stores: row scales, per-tensor steps and rounded floats.

Each is defined so that the decoder computes the same float32 bits on every machine: scales are
exact powers of two times a table of float32 literals, steps are decimal numbers the header
stores as JSON, and rounded floats are fp32 bit patterns with low mantissa bits dropped.
"""

from __future__ import annotations

import numpy as np

# Row scales are powers of 2**(1/4): the exponent is what is stored. A scale only normalises its
# row before quantization and is applied identically on both sides, so its precision costs no
# accuracy; quarter octaves keep each row's effective step within 9 % of the allocation's.
SCALE_STEPS_PER_OCTAVE = 4
# 2**(i/4) for i = 0..3 as exact float32 literals, so the decoded scales are the same on any
# platform (scale = MANTISSAS[k % 4] * 2**(k // 4), computed with the exact ldexp).
_MANTISSAS = np.array([1.0, float.fromhex("0x1.306fe0p+0"), float.fromhex("0x1.6a09e6p+0"),
                       float.fromhex("0x1.ae89fap+0")], dtype=np.float32)

STEP_DIGITS = 4  # significant digits of a stored step: within 0.05 % of the allocation's, 13 fewer header bytes


def stored_step(step: float) -> float:
    """A step as the header stores it (encoder and decoder then use the same value)."""
    return float(f"{step:.{STEP_DIGITS}g}")


def scale_exponents(scales: np.ndarray) -> np.ndarray:
    """The stored integer exponents of row scales that lie on the quarter-octave grid."""
    k = np.round(SCALE_STEPS_PER_OCTAVE * np.log2(scales.astype(np.float64))).astype(np.int32)
    if not np.array_equal(scales_from_exponents(k), scales.astype(np.float32)):
        raise ValueError("row scales are not on the quarter-octave grid")
    return k


def scales_from_exponents(k: np.ndarray) -> np.ndarray:
    """``2**(k/4)`` as float32, bit-exact everywhere (table lookup and exact power-of-two scaling)."""
    k = k.astype(np.int64)
    return np.ldexp(_MANTISSAS[k % SCALE_STEPS_PER_OCTAVE], (k // SCALE_STEPS_PER_OCTAVE)).astype(np.float32)


def quantize_scales(rms: np.ndarray) -> np.ndarray:
    """RMS values rounded to the nearest quarter octave (in the log domain), as float32."""
    k = np.round(SCALE_STEPS_PER_OCTAVE * np.log2(np.maximum(rms.astype(np.float64), 1e-30)))
    return scales_from_exponents(np.clip(k, -500, 500).astype(np.int32))


def compress_floats(values: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """int32 symbols of float32 values rounded to ``mantissa_bits`` mantissa bits (of 23).

    The fp32 bit pattern is sign-magnitude and, for a fixed sign, ordered like the value, so
    dropping low bits with a carry is round-to-nearest in relative precision: what BN variances
    (which span decades) and biases near zero need, where a uniform step would not do.
    ``-0.0`` maps to -1, so every value, signed zeros included, comes back as rounded.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.int32).astype(np.int64)
    negative = bits < 0
    magnitude = bits & 0x7FFFFFFF
    shift = 23 - mantissa_bits
    finite = magnitude < 0x7F800000
    if shift:
        rounded = (magnitude + (1 << (shift - 1))) >> shift
        # a carry may not turn the largest finite values into infinity; inf and nan keep their class
        rounded = np.where(finite, np.minimum(rounded, (0x7F7FFFFF >> shift)), magnitude >> shift)
    else:
        rounded = magnitude
    return np.where(negative, -rounded - 1, rounded).astype(np.int32)


def decompress_floats(symbols: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """float32 values of :func:`compress_floats` symbols."""
    symbols = symbols.astype(np.int64)
    negative = symbols < 0
    magnitude = np.where(negative, -symbols - 1, symbols) << (23 - mantissa_bits)
    bits = (magnitude | (negative.astype(np.int64) << 31)) & 0xFFFFFFFF
    return bits.astype(np.uint32).view(np.float32)
