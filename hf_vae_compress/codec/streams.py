"""Stage 5 (format v2): entropy coding with pcodec, and the coding of the small side parts.

Every function pair here is symmetric, CompressAI-style: ``compress_*`` returns bytes (and the
lengths the header must record), ``decompress_*`` takes them back to an array.

Why pcodec (a maintained library, https://github.com/pcodec/pcodec): it decodes 450-800 M
symbols/s on one core and releases the GIL, so tensors decode in parallel on a thread pool; its
order-0 code is within 0.3-1.6 % of the order-0 entropy on streams of >= 36 k symbols. Its
fixed cost (chunk metadata, i.e. its tables, 15-50 B) is why small tensors share one stream.

A stream is pcodec's "wrapped" chunk: ``meta`` (its bins: the table) and one ``page`` (the
payload). The 2-byte pcodec file header is stored once per container. Stream lengths in symbols
are never stored: the header's shapes give them.
"""

from __future__ import annotations

import math

import numpy as np
from pcodec import ChunkConfig, PagingSpec, wrapped

MAX_STREAM = 1 << 22  # symbols per stream (pcodec allows 2**24): a large tensor decodes in parallel
LEVEL = 8  # pcodec's default compression level
STREAM_OVERHEAD_BITS = 8 * 40  # meta + framing of a stream, measured on Laplacian streams

# Row scales are powers of 2**(1/4): the exponent is what is stored. A scale only normalises its
# row before quantization and is applied identically on both sides, so its precision costs no
# accuracy; quarter octaves keep each row's effective step within 9 % of the allocation's.
SCALE_STEPS_PER_OCTAVE = 4
# 2**(i/4) for i = 0..3 as exact float32 literals, so the decoded scales are the same on any
# platform (scale = MANTISSAS[k % 4] * 2**(k // 4), computed with the exact ldexp).
_MANTISSAS = np.array([1.0, float.fromhex("0x1.306fe0p+0"), float.fromhex("0x1.6a09e6p+0"),
                       float.fromhex("0x1.ae89fap+0")], dtype=np.float32)

_FILE_HEADER = wrapped.FileCompressor().write_header()


def pcodec_header() -> str:
    """The pcodec file header (format version), stored once per container as hex."""
    return _FILE_HEADER.hex()


def stream_sizes(n: int) -> list[int]:
    """Symbols per stream when ``n`` symbols are cut into streams of at most :data:`MAX_STREAM`."""
    full, rest = divmod(n, MAX_STREAM)
    return [MAX_STREAM] * full + ([rest] if rest else [])


def compress_symbols(values: np.ndarray) -> list[tuple[bytes, bytes]]:
    """``(meta, page)`` per stream of a 1-D int32 array, cut by :func:`stream_sizes`."""
    values = np.ascontiguousarray(values, dtype=np.int32).reshape(-1)
    out, pos, compressor = [], 0, wrapped.FileCompressor()
    for n in stream_sizes(len(values)):
        config = ChunkConfig(compression_level=LEVEL, paging_spec=PagingSpec.exact_page_sizes([n]))
        chunk = compressor.chunk_compressor(values[pos: pos + n], config)
        out.append((chunk.write_meta(), chunk.write_page(0)))
        pos += n
    return out


def decompress_symbols(header: bytes, streams: list[tuple[bytes, bytes]], out: np.ndarray) -> None:
    """Fill the 1-D int32 array ``out`` from its streams; raises ValueError on corrupt data.

    pcodec releases the GIL here, so callers decode several tensors at once on threads.
    """
    sizes = stream_sizes(len(out))
    if len(sizes) != len(streams):
        raise ValueError(f"{len(streams)} streams where {len(sizes)} were expected")
    try:
        decompressor, _ = wrapped.FileDecompressor.new(header)
        pos = 0
        for n, (meta, page) in zip(sizes, streams):
            chunk, used = decompressor.chunk_decompressor(meta, "i32")
            if used != len(meta):
                raise ValueError("stream table has trailing bytes")
            progress, used = chunk.read_page_into(page, n, out[pos: pos + n])
            if used != len(page) or progress.n_processed != n or not progress.finished:
                raise ValueError("stream length does not match its header")
            pos += n
    except RuntimeError as err:  # pcodec reports corrupt data as RuntimeError
        raise ValueError(f"corrupt stream: {err}") from err


def estimate_bits(values: np.ndarray) -> float:
    """Coded bits of a stream of integer symbols: its order-0 entropy plus pcodec's fixed cost."""
    values = values.reshape(-1)
    if len(values) == 0:
        return 0.0
    counts = np.bincount(values - values.min())
    counts = counts[counts > 0]
    entropy = float(-(counts * np.log2(counts / len(values))).sum())
    return 1.005 * entropy + STREAM_OVERHEAD_BITS * math.ceil(len(values) / MAX_STREAM)


def estimate_tensor_bits(symbols: np.ndarray) -> float:
    """Coded bits of a tensor's (chunks, dims) symbols in the layout :func:`compress_tensor` would pick."""
    flat = estimate_bits(symbols)
    if symbols.shape[1] == 1:
        return flat
    return min(flat, sum(estimate_bits(symbols[:, j]) for j in range(symbols.shape[1])))


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


LAYOUTS = ("flat", "dims")


def compress_tensor(symbols: np.ndarray) -> tuple[str, list[tuple[bytes, bytes]]]:
    """A coded tensor's (chunks, dims) symbols in whichever stream layout is smaller, measured:
    ``flat`` (chunk after chunk, one distribution) or ``dims`` (one stream per latent dimension, a
    distribution each: pays where dimensions differ in spread, as a VAE's latents or a large
    tensor's kernel taps do; on small tensors the extra tables cost more than they save)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    flat = compress_symbols(symbols.reshape(-1))
    if symbols.shape[1] == 1:
        return "flat", flat
    dims = [s for j in range(symbols.shape[1]) for s in compress_symbols(symbols[:, j])]
    size = lambda coded: sum(len(m) + len(p) for m, p in coded)  # noqa: E731
    return ("dims", dims) if size(dims) < size(flat) else ("flat", flat)


def tensor_stream_sizes(layout: str, num_chunks: int, dim: int) -> list[int]:
    """Symbols per stream of a coded tensor in a given layout (what the header need not store)."""
    if layout == "flat":
        return stream_sizes(num_chunks * dim)
    return stream_sizes(num_chunks) * dim


def decompress_tensor(header: bytes, layout: str, coded: list[tuple[bytes, bytes]], num_chunks: int,
                      dim: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """The (chunks, dims) int32 symbols of :func:`compress_tensor`, C-contiguous whatever the layout
    (a network's matmul may round differently on a strided input). A ``flat`` tensor is decoded
    into ``scratch`` when it is large enough: reusing one buffer per thread saves the page faults of
    a fresh one, a third of the decode time on resnet50."""
    if layout == "flat":
        n = num_chunks * dim
        out = scratch[:n] if scratch is not None and len(scratch) >= n else np.empty(n, dtype=np.int32)
        decompress_symbols(header, coded, out)
        return out.reshape(num_chunks, dim)
    out = np.empty((dim, num_chunks), dtype=np.int32)
    per_dim = len(stream_sizes(num_chunks))
    for j in range(dim):
        decompress_symbols(header, coded[j * per_dim: (j + 1) * per_dim], out[j])
    return np.ascontiguousarray(out.T)
