import numpy as np
import pytest

from hf_vae_compress.codec import entropy


@pytest.mark.parametrize("precision", [8, 12, 15])
def test_quantized_counts_sum_exactly_and_keep_every_symbol(precision):
    hist = np.array([1e6, 3, 0, 0, 1, 50_000, 7], dtype=float)
    counts = entropy.quantize_counts(hist, precision)
    assert counts.sum() == 1 << precision and counts.min() >= 1
    assert counts.argmax() == 0


def _round_trip(symbols: np.ndarray, precision: int = 15) -> tuple[np.ndarray, list]:
    words, tables, split = entropy.encode_tensor(symbols, precision)
    counts = np.concatenate([t.counts for t in tables])
    parsed = entropy.parse_tables([t.lo for t in tables], [len(t.counts) for t in tables],
                                  [t.escape for t in tables], counts, precision)
    assert np.array_equal(entropy.decode_tensor(words, parsed, split, len(symbols)), symbols)
    return words, tables


def test_tensors_round_trip_including_edge_cases():
    rng = np.random.default_rng(0)
    columns = [
        np.round(rng.laplace(0, 3, 5000)),
        np.full(5000, -7),  # one-symbol alphabet
        rng.integers(-300, 300, 5000),  # wide alphabet
        np.concatenate([np.zeros(4990), [2**20, -(2**20), 77, -78, 5, 6, 7, 8, 9, 10]]),  # outliers
    ]
    _, tables = _round_trip(np.stack(columns, 1).astype(np.int32))
    assert max(len(t.counts) for t in tables) < 100  # escapes keep tables small however wide the alphabet


def test_contexts_are_used_where_they_pay():
    rng = np.random.default_rng(2)
    energy = rng.choice([0.05, 3.0], size=(20000, 1), p=[0.7, 0.3])  # kernels are "off" or "on"
    symbols = np.round(rng.laplace(0, 1, (20000, 4)) * energy).astype(np.int32)
    _round_trip(symbols)
    assert entropy.encode_tensor(symbols, 15)[2][1:] == [True, True, True]
    independent = np.random.default_rng(3).permutation(symbols.reshape(-1)).reshape(symbols.shape)
    assert entropy.estimate_tensor_bits(symbols, 15) < 0.9 * entropy.estimate_tensor_bits(independent, 15)


def test_coded_size_is_close_to_the_estimate():
    rng = np.random.default_rng(1)
    symbols = np.round(rng.laplace(0, 2, (50_000, 3))).astype(np.int32)
    words, tables, _ = entropy.encode_tensor(symbols, 15)
    actual = 32 * len(words) + sum(16 * len(t.counts) + entropy.TABLE_OVERHEAD_BITS for t in tables)
    assert abs(actual - entropy.estimate_tensor_bits(symbols, 15)) / actual < 0.01


def test_escape_binarisation_is_invertible():
    symbols = np.array([0, 1, -1, 3, -4, 5, 100, -100, 2**22, -(2**22) + 3], dtype=np.int32)
    for escape in entropy.ESCAPE_THRESHOLDS:
        tokens, offsets, sizes = entropy.to_tokens(symbols, escape)
        assert np.all(np.abs(tokens) <= escape + 24) and np.all(offsets < sizes)
        escaped = np.abs(tokens) > escape
        assert np.array_equal(tokens[~escaped], symbols[~escaped])
        bucket = np.abs(tokens[escaped]) - escape - 1
        extra = np.zeros(len(bucket), dtype=np.int64)
        extra[bucket > 0] = offsets
        assert np.array_equal(np.sign(tokens[escaped]) * ((1 << bucket) + extra + escape), symbols[escaped])


def test_corrupt_tables_are_refused():
    _, tables, _ = entropy.encode_tensor(np.arange(10, dtype=np.int32)[:, None], precision=12)
    lo, k, esc, counts = [tables[0].lo], [len(tables[0].counts)], [tables[0].escape], tables[0].counts
    assert entropy.parse_tables(lo, k, esc, counts, 12)[0].lo == tables[0].lo
    bad = counts.copy()
    bad[0] += 1  # counts no longer sum to 2**precision
    with pytest.raises(ValueError, match="corrupt"):
        entropy.parse_tables(lo, k, esc, bad, 12)
    with pytest.raises(ValueError, match="do not match"):
        entropy.parse_tables(lo, k, esc, counts[:-1], 12)
