"""Container format version 2: the writer (:func:`assemble`) and the reader, in one place.

Safetensors entries (every byte is counted in :meth:`~.compressed.CompressedModel.report`):

* ``header``: compact JSON, zlib-compressed: codec config, transform, and per tensor only what
  cannot be derived (name, shape, dtype, codec, step, stream layout, scale offset, and the byte
  lengths of its streams: their symbol counts follow from the shape);
* ``checks``: the SHA-256 of the whole decoded model, then a CRC-32 (little-endian) per tensor;
  the header's ``stored_sha256`` hashes the header and every part as stored (see
  :func:`~.integrity.stored_sha256`), so damage is told apart from a float decoder that gives other
  bits on another machine (containers written before it are still read, without that check);
* ``streams``: the pcodec pages of the coded (multi-dimensional) tensors, in header order;
* ``tables``: the pcodec chunk metadata (its bins: the probability tables) of every stream;
* ``scales``: the row scales, as quarter-octave exponents minus a per-tensor offset, one pooled
  pcodec stream (the scales only normalise rows, so their precision costs no accuracy);
* ``vectors``: 1-D and small float tensors (biases, norms, BN statistics), rounded to
  ``vector_mantissa_bits`` of relative precision and entropy-coded, pooled or one stream each,
  whichever is smaller;
* ``raw.<dtype>``: integer tensors, exact; ``decoder.*``: the transform's decoder, if any: the float
  VAE's network (``vae``: fp16), or the portable VAE's maps (``vae-int``: ``decoder.linear``, int16,
  and ``decoder.exponents``, int8, for the tensors the header's ``transform.linear_maps`` lists;
  their arithmetic is :mod:`.linear`).

The ``vae-int`` kind was added to version 2 without a new version: it changes nothing any existing
file means (a file names its kind, and the ``vae`` and ``identity`` kinds decode as before), and a
reader that predates it refuses such a file by its stored config (``transform must be one of
('vae', 'identity'), got 'vae-int'``) before decoding anything. Its decode is exact like the
identity's, so a CRC mismatch with intact stored bytes is a decoder bug, never "machine-dependent".

Decoding checks the stored bytes first, then runs tensor by tensor on a thread pool (pcodec and
the CRC release the GIL), each tensor checked as soon as it is decoded; the model hash is checked
at the end.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

from ..config import VAECompressionConfig
from ..latents import CodedTensor, Latents
from ..transform import IdentityTransform, Transform, build_transform
from . import grid, identity, streams
from .fields import FLOAT_DTYPES, INT_DTYPES, codec_fields, entry_fields, fail, get_field, int_field
from .framing import FORMAT_NAME, ContainerError
from .integrity import (
    STORED_HASH_FIELD, IntegrityError, ModelHash, allow_unverified, crc32, crc32_blocks, machine_dependent,
    stored_sha256, warn_unverified,
)
from .layout import ChunkLayout
from .limits import MAX_NUMEL

logger = logging.getLogger(__name__)

VERSION = 2
NAMES_VERIFIED = True  # the stored-bytes and model hashes both cover names
DECODES_INTO = True  # iter_decoded can write weights straight into a model's tensors
HEADER_BYTES_PER_TENSOR = 16  # compressed JSON (measured: 9-14 B) + the CRC-32, for the rate search
LOOKAHEAD = 4  # coded tensors decoded ahead of the consumer: bounds memory, keeps both cores busy
_PARTS = ("streams", "tables", "scales", "vectors")


@dataclass
class CodedPart:
    """A pooled side part: its streams and what the header records about its layout."""

    streams: list[tuple[bytes, bytes]]
    info: dict = field(default_factory=dict)


def _lengths(coded: list[tuple[bytes, bytes]]) -> list[list[int]]:
    return [[len(m), len(p)] for m, p in coded]


def code_side_parts(coded: list[CodedTensor], stored: dict[str, torch.Tensor],
                    config: VAECompressionConfig) -> dict[str, CodedPart]:
    """Code the row scales and the stored float tensors (they do not depend on the steps)."""
    exponents = [grid.scale_exponents(c.scales.numpy()) for c in coded]
    offsets = [int(np.median(k)) if len(k) else 0 for k in exponents]
    pooled = np.concatenate([k - o for k, o in zip(exponents, offsets)] or [np.zeros(0, np.int32)])
    scales = CodedPart(streams.compress_symbols(pooled), {"offsets": offsets})
    floats = [grid.compress_floats(v.float().numpy(), config.vector_mantissa_bits)
              for v in stored.values() if v.is_floating_point()]
    together = streams.compress_symbols(np.concatenate(floats or [np.zeros(0, np.int32)]))
    each = [s for f in floats for s in streams.compress_symbols(f)]
    size = lambda part: sum(len(m) + len(p) for m, p in part)  # noqa: E731
    vectors = (CodedPart(each, {"layout": "each"}) if size(each) < size(together)
               else CodedPart(together, {"layout": "pooled"}))
    return {"scales": scales, "vectors": vectors}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assemble(latents: Latents, progress: bool = False,
             side: dict[str, CodedPart] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Entropy-code every tensor and build the header, checksumming what the decoder will produce:
    the container's ``(header, stored tensors)``, sealed when written (:func:`seal`).

    ``side`` is :func:`code_side_parts` when the caller already has it.
    """
    config, transform = latents.config, latents.transform
    if not transform.portable:
        logger.warning("the %r transform's decoder is a float network: this container is verified bit for bit only "
                       "on machines whose float kernels match this one's; use the identity transform to publish",
                       transform.kind)
    side = side or code_side_parts(latents.coded, latents.stored, config)
    entries, decoded = {}, {}
    pages, tables = [], []
    for i, c in enumerate(tqdm(latents.coded, desc="encode", unit="tensor", disable=not progress, leave=False)):
        layout, coded = streams.compress_tensor(latents.symbols[i].numpy())
        pages += [p for _, p in coded]
        tables += [m for m, _ in coded]
        entries[c.name] = dict(name=c.name, codec=transform.kind, shape=list(c.layout.shape),
                               dtype=_dtype_name(c.dtype), step=latents.steps[i], layout=layout,
                               scale_offset=side["scales"].info["offsets"][i], streams=_lengths(coded))
        decoded[c.name] = latents.decode_tensor(i)
    raw: dict[str, list[torch.Tensor]] = {}
    for name, value in latents.stored.items():
        original = latents.reference[name]
        entry = dict(name=name, shape=list(original.shape), dtype=_dtype_name(original.dtype))
        if value.is_floating_point():
            entries[name] = dict(entry, codec="float", stored=_dtype_name(value.dtype))
            decoded[name] = _decode_float(value, config.vector_mantissa_bits, original.dtype)
        else:
            entries[name] = dict(entry, codec="raw")
            raw.setdefault(_dtype_name(value.dtype), []).append(value.reshape(-1))
            decoded[name] = value.to(original.dtype)
    names = [n for n in latents.reference if n in entries]
    model_hash = ModelHash()
    for n in names:
        model_hash.update(n, decoded[n])
    checks = model_hash.digest() + struct.pack(f"<{len(names)}I", *(crc32(decoded[n]) for n in names))
    side_tables = [m for part in ("scales", "vectors") for m, _ in side[part].streams]
    tensors = {
        "checks": _bytes_tensor(checks),
        "streams": _bytes_tensor(b"".join(pages)),
        "tables": _bytes_tensor(b"".join(tables + side_tables)),
        **{part: _bytes_tensor(b"".join(p for _, p in side[part].streams)) for part in ("scales", "vectors")},
        **{f"raw.{dtype}": torch.cat(parts) for dtype, parts in raw.items()},
        **{f"decoder.{k}": v for k, v in transform.stored_state().items()},
    }
    fp32_bytes = latents.fp32_bytes or _fp32_safetensors_bytes(latents.reference)
    header = dict(
        format=FORMAT_NAME, format_version=VERSION, config=config.to_dict(),
        transform=dict(kind=transform.kind, chunk_size=config.chunk_size, hidden_size=config.hidden_size,
                       **transform.spec()),
        pcodec=streams.pcodec_header(), tensors=[entries[n] for n in names],
        scales=_lengths(side["scales"].streams),
        vectors=dict(side["vectors"].info, streams=_lengths(side["vectors"].streams)),
        fp32_safetensors_bytes=fp32_bytes, library=_library_versions(),
    )
    return header, tensors


def seal(header: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The header as written: with the stored-bytes SHA-256 of exactly what is written.

    Sealed when the bytes are made, not when the container is built, so header fields added later
    (the rate search's ``lam``, fine-tuning's settings) are covered too.
    """
    return {**{k: v for k, v in header.items() if k != STORED_HASH_FIELD},
            STORED_HASH_FIELD: stored_sha256(header, tensors)}


def _fp32_safetensors_bytes(reference: dict[str, torch.Tensor]) -> int:
    """Size of the fp32 safetensors file of the same weights (the ratio's denominator)."""
    return len(safetensors.torch.save(
        {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in reference.items()}))


def _library_versions() -> dict:
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"hf_vae_compress": version("hf-vae-compress"), "pcodec": version("pcodec")}


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _decode_float(value: torch.Tensor, mantissa_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """A stored float tensor as the decoder will produce it (through the coded symbols)."""
    symbols = grid.compress_floats(value.float().numpy(), mantissa_bits)
    return torch.from_numpy(grid.decompress_floats(symbols, mantissa_bits)).reshape(value.shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Reading


class _Slicer:
    """Walks one byte part in header order, refusing to read past its end."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data, self.pos = name, data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ContainerError(f"container part {self.name!r} is shorter than its header says")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ContainerError(f"container part {self.name!r} is longer than its header says")


@dataclass
class _Plan:
    """A validated v2 container, its side parts decoded: what tensor-by-tensor decoding needs."""

    entries: list[dict]
    config: VAECompressionConfig
    transform: Transform
    chunk_size: int
    mantissa_bits: int
    pcodec: bytes
    coded_streams: dict[str, list[tuple[bytes, bytes]]]
    scales: dict[str, torch.Tensor]
    vectors: dict[str, np.ndarray]
    raw: dict[str, torch.Tensor]
    model_sha256: bytes
    crcs: list[int]
    stored_verified: bool  # False: a container written before the stored-bytes hash


def _lengths_field(value, where: str, count: int) -> list[tuple[int, int]]:
    if not isinstance(value, list) or len(value) != count:
        raise fail(where, f"expected {count} [table, page] byte lengths")
    out = []
    for pair in value:
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 for n in pair)):
            raise fail(where, f"bad byte lengths {pair!r}")
        out.append((pair[0], pair[1]))
    return out


def _take_streams(lengths: list[tuple[int, int]], tables: _Slicer, pages: _Slicer) -> list[tuple[bytes, bytes]]:
    return [(tables.take(m), pages.take(p)) for m, p in lengths]


@dataclass
class _Validated:
    """A header checked against itself and the stored parts: every byte range it names, sliced."""

    entries: list[dict]
    config: VAECompressionConfig
    transform: Transform
    chunk_size: int
    pcodec: bytes
    coded_streams: dict[str, list[tuple[bytes, bytes]]]
    rows: dict[str, int]  # coded tensor -> rows (one scale each)
    float_sizes: dict[str, int]
    raw_sizes: dict[str, int]
    scale_streams: list[tuple[bytes, bytes]]
    vectors_layout: str
    vector_streams: list[tuple[bytes, bytes]]
    checks: bytes


def plan(header: dict, tensors: dict[str, torch.Tensor], pool: Executor | None = None) -> _Plan:
    """Validate the header (:func:`validate`), check the stored bytes, and decode the side parts.

    With a ``pool``, the stored bytes are hashed on it while the header is validated and the side
    parts decoded (the hash is a sequential SHA-256: a fifth of ViT-B's decode start); the result
    is the same, errors included: a malformed header is reported before the hash is waited for,
    damaged stored bytes before the side data they broke.
    """
    stored = pool.submit(_check_stored, header, tensors) if pool is not None else None
    v = validate(header, tensors)
    if stored is None:
        stored_verified = _check_stored(header, tensors)
    try:
        scales = _decode_scales(v.pcodec, v.scale_streams, v.rows, v.entries)
        vectors = _decode_vectors(v.pcodec, v.vectors_layout, v.vector_streams, v.float_sizes,
                                  v.config.vector_mantissa_bits)
    except ValueError as err:
        if stored is not None:
            stored.result()
        raise ContainerError(f"container side data is corrupt: {err}") from err
    if stored is not None:
        stored_verified = stored.result()
    return _Plan(v.entries, v.config, v.transform.eval(), v.chunk_size, v.config.vector_mantissa_bits, v.pcodec,
                 v.coded_streams, scales, vectors, _raw_tensors(tensors, v.entries, v.raw_sizes), v.checks[:32],
                 list(struct.unpack(f"<{len(v.entries)}I", v.checks[32:])), stored_verified)


def validate(header: dict, tensors: dict[str, torch.Tensor]) -> _Validated:
    """Check the header against itself and the stored parts, decoding nothing.

    Every field is type- and range-checked and every byte length is checked against the part it
    points into before anything is allocated or decompressed; each failure is a
    :class:`ContainerError` naming the field.
    """
    config, spec, kind, chunk_size, hidden_size = codec_fields(header)
    try:
        pcodec = bytes.fromhex(get_field(header, "pcodec", str, "header"))
    except ValueError as err:
        raise fail("pcodec", "not hex") from err
    entries = get_field(header, "tensors", list, "header")
    int_field(header, "fp32_safetensors_bytes", "header", 0, 1 << 50)
    parts = {k: _Slicer(k, _part_bytes(tensors, k)) for k in _PARTS}
    coded_streams, rows, float_sizes, raw_sizes = _entries(entries, kind, chunk_size, parts)
    parts["streams"].finish()
    transform = _stored_transform(tensors, spec, kind, chunk_size, hidden_size, len(coded_streams))
    scale_streams = _take_streams(_lengths_field(header.get("scales"), "scales", len(streams.stream_sizes(sum(rows.values())))),
                                  parts["tables"], parts["scales"])
    vectors_info = get_field(header, "vectors", dict, "header")
    vectors_layout = get_field(vectors_info, "layout", str, "vectors")
    if vectors_layout == "pooled":
        vector_sizes = streams.stream_sizes(sum(float_sizes.values()))
    elif vectors_layout == "each":
        vector_sizes = [s for n in float_sizes.values() for s in streams.stream_sizes(n)]
    else:
        raise fail("vectors.layout", f"unknown layout {vectors_layout!r}")
    vector_streams = _take_streams(_lengths_field(vectors_info.get("streams"), "vectors.streams", len(vector_sizes)),
                                   parts["tables"], parts["vectors"])
    for part in parts.values():
        part.finish()
    checks = _part_bytes(tensors, "checks")
    if len(checks) != 32 + 4 * len(entries):
        raise fail("tensors", f"{len(entries)} tensors but {len(checks)} bytes of checks")
    return _Validated(entries, config, transform, chunk_size, pcodec, coded_streams, rows, float_sizes, raw_sizes,
                      scale_streams, vectors_layout, vector_streams, checks)


def _entries(entries: list, kind: str, chunk_size: int, parts: dict[str, _Slicer]) -> tuple[dict, dict, dict, dict]:
    """The tensor table, checked entry by entry: each coded tensor's streams (sliced from the
    parts) and rows, and the value counts of the stored float and integer tensors."""
    coded_streams, rows, float_sizes, raw_sizes = {}, {}, {}, {}
    names: set[str] = set()
    total = 0
    for i, entry in enumerate(entries):
        where = f"tensors[{i}]"
        name, dtype, codec, shape = entry_fields(entry, where, names)
        total += math.prod(shape)
        if total > MAX_NUMEL:
            raise fail(f"{where}.shape", "the model has more values than any container may hold")
        if codec == kind:
            layout, layout_name = _coded_entry(entry, where, dtype, shape, chunk_size)
            sizes = streams.tensor_stream_sizes(layout_name, layout.num_chunks, chunk_size)
            lengths = _lengths_field(entry.get("streams"), f"{where}.streams", len(sizes))
            coded_streams[name] = _take_streams(lengths, parts["tables"], parts["streams"])
            rows[name] = layout.rows
        elif codec == "float":
            if dtype not in FLOAT_DTYPES:
                raise fail(f"{where}.dtype", f"{dtype!r} is not a float dtype")
            if get_field(entry, "stored", str, where) not in FLOAT_DTYPES:
                raise fail(f"{where}.stored", "not a float dtype")
            float_sizes[name] = math.prod(shape)
        elif codec == "raw":
            if dtype not in INT_DTYPES:
                raise fail(f"{where}.dtype", f"{dtype!r} is not an integer dtype")
            raw_sizes[name] = math.prod(shape)
        else:
            raise fail(f"{where}.codec", f"unknown codec {codec!r}")
    return coded_streams, rows, float_sizes, raw_sizes


def _coded_entry(entry: dict, where: str, dtype: str, shape: list[int], chunk_size: int) -> tuple[ChunkLayout, str]:
    """A coded tensor's checked fields: its chunk layout and stream layout name."""
    if dtype not in FLOAT_DTYPES or len(shape) == 0:
        raise fail(f"{where}.dtype", f"a coded tensor must be a float tensor, got {dtype} {shape}")
    step = get_field(entry, "step", (int, float), where)
    if not math.isfinite(step) or step <= 0:
        raise fail(f"{where}.step", f"{step!r} is not a positive step")
    layout_name = get_field(entry, "layout", str, where)
    if layout_name not in streams.LAYOUTS:
        raise fail(f"{where}.layout", f"unknown layout {layout_name!r}")
    int_field(entry, "scale_offset", where, -1000, 1000)
    if not math.prod(shape):
        raise fail(f"{where}.shape", "a coded tensor cannot be empty")
    return ChunkLayout.of(tuple(shape), chunk_size), layout_name


def _stored_transform(tensors: dict[str, torch.Tensor], spec: dict, kind: str, chunk_size: int, hidden_size: int,
                      num_coded: int) -> Transform:
    """The transform the header names, with the decoder weights the container stores."""
    transform = build_transform(kind, chunk_size, hidden_size, num_coded)
    prefix = "decoder."
    try:
        transform.load_stored_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, spec)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise fail("transform", f"decoder weights do not match the header: {err}") from err
    return transform


def _check_stored(header: dict, tensors: dict[str, torch.Tensor]) -> bool:
    """Check the stored-bytes SHA-256; False when the container predates it (nothing to check)."""
    if STORED_HASH_FIELD not in header:
        return False
    recorded = get_field(header, STORED_HASH_FIELD, str, "header")
    if stored_sha256(header, tensors) != recorded:
        raise IntegrityError("the container's stored bytes do not match their SHA-256: the file is corrupt "
                             "(damaged on disk or in transfer); download or copy it again")
    return True


def _part_bytes(tensors: dict[str, torch.Tensor], key: str) -> bytes:
    value = tensors.get(key)
    if value is None:
        raise ContainerError(f"container is missing its {key!r} part")
    if value.dtype != torch.uint8 or value.dim() != 1:
        raise ContainerError(f"container part {key!r} is not a byte string")
    return value.numpy().tobytes()


def _decode_scales(pcodec: bytes, coded: list[tuple[bytes, bytes]], rows: dict[str, int],
                   entries: list[dict]) -> dict[str, torch.Tensor]:
    pooled = np.empty(sum(rows.values()), dtype=np.int32)
    streams.decompress_symbols(pcodec, coded, pooled)
    out, pos = {}, 0
    offsets = {e["name"]: e["scale_offset"] for e in entries if e["name"] in rows}
    for name, n in rows.items():
        out[name] = torch.from_numpy(grid.scales_from_exponents(pooled[pos: pos + n] + offsets[name]))
        pos += n
    return out


def _decode_vectors(pcodec: bytes, layout: str, coded: list[tuple[bytes, bytes]], sizes: dict[str, int],
                    mantissa_bits: int) -> dict[str, np.ndarray]:
    out = {}
    if layout == "pooled":
        pooled = np.empty(sum(sizes.values()), dtype=np.int32)
        streams.decompress_symbols(pcodec, coded, pooled)
        pos = 0
        for name, n in sizes.items():
            out[name] = grid.decompress_floats(pooled[pos: pos + n], mantissa_bits)
            pos += n
        return out
    pos = 0
    for name, n in sizes.items():
        count = len(streams.stream_sizes(n))
        symbols = np.empty(n, dtype=np.int32)
        streams.decompress_symbols(pcodec, coded[pos: pos + count], symbols)
        out[name] = grid.decompress_floats(symbols, mantissa_bits)
        pos += count
    return out


def _raw_tensors(tensors: dict[str, torch.Tensor], entries: list[dict], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    cursors: dict[str, int] = {}
    out = {}
    for entry in entries:
        name = entry["name"]
        if name not in sizes:
            continue
        key = f"raw.{entry['dtype']}"
        part = tensors.get(key)
        if part is None or part.dim() != 1 or _dtype_name(part.dtype) != entry["dtype"]:
            raise ContainerError(f"container is missing {key!r} for {name!r}")
        pos = cursors.get(key, 0)
        if pos + sizes[name] > len(part):
            raise ContainerError(f"container part {key!r} is shorter than its header says")
        out[name] = part[pos: pos + sizes[name]].reshape(entry["shape"])
        cursors[key] = pos + sizes[name]
    for key, pos in cursors.items():
        if pos != len(tensors[key]):
            raise ContainerError(f"container part {key!r} is longer than its header says")
    return out


_scratch = threading.local()  # one symbol buffer per decoding thread, reused tensor after tensor


def _scratch_buffer(n: int) -> np.ndarray:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < n:
        buffer = _scratch.buffer = np.empty(n, dtype=np.int32)
    return buffer


def _coded_symbols(p: _Plan, entry: dict, reuse: bool = False, view: bool = False) -> tuple[np.ndarray, ChunkLayout]:
    """A coded tensor's (chunks, chunk_size) symbols; with ``reuse`` they live in this thread's
    scratch buffer and are only valid until its next call; with ``view`` a ``dims`` tensor's come
    back as the strided view of the stored planes (see :func:`~.streams.decompress_view`)."""
    layout = ChunkLayout.of(tuple(entry["shape"]), p.chunk_size)
    scratch = _scratch_buffer(layout.num_chunks * p.chunk_size) if reuse else None
    decompress = streams.decompress_view if view else streams.decompress_tensor
    try:
        symbols = decompress(p.pcodec, entry["layout"], p.coded_streams[entry["name"]], layout.num_chunks,
                             p.chunk_size, scratch)
    except ValueError as err:
        raise ContainerError(f"bitstream of {entry['name']!r} is corrupt: {err}") from err
    return symbols, layout


def _writable(target: torch.Tensor | None, entry: dict) -> np.ndarray | None:
    """``target``'s own float32 storage as an array the identity decoder can write into, or None
    when it cannot take the decoded values directly (another dtype or device, not contiguous)."""
    if (target is None or target.dtype != torch.float32 or target.device.type != "cpu"
            or not target.is_contiguous() or list(target.shape) != entry["shape"]):
        return None
    return target.detach().numpy()


def _decode_one(p: _Plan, i: int, coded_index: int, unverified_ok: bool,
                target: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Tensor ``i`` of the header, decoded and checked against its CRC-32; the flag says whether it
    passed (False only for a float decoder's output let through by ``unverified_ok``).

    An identity-coded float32 tensor is dequantised straight into ``target``'s storage when it can
    take it (then ``target`` is returned), its CRC-32 taken block by block as it is written: one
    pass over the weights, no temporary. A failed check leaves ``target`` part-written.
    """
    entry = p.entries[i]
    name, dtype = entry["name"], getattr(torch, entry["dtype"])
    float_network = name in p.coded_streams and not p.transform.portable
    if name in p.coded_streams and isinstance(p.transform, IdentityTransform) and dtype == torch.float32:
        symbols, layout = _coded_symbols(p, entry, reuse=True, view=True)
        out = _writable(target, entry)
        tensor = target if out is not None else torch.from_numpy(out := np.empty(entry["shape"], dtype=np.float32))
        crc = crc32_blocks(identity.decode_blocks(symbols, entry["step"], layout, p.scales[name], out))
    else:
        if name in p.coded_streams:
            symbols, layout = _coded_symbols(p, entry, reuse=True)
            tensor = p.transform.decode_weights(torch.from_numpy(symbols), entry["step"], coded_index, layout,
                                                p.scales[name]).to(dtype)
        elif name in p.vectors:
            tensor = torch.from_numpy(p.vectors[name]).reshape(entry["shape"]).to(dtype)
        else:
            tensor = p.raw[name]
        crc = crc32(tensor)
    if crc == p.crcs[i]:
        return tensor, True
    if float_network:
        if unverified_ok:
            return tensor, False
        raise machine_dependent(name, p.transform.kind, p.stored_verified)
    if p.stored_verified:  # intact bytes, exact arithmetic: only a decoder that changed can get here
        raise IntegrityError(f"decoded {name!r} does not match its checksum although the stored bytes are intact: "
                             "this library's decoder differs from the writer's (a bug; please report it with the "
                             "file and `pip show hf-vae-compress pcodec`)")
    raise IntegrityError(f"decoded {name!r} does not match its checksum: the file is corrupt")


def _separate(into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The targets no other target overlaps in memory: only these are written from the decoding
    threads (tied weights, one storage under two names, are copied in order by the consumer)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in into.items() if t.numel())
    shared: set[str] = set()
    end, last = -1, None
    for start, stop, name in spans:
        if start < end:
            shared.update((name, last))
        if stop > end:
            end, last = stop, name
    return {name: t for name, t in into.items() if name not in shared}


def iter_decoded(header: dict, tensors: dict[str, torch.Tensor], progress: bool = False,
                 unverified_ok: bool | None = None, workers: int | None = None,
                 into: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in header order, decoded on a thread pool a few tensors ahead, once the
    header and the stored bytes have been checked (:func:`plan`; that happens on the first ``next``).

    A sealed container's stored bytes are covered by their SHA-256 (names, shapes and every coded
    byte), so each decoded tensor needs only its CRC-32: the decoded bytes are not hashed a second
    time (that SHA-256 was an eighth of resnet50's load). A container written before the seal has
    its whole-model SHA-256 checked when the last tensor has been yielded. ``unverified_ok``
    (default: the environment's opt-in, see :func:`~.integrity.allow_unverified`) lets a float
    decoder's output that fails its checksum through with a warning; everything else is still checked.

    ``into`` (e.g. a built model's state dict) lets identity-coded float32 tensors be decoded
    straight into those tensors' storage: the yielded tensor is then the target itself, already
    filled. Other tensors are yielded as decoded, for the caller to copy.
    """
    workers = workers or min(os.cpu_count() or 1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        p = plan(header, tensors, pool)
        unverified_ok = allow_unverified(unverified_ok)
        unverified: list[str] = []
        targets = _separate(into or {})
        coded = [i for i, e in enumerate(p.entries) if e["name"] in p.coded_streams]
        coded_index = {i: k for k, i in enumerate(coded)}
        model_hash = None if p.stored_verified else ModelHash()
        pending: dict[int, Future] = {}
        todo = iter(coded)
        for i, entry in enumerate(tqdm(p.entries, desc="decode", unit="tensor", disable=not progress, leave=False)):
            while len(pending) < LOOKAHEAD and (nxt := next(todo, None)) is not None:
                pending[nxt] = pool.submit(_decode_one, p, nxt, coded_index[nxt], unverified_ok,
                                           targets.get(p.entries[nxt]["name"]))
            name = entry["name"]
            # stored vectors and integer tensors are tiny: decoded here, between the coded ones
            tensor, verified = pending.pop(i).result() if i in pending else _decode_one(p, i, -1, unverified_ok)
            if not verified:
                unverified.append(name)
            if model_hash is not None:
                model_hash.update(name, tensor)
            yield name, tensor
    if unverified:  # the model hash cannot match either; every other tensor passed its own check
        warn_unverified(unverified, p.transform.kind)
    elif model_hash is not None and model_hash.digest() != p.model_sha256:
        raise IntegrityError("the decoded model does not match its SHA-256: the file is corrupt")


def unpack(header: dict, tensors: dict[str, torch.Tensor]) -> Latents:
    """The container as editable :class:`Latents` (fine-tuning's starting point; no checks of the
    decoded weights)."""
    p = plan(header, tensors)
    reference, coded, symbols, steps, stored = {}, [], [], [], {}
    for entry in p.entries:
        name, dtype = entry["name"], getattr(torch, entry["dtype"])
        reference[name] = torch.empty(entry["shape"], dtype=dtype, device="meta")
        if name in p.coded_streams:
            s, layout = _coded_symbols(p, entry)
            symbols.append(torch.from_numpy(s))
            coded.append(CodedTensor(name, dtype, layout, p.scales[name], None))
            steps.append(entry["step"])
        elif name in p.vectors:
            stored[name] = torch.from_numpy(p.vectors[name]).reshape(entry["shape"]).to(getattr(torch, entry["stored"]))
        else:
            stored[name] = p.raw[name]
    return Latents(reference, coded, symbols, steps, stored, p.transform, p.config, header["fp32_safetensors_bytes"])


def stored_verified(header: dict, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the stored bytes match their SHA-256 (:class:`IntegrityError` when they do not);
    False for containers written before the hash existed."""
    validate(header, tensors)
    return _check_stored(header, tensors)


def report_parts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes per stored part; the header, checks and framing are what the file's total leaves over."""
    groups = {"bitstreams": ("streams",), "tables": ("tables",), "scales": ("scales",), "vectors": ("vectors",),
              "decoder": ("decoder.",), "raw": ("raw.",)}
    return {part: sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefixes))
            for part, prefixes in groups.items()}


def layer_bytes(entry: dict) -> int | None:
    """A coded tensor's own bytes: its streams and tables (None for stored tensors)."""
    if "streams" not in entry:
        return None
    return sum(m + p for m, p in entry["streams"])
