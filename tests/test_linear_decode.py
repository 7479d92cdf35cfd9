"""The stored-map decode (:mod:`hf_vae_compress.codec.format.linear`) is a float gemm, exact only under a
proven bound: float32 below ``2**24``, float64 below ``2**53``. Each test compares its bits with the
integer decode (int64 products, exact far below ``2**63``; then the one rounding to float32 and the
row factor), on inputs where the wrong choice of type would give other bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_vae_compress import CompressedModel
from hf_vae_compress.codec.format import identity, linear
from hf_vae_compress.codec.format.layout import ChunkLayout
from tests.test_portable_vae import KIND, _compress

STEP = 0.013


def integer_decode(symbols: np.ndarray, matrix: np.ndarray, exponent: int, layout: ChunkLayout,
                   scales: torch.Tensor, step: float = STEP) -> np.ndarray:
    """The decode in integers: ``acc`` in int64 (exact), ``acc * 2**e`` in float64 (exact below
    ``2**53``), one rounding to float32, times the row's float32 factor."""
    acc = symbols.astype(np.int64) @ matrix.astype(np.int64).T
    chunks = (acc.astype(np.float64) * math.ldexp(1.0, exponent)).astype(np.float32)
    rows = chunks.reshape(layout.rows, layout.padded_len)[:, : layout.row_len]
    return (rows * identity.row_factors(step, scales)[:, None]).reshape(layout.shape)


def float32_gemm(symbols: np.ndarray, matrix: np.ndarray, exponent: int) -> np.ndarray:
    """What the float32 gemm gives on any symbols: exact only below its bound."""
    weights = (matrix.astype(np.float64) * math.ldexp(1.0, exponent)).astype(np.float32)
    return symbols.astype(np.float32) @ weights.T


def assert_decodes_exactly(symbols: np.ndarray, matrix: np.ndarray, exponent: int, layout: ChunkLayout,
                           scales: torch.Tensor) -> None:
    ours = linear.decode_weights(torch.from_numpy(symbols), matrix, exponent, STEP, layout, scales).numpy()
    expected = integer_decode(symbols, matrix, exponent, layout, scales)
    assert ours.dtype == np.float32 and ours.shape == layout.shape
    assert np.array_equal(ours.view(np.int32), expected.view(np.int32))
    chunks = linear.decode_chunks(symbols, matrix, exponent)
    exact = (symbols.astype(np.int64) @ matrix.astype(np.int64).T).astype(np.float64) * math.ldexp(1.0, exponent)
    assert np.array_equal(chunks.view(np.int32), exact.astype(np.float32).view(np.int32))


def near_bound(largest: int, chunks: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2x2 map of row sum 32768 and symbols up to ``largest`` (reached): bound ``largest * 32768``,
    ``2**24`` at ``largest = 512``. Its accumulators are odd integers of up to 25 bits."""
    matrix = np.array([[32767, 1], [-1, 32767]], dtype=np.int16)
    symbols = np.random.default_rng(seed).integers(-largest, largest + 1, size=(chunks, 2)).astype(np.int32)
    symbols[0, 0] = largest
    return symbols, matrix


def test_float32_is_used_only_below_its_bound():
    below, matrix = near_bound(511)
    assert linear.bound(below, matrix) == 511 * 32768 < 1 << 24
    assert linear.accumulator(below, matrix) is np.float32
    above, _ = near_bound(700)
    assert linear.accumulator(above, matrix) is np.float64
    assert linear.accumulator(near_bound(512)[0], matrix) is np.float64  # 2**24 itself is not below it
    layout = ChunkLayout.of((len(above), 2), 2)
    scales = torch.rand(len(above)) + 0.5
    # the inputs discriminate: beyond the bound the float32 gemm rounds partial sums to other bits
    exact = (above.astype(np.int64) @ matrix.astype(np.int64).T).astype(np.float64) * 2.0 ** -20
    assert not np.array_equal(float32_gemm(above, matrix, -20).view(np.int32), exact.astype(np.float32).view(np.int32))
    for symbols in (below, above):
        assert_decodes_exactly(symbols, matrix, -20, layout, scales)


def test_float64_near_its_bound():
    chunk_size = 512
    generator = np.random.default_rng(1)
    matrix = (generator.choice([-1, 1], size=(chunk_size, chunk_size)) * linear.MATRIX_MAX).astype(np.int16)
    limit = linear.symbol_limit(matrix)  # bound just below 2**53
    symbols = generator.choice([-limit, limit - 1, 1 - limit], size=(6, chunk_size)).astype(np.int32)
    symbols[0, 0] = limit
    assert (1 << 53) - linear.row_l1_max(matrix) <= linear.bound(symbols, matrix) < 1 << 53
    assert linear.accumulator(symbols, matrix) is np.float64
    layout = ChunkLayout.of((3, 2 * chunk_size), chunk_size)
    assert_decodes_exactly(symbols, matrix, -40, layout, torch.rand(3) + 0.5)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        linear.accumulator(symbols * 2, matrix)


@pytest.mark.parametrize("chunk_size,shape", [(9, (37, 1000)), (9, (5, 40000)), (4, (300, 7)), (1, (600, 500)),
                                              (33, (70, 4, 33))])
@pytest.mark.parametrize("largest", [3, 400, 1 << 20])
def test_blocks_padding_and_both_types(chunk_size, shape, largest):
    """Several gemm blocks, a row longer than a block, padded rows, chunks of zeros through negative
    entries (products of ``-0.0``: the decode's zero is ``+0.0``), in float32 and float64."""
    generator = np.random.default_rng(chunk_size + largest)
    layout = ChunkLayout.of(shape, chunk_size)
    matrix = generator.integers(-linear.MATRIX_MAX, linear.MATRIX_MAX + 1, size=(chunk_size, chunk_size))
    matrix = matrix.astype(np.int16)
    symbols = generator.integers(-largest, largest + 1, size=(layout.num_chunks, chunk_size)).astype(np.int32)
    symbols[:: 3] = 0
    assert layout.num_chunks > linear.gemm_chunks(chunk_size) or layout.padded_len > layout.row_len
    assert_decodes_exactly(symbols, matrix, -17, layout, torch.rand(layout.rows) + 0.5)


def test_a_real_container_decodes_as_the_integers(tmp_path):
    """The fit's own map and latents, through the fast path (float32 on realistic symbols)."""
    latents = CompressedModel.load(_compress(KIND, tmp_path)).unpack()
    transform = latents.transform
    assert transform.maps
    for i in transform.maps:
        c, symbols = latents.coded[i], latents.symbols[i].numpy()
        matrix, exponent = transform.maps[i]
        assert linear.accumulator(symbols, matrix) is np.float32
        ours = transform.decode_weights(latents.symbols[i], latents.steps[i], i, c.layout, c.scales).numpy()
        expected = integer_decode(symbols, matrix, exponent, c.layout, c.scales, latents.steps[i])
        assert np.array_equal(ours.view(np.int32), expected.view(np.int32))
