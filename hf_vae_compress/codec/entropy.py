"""Stage 5: entropy coding of integer symbols with constriction's ANS coder.

Each latent dimension of each tensor is one stream with its own probability table: an integer
histogram over ``[lo, lo + K)``, quantized so that its counts sum to exactly
``2**precision`` with every count at least 1. Because the counts are exact integers that sum to
a power of two, the coder's fixed-point model is exactly the stored table, and decoding is
bit-exact on any machine. All streams of one tensor share one ANS stack, so a tensor is one
bitstream. Counts are stored as uint16 (precision <= 15); ``lo`` and ``K`` go in the header.

Context: latent dimensions are coded in order, so dimension ``j`` of a chunk can be coded under
a table chosen by how many of the chunk's earlier dimensions were nonzero (0, 1, 2 or more): a
kernel that is "on" tends to be on in every dimension. A dimension is split into those context
sub-streams only where the estimated bits say the extra tables pay for themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

TABLE_OVERHEAD_BITS = 56  # lo, K and the escape threshold in the compressed header, roughly
ESCAPE_THRESHOLDS = (1, 3, 7, 15, 31, 63)
NUM_CONTEXTS = 3


@dataclass(frozen=True)
class Table:
    lo: int
    counts: np.ndarray  # int64, sums to 2**precision, all >= 1
    escape: int  # symbols with |s| <= escape are coded directly; larger ones as bucket + offset

    @property
    def model(self):
        return constriction.stream.model.Categorical(self.counts.astype(np.float64), perfect=False)


def to_tokens(symbols: np.ndarray, escape: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exp-Golomb escape binarisation: (tokens, offsets, offset alphabet sizes).

    ``|s| <= escape`` is its own token. Otherwise ``m = |s| - escape - 1`` falls in bucket
    ``b = floor(log2(m + 1))``, coded as token ``sign(s) * (escape + 1 + b)`` followed by the
    offset ``m + 1 - 2**b`` under a uniform model over ``2**b`` values (no offset when b = 0).
    Tables then stay small however fine a tensor's step is.
    """
    magnitude = np.abs(symbols).astype(np.int64)
    escaped = magnitude > escape
    m = magnitude[escaped] - escape - 1
    bucket = np.floor(np.log2(m + 1)).astype(np.int64)
    bucket += (1 << (bucket + 1)) <= m + 1  # guard against float log2 rounding down
    bucket -= (1 << bucket) > m + 1
    tokens = symbols.astype(np.int64).copy()
    tokens[escaped] = np.sign(symbols[escaped]) * (escape + 1 + bucket)
    has_offset = bucket > 0
    return tokens, (m + 1 - (1 << bucket))[has_offset], (1 << bucket)[has_offset]


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


def _cost(symbols: np.ndarray, escape: int, precision: int) -> tuple[float, Table]:
    """Bits of a stream with a given escape threshold: tokens + offsets + the table."""
    tokens, _, sizes = to_tokens(symbols, escape)
    lo = int(tokens.min())
    hist = np.bincount(tokens - lo)
    table = Table(lo, quantize_counts(hist.astype(np.float64), precision), escape)
    payload = -(hist * (np.log2(table.counts) - precision)).sum() + np.log2(sizes).sum()
    table_bits = 16 * len(table.counts) if len(table.counts) > 1 else 0
    return float(payload + table_bits + TABLE_OVERHEAD_BITS), table


def fit_table(symbols: np.ndarray, precision: int) -> tuple[float, Table]:
    """The cheapest escape threshold for a stream: (estimated bits, table)."""
    widest = int(np.abs(symbols).max())
    candidates = sorted({min(e, max(widest, 1)) for e in ESCAPE_THRESHOLDS})
    return min((_cost(symbols, e, precision) for e in candidates), key=lambda c: c[0])


def _num_contexts(dim: int) -> int:
    """Dimension ``dim`` follows ``dim`` earlier ones: at most ``dim + 1`` nonzero counts."""
    return min(dim + 1, NUM_CONTEXTS)


def _contexts(nonzero_so_far: np.ndarray) -> np.ndarray:
    return np.minimum(nonzero_so_far, NUM_CONTEXTS - 1)


def _plan(symbols: np.ndarray, precision: int) -> tuple[float, list[np.ndarray], list[bool]]:
    """Per dimension, split by context or not, whichever costs fewer bits: (bits, sub-streams
    in decode order, split flags)."""
    total, streams, split = 0.0, [], []
    nonzero = np.zeros(len(symbols), dtype=np.int64)
    for j in range(symbols.shape[1]):
        column = symbols[:, j]
        whole = fit_table(column, precision)[0]
        parts = []
        if j > 0:
            ctx = _contexts(nonzero)
            parts = [column[ctx == c] for c in range(_num_contexts(j))]
        use_split = bool(parts) and all(len(p) for p in parts)
        split_bits = sum(fit_table(p, precision)[0] for p in parts) if use_split else float("inf")
        use_split = split_bits < whole
        total += split_bits if use_split else whole
        streams += parts if use_split else [column]
        split.append(use_split)
        nonzero += column != 0
    return total, streams, split


def estimate_tensor_bits(symbols: np.ndarray, precision: int) -> float:
    """Coded bits of a tensor's (N, d) symbols, contexts, escapes and tables included."""
    return _plan(symbols, precision)[0]


def encode_tensor(symbols: np.ndarray, precision: int) -> tuple[np.ndarray, list[Table], list[bool]]:
    """One ANS bitstream (uint32 words) for a tensor's (N, d) symbols: its tables and split flags."""
    _, streams, split = _plan(symbols, precision)
    tables = [fit_table(s, precision)[1] for s in streams]
    coder = constriction.stream.stack.AnsCoder()
    for stream, table in reversed(list(zip(streams, tables))):  # a stack: encode in reverse decode order
        tokens, offsets, sizes = to_tokens(stream, table.escape)
        if len(offsets):
            coder.encode_reverse(offsets.astype(np.int32), constriction.stream.model.Uniform(), sizes.astype(np.int32))
        if len(table.counts) > 1:  # a one-symbol stream costs no bits
            coder.encode_reverse((tokens - table.lo).astype(np.int32), table.model)
    return coder.get_compressed(), tables, split


def parse_tables(los: list[int], sizes: list[int], escapes: list[int], counts: np.ndarray,
                 precision: int) -> list[Table]:
    """Tables from the header's ``lo``/``K``/escape lists and the stored counts, validating what a
    corrupt file could break."""
    if not len(los) == len(sizes) == len(escapes) or sum(sizes) != len(counts) or min(sizes, default=1) < 1:
        raise ValueError("probability tables do not match their header")
    tables, pos = [], 0
    for lo, k, escape in zip(los, sizes, escapes):
        part = counts[pos: pos + k].astype(np.int64)
        if part.min() < 1 or part.sum() != (1 << precision):
            raise ValueError("probability tables are corrupt")
        tables.append(Table(int(lo), part, int(escape)))
        pos += k
    return tables


def _decode_stream(coder, table: Table, length: int) -> np.ndarray:
    """One stream; lookup tables keep this to a few passes over the symbols (it is the hot path)."""
    if len(table.counts) == 1:
        indices = np.zeros(length, dtype=np.int32)
    else:
        indices = coder.decode(table.model, length)
    tokens = np.arange(table.lo, table.lo + len(table.counts), dtype=np.int32)
    escaped = np.abs(tokens) > table.escape
    values = tokens[indices]
    if not escaped.any():
        return values
    where = np.flatnonzero(escaped[indices])
    bucket = np.abs(values[where]) - table.escape - 1
    extra = np.zeros(len(where), dtype=np.int64)
    with_offset = bucket > 0
    if with_offset.any():
        extra[with_offset] = coder.decode(constriction.stream.model.Uniform(),
                                          (1 << bucket[with_offset]).astype(np.int32))
    values[where] = np.sign(values[where]) * ((1 << bucket) + extra + table.escape)
    return values


def decode_tensor(words: np.ndarray, tables: list[Table], split: list[bool], length: int) -> np.ndarray:
    """Decode a tensor's (length, len(split)) symbols."""
    if len(tables) != sum(_num_contexts(j) if s else 1 for j, s in enumerate(split)):
        raise ValueError("probability tables do not match the context layout")
    coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32, copy=False))
    out = np.empty((length, len(split)), dtype=np.int32)
    nonzero = np.zeros(length, dtype=np.int64)
    tables = iter(tables)
    for j, use_split in enumerate(split):
        if use_split:
            ctx = _contexts(nonzero)
            for c in range(_num_contexts(j)):
                where = np.flatnonzero(ctx == c)
                out[where, j] = _decode_stream(coder, next(tables), len(where))
        else:
            out[:, j] = _decode_stream(coder, next(tables), length)
        nonzero += out[:, j] != 0
    if not coder.is_empty():
        raise ValueError("bitstream has data left after decoding: it does not match its tables")
    return out
