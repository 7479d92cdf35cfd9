import numpy as np
import pytest

from hf_vae_compress.codec.format import grid, streams
from hf_vae_compress.codec.rate import estimate_bits, estimate_tensor_bits

HEADER = bytes.fromhex(streams.pcodec_header())


def _round_trip(values: np.ndarray) -> int:
    coded = streams.compress_symbols(values)
    out = np.empty(len(values), dtype=np.int32)
    streams.decompress_symbols(HEADER, coded, out)
    assert np.array_equal(out, values)
    return sum(len(m) + len(p) for m, p in coded)


def test_streams_round_trip_including_edge_cases():
    rng = np.random.default_rng(0)
    for values in (np.zeros(0), np.full(5000, -7), rng.integers(-300, 300, 5000),
                   np.concatenate([np.zeros(4990), [2**30, -(2**30), 77, -78, 5, 6, 7, 8, 9, 10]])):
        _round_trip(values.astype(np.int32))


def test_long_tensors_are_cut_into_streams_that_decode_in_parallel(monkeypatch):
    monkeypatch.setattr(streams, "MAX_STREAM", 1000)
    values = np.round(np.random.default_rng(1).laplace(0, 2, 2500)).astype(np.int32)
    assert len(streams.compress_symbols(values)) == 3
    _round_trip(values)


def test_coded_size_is_close_to_the_estimate():
    values = np.round(np.random.default_rng(1).laplace(0, 2, 150_000)).astype(np.int32)
    actual = 8 * _round_trip(values)
    assert abs(actual / estimate_bits(values) - 1) < 0.02


@pytest.mark.parametrize("layout_wins", ["flat", "dims"])
def test_tensor_layout_is_the_smaller_one_and_round_trips(layout_wins):
    rng = np.random.default_rng(2)
    spread = np.array([8.0, 0.05, 0.05, 0.05]) if layout_wins == "dims" else np.ones(4)
    symbols = np.round(rng.laplace(0, 1, (20000, 4)) * spread).astype(np.int32)
    layout, coded = streams.compress_tensor(symbols)
    assert layout == layout_wins
    assert len(coded) == len(streams.tensor_stream_sizes(layout, 20000, 4))
    assert np.array_equal(streams.decompress_tensor(HEADER, layout, coded, 20000, 4), symbols)


def test_a_corrupt_or_misframed_stream_raises_value_error():
    values = np.round(np.random.default_rng(3).laplace(0, 2, 10_000)).astype(np.int32)
    (meta, page), = streams.compress_symbols(values)
    out = np.empty(len(values), dtype=np.int32)
    for bad in ([(meta, page[: len(page) // 2])], [(meta[:3], page)], [(meta, page + b"\0")], []):
        with pytest.raises(ValueError):
            streams.decompress_symbols(HEADER, bad, out)


def test_scales_live_on_an_exact_quarter_octave_grid():
    k = np.arange(-300, 300, dtype=np.int32)
    scales = grid.scales_from_exponents(k)
    np.testing.assert_allclose(scales, 2.0 ** (k / 4), rtol=1e-7)
    assert np.array_equal(grid.scale_exponents(scales), k)
    rms = np.array([1e-3, 0.37, 1.0, 5.5], dtype=np.float32)
    assert np.all(np.abs(np.log2(grid.quantize_scales(rms) / rms)) <= 0.125 + 1e-6)
    with pytest.raises(ValueError):
        grid.scale_exponents(np.array([1.1], dtype=np.float32))


@pytest.mark.parametrize("bits", [1, 5, 7, 10, 23])
def test_floats_keep_their_relative_precision_sign_and_specials(bits):
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.integers(-6, 6, 1000),
                             [0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-42]]).astype(np.float32)
    back = grid.decompress_floats(grid.compress_floats(values, bits), bits)
    assert np.array_equal(np.signbit(back), np.signbit(values))
    finite = np.isfinite(values) & (np.abs(values) > 1e-37)
    assert np.all(np.abs(back[finite] / values[finite] - 1) <= 2.0 ** -(bits + 1) * (1 + 1e-6))
    assert np.array_equal(back[np.isinf(values)], values[np.isinf(values)])
    assert np.all(np.isfinite(back[np.isfinite(values)]))
    if bits == 23:
        assert np.array_equal(back.view(np.int32), values.view(np.int32))


def test_estimates_of_symbols_spread_over_billions_of_values_equal_the_compact_ones():
    """At a tiny step symbols reach 2**31; the estimate depends only on how often each value occurs, so
    spreading the same symbols far apart gives the same bits, without a counting table over the range
    (convnext_tiny's rate search once asked numpy for 137 GiB there)."""
    rng = np.random.default_rng(0)
    compact = np.round(rng.laplace(0, 2, size=(5000, 9))).astype(np.int64)
    spread = compact * 300_000_000  # the same counts, over a range of billions
    assert estimate_tensor_bits(spread) == pytest.approx(estimate_tensor_bits(compact), rel=1e-12)
    assert estimate_bits(spread[:, 0]) == pytest.approx(estimate_bits(compact[:, 0]), rel=1e-12)
