"""Stage 5: entropy coding of integer symbols with constriction's ANS coder.

Each latent dimension of each tensor is one stream with its own probability table: an integer
histogram over ``[lo, lo + K)``, quantized so that its counts sum to exactly
``2**precision`` with every count at least 1. Because the counts are exact integers that sum to
a power of two, the coder's fixed-point model is exactly the stored table, and decoding is
bit-exact on any machine. All streams of one tensor share one ANS stack, so a tensor is one
bitstream. Counts are stored as uint16 (precision <= 15); ``lo`` and ``K`` go in the header.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

TABLE_OVERHEAD_BITS = 48  # lo and K in the compressed header, roughly


@dataclass(frozen=True)
class Table:
    lo: int
    counts: np.ndarray  # int64, sums to 2**precision, all >= 1

    @property
    def model(self):
        return constriction.stream.model.Categorical(self.counts.astype(np.float64), perfect=False)



def quantize_counts(hist: np.ndarray, precision: int) -> np.ndarray:
    """Integer counts >= 1 summing to ``2**precision``, proportional to ``hist``."""
    total = 1 << precision
    if len(hist) > total:
        raise ValueError(f"alphabet of {len(hist)} symbols does not fit a {precision}-bit table")
    counts = np.maximum(1, np.floor(hist / hist.sum() * total)).astype(np.int64)
    excess = counts.sum() - total
    order = np.argsort(-counts, kind="stable")
    i = 0
    while excess != 0:  # take from (or give to) the largest counts, never below 1
        j = order[i % len(order)]
        change = min(excess, counts[j] - 1) if excess > 0 else excess
        counts[j] -= change
        excess -= change
        i += 1
    return counts


def fit_table(symbols: np.ndarray, precision: int) -> Table:
    lo, hi = int(symbols.min()), int(symbols.max())
    hist = np.bincount(symbols - lo, minlength=hi - lo + 1).astype(np.float64)
    return Table(lo, quantize_counts(hist, precision))


def estimate_bits(symbols: np.ndarray, precision: int) -> float:
    """Payload bits under the fitted table plus the table's own bits (16 per count as stored)."""
    table = fit_table(symbols, precision)
    hist = np.bincount(symbols - table.lo, minlength=len(table.counts))
    payload = -(hist * (np.log2(table.counts) - precision)).sum()
    return float(payload + 16 * len(table.counts) + TABLE_OVERHEAD_BITS)


def encode_streams(streams: list[np.ndarray], precision: int) -> tuple[np.ndarray, list[Table]]:
    """One ANS bitstream (uint32 words) for several symbol streams, and their tables."""
    tables = [fit_table(s, precision) for s in streams]
    coder = constriction.stream.stack.AnsCoder()
    for symbols, table in reversed(list(zip(streams, tables))):  # a stack: encode last stream first
        if len(table.counts) > 1:  # a one-symbol stream costs no bits
            coder.encode_reverse((symbols - table.lo).astype(np.int32), table.model)
    return coder.get_compressed(), tables


def parse_tables(los: list[int], sizes: list[int], counts: np.ndarray, precision: int) -> list[Table]:
    """Tables from the header's ``lo``/``K`` lists and the stored counts, validating what a
    corrupt file could break."""
    if len(los) != len(sizes) or sum(sizes) != len(counts) or min(sizes, default=1) < 1:
        raise ValueError("probability tables do not match their header")
    tables, pos = [], 0
    for lo, k in zip(los, sizes):
        part = counts[pos: pos + k].astype(np.int64)
        if part.min() < 1 or part.sum() != (1 << precision):
            raise ValueError("probability tables are corrupt")
        tables.append(Table(int(lo), part))
        pos += k
    return tables


def decode_streams(words: np.ndarray, tables: list[Table], length: int) -> list[np.ndarray]:
    """Decode ``len(tables)`` streams of ``length`` symbols each."""
    coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
    out = [coder.decode(t.model, length) + t.lo if len(t.counts) > 1 else np.full(length, t.lo, dtype=np.int32)
           for t in tables]
    if not coder.is_empty():
        raise ValueError("bitstream has data left after decoding: it does not match its tables")
    return out
