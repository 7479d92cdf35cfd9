"""Container format version 1: a frozen reader (written until format v2; nothing writes it now).

It decodes exactly as the version-1 code did, so containers written by it (the committed
artifacts, pushed repos) keep their bit-identical weights: constriction's ANS with integer
tables per tensor and latent dimension (split by a context where the encoder found that paid),
Exp-Golomb escapes, fp16 row scales, fp16 stored tensors and one SHA-256 per decoded tensor.
Do not change the arithmetic here; ``tests/test_container_v1.py`` pins its output.

Version 1 has no hash of its stored bytes, only of decoded tensors. A VAE container's float decoder
gives other bits on other machines, so when only its output fails a hash (the bitstreams having
decoded cleanly, and every stored tensor matching), that is reported as
:class:`~.integrity.MachineDependentError`, which the explicit opt-in can load unverified.

Entries: ``header`` (zlib JSON), ``sha256`` (32 B per tensor-table entry), ``streams`` (uint8),
``tables`` (uint16 counts), ``scales`` (fp16), ``raw.<dtype>``, ``decoder.*`` (fp16).
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import constriction
import numpy as np
import torch

from ..transform import Transform, build_transform
from .fields import FLOAT_DTYPES, INT_DTYPES, codec_fields, entry_fields, fail, get_field, int_field
from .framing import ContainerError
from .integrity import IntegrityError, allow_unverified, machine_dependent, sha256_hex, warn_unverified
from .layout import ChunkLayout, from_chunks
from .limits import MAX_NUMEL

VERSION = 1
NAMES_VERIFIED = False  # one SHA-256 per tensor, of its bytes only
NUM_CONTEXTS = 3
_PARTS = {"streams": torch.uint8, "tables": torch.uint16, "scales": torch.float16}
MAX_TOKEN = 1 << 20  # |symbol| a table may name; the writer's were far below
MAX_ESCAPE_BITS = 30  # Exp-Golomb buckets: offsets are drawn as int32 uniforms
# a malformed header raises these while it is walked; each becomes a ContainerError
_MALFORMED = (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError)

logger = logging.getLogger(__name__)


class _Cursor:
    """Walks a concatenated part in tensor-table order."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.pos = tensor, 0

    def take(self, n: int) -> torch.Tensor:
        if n < 0 or self.pos + n > len(self.tensor):
            raise ContainerError("container data is shorter than its header says")
        out = self.tensor[self.pos: self.pos + n]
        self.pos += n
        return out


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ContainerError(f"unknown dtype {name!r} in container header")
    return dtype


def _transform(header: dict, tensors: dict[str, torch.Tensor]) -> Transform:
    spec = header["transform"]
    num_coded = sum(e["codec"] != "raw" for e in header["tensors"])
    transform = build_transform(spec["kind"], spec["chunk_size"], spec["hidden_size"], num_coded)
    prefix = "decoder."
    try:
        transform.load_stored_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, spec)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ContainerError(f"container decoder weights do not match its header: {err}") from err
    return transform.eval()


def seal(header: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The header as written: version 1 has no stored-bytes hash (and is never written again)."""
    return header


def stored_verified(header: dict, tensors: dict[str, torch.Tensor]) -> bool:
    """Version 1 records no hash of its stored bytes: nothing to verify without decoding."""
    return False


def unpack(header: dict, tensors: dict[str, torch.Tensor]):
    raise ContainerError("this needs a version-2 container; version-1 containers decode but cannot be edited: "
                         "recompress the model")


def validate(header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Check the header against itself and the stored parts before anything is decoded.

    Types, ranges and every byte count a header names are checked against the parts they point
    into, and the values the tensors hold against the fp32 size the writer recorded, so a
    mutated header cannot size an allocation; each failure is a :class:`ContainerError` naming
    the field. (The version-1 code itself trusted its header.)
    """
    int_field(get_field(header, "config", dict, "header"), "table_precision", "config", 8, 15)
    _, _, kind, chunk_size, _ = codec_fields(header)
    fp32_bytes = int_field(header, "fp32_safetensors_bytes", "header", 0, 1 << 50)
    entries = get_field(header, "tensors", list, "header")
    need = dict.fromkeys(_PARTS, 0)
    names: set[str] = set()
    values_bytes = 0
    for i, entry in enumerate(entries):
        where = f"tensors[{i}]"
        _, dtype, codec, shape = entry_fields(entry, where, names)
        if dtype not in FLOAT_DTYPES + INT_DTYPES:
            raise fail(f"{where}.dtype", f"unknown dtype {dtype!r}")
        values_bytes += math.prod(shape) * (4 if dtype in FLOAT_DTYPES else _dtype(dtype).itemsize)
        if codec == "raw":
            stored = get_field(entry, "stored", str, where)
            key = f"raw.{stored}"
            need[key] = need.get(key, 0) + math.prod(shape)
        elif codec == kind:
            for part, n in _coded_entry_needs(entry, where, dtype, shape, chunk_size).items():
                need[part] += n
        else:
            raise fail(f"{where}.codec", f"unknown codec {codec!r}")
    if values_bytes > min(fp32_bytes, 4 * MAX_NUMEL):
        raise fail("tensors", f"the shapes hold {values_bytes} bytes of fp32 values, more than the "
                              f"{fp32_bytes}-byte fp32 checkpoint the writer recorded")
    for key, n in need.items():
        part = tensors.get(key)
        if part is None or part.dim() != 1 or (key in _PARTS and part.dtype != _PARTS[key]):
            raise ContainerError(f"container part {key!r} is missing or malformed")
        if len(part) != n:
            raise fail("tensors", f"the header names {n} values of part {key!r}, which holds {len(part)}")
    hashes = tensors.get("sha256")
    if hashes is None or hashes.dtype != torch.uint8 or tuple(hashes.shape) != (len(entries), 32):
        raise ContainerError("container hash table does not match its header")


def _coded_entry_needs(entry: dict, where: str, dtype: str, shape: list[int], chunk_size: int) -> dict[str, int]:
    """A coded tensor's checked fields: how many values of each part it takes."""
    if dtype not in FLOAT_DTYPES or not shape or not math.prod(shape):
        raise fail(f"{where}.dtype", f"a coded tensor must be a non-empty float tensor, got {dtype} {shape}")
    step = get_field(entry, "step", (int, float), where)
    if not math.isfinite(step) or step <= 0:
        raise fail(f"{where}.step", f"{step!r} is not a positive step")
    words = int_field(entry, "words", where, 0, 1 << 40)
    split = get_field(entry, "split", list, where)
    if len(split) != chunk_size or not all(isinstance(b, bool) for b in split):
        raise fail(f"{where}.split", f"expected {chunk_size} booleans")
    num_tables = sum(_num_contexts(j) if b else 1 for j, b in enumerate(split))
    lists = {}
    for key in ("lo", "k", "escape"):
        value = get_field(entry, key, list, where)
        if len(value) != num_tables or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise fail(f"{where}.{key}", f"expected {num_tables} integers")
        lists[key] = value
    for lo, k, escape in zip(lists["lo"], lists["k"], lists["escape"]):
        if not (1 <= k <= MAX_TOKEN and -MAX_TOKEN <= lo <= MAX_TOKEN and 0 <= escape <= MAX_TOKEN):
            raise fail(f"{where}.k", f"table bounds lo={lo}, k={k}, escape={escape} are out of range")
        if max(abs(lo), abs(lo + k - 1)) - escape - 1 > MAX_ESCAPE_BITS:
            raise fail(f"{where}.escape", f"escape {escape} leaves symbols of table [{lo}, {lo + k}) too wide to code")
    layout = ChunkLayout.of(tuple(shape), chunk_size)
    return {"streams": 4 * words, "tables": sum(k for k in lists["k"] if k > 1), "scales": layout.rows}


def iter_decoded(header: dict, tensors: dict[str, torch.Tensor], progress: bool = False,
                 unverified_ok: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in header order, each checked against its SHA-256 as it is decoded
    (``unverified_ok``: see :func:`.v2.iter_decoded`; ``progress`` is not shown: v1 decodes serially).

    The header is validated first (:func:`validate`). Version 1 hashes each tensor's bytes, not
    its name, dtype or shape: a header whose names were altered consistently cannot be detected,
    which the log says on every load (version 2's model hash covers names).
    """
    validate(header, tensors)
    logger.warning("loading a version-1 container: its hashes cover each tensor's bytes but not its name, so "
                   "renamed tensors cannot be detected; recompress it to write version 2, which verifies names too")
    unverified_ok = allow_unverified(unverified_ok)
    unverified: list[str] = []
    try:
        transform = _transform(header, tensors)
        cursors = {k: _Cursor(tensors[k]) for k in _PARTS}
        cursors.update({k: _Cursor(v) for k, v in tensors.items() if k.startswith("raw.")})
        entries = header["tensors"]
        chunk_size = header["transform"]["chunk_size"]
        precision = header["config"]["table_precision"]
        hashes = tensors.get("sha256")
        if hashes is None or tuple(hashes.shape) != (len(entries), 32):
            raise ContainerError("container hash table does not match its header")
    except _MALFORMED as err:
        raise ContainerError(f"container header is malformed: {err!r}") from err
    coded_index = 0
    for entry, digest in zip(entries, hashes):
        float_network = False
        try:
            name, dtype, shape = entry["name"], _dtype(entry["dtype"]), entry["shape"]
            if entry["codec"] == "raw":
                key = f"raw.{entry['stored']}"
                if key not in cursors:
                    raise ContainerError(f"container is missing {key!r} for {name!r}")
                tensor = cursors[key].take(math.prod(shape)).reshape(shape).to(dtype)
            else:
                layout = ChunkLayout.of(tuple(shape), chunk_size)
                symbols = torch.from_numpy(_entry_symbols(entry, layout, cursors, precision))
                scales = cursors["scales"].take(layout.rows).float()
                with torch.no_grad():
                    chunks = torch.cat([transform.decode(s, entry["step"], coded_index) for s in symbols.split(1 << 18)])
                tensor = from_chunks(chunks, layout, scales).to(dtype)
                coded_index += 1
                float_network = not transform.portable
        except _MALFORMED as err:
            raise ContainerError(f"container header entry {entry.get('name') if isinstance(entry, dict) else entry!r} "
                                 f"is malformed: {err!r}") from err
        if sha256_hex(tensor) != bytes(digest.tolist()).hex():
            if not float_network:
                raise IntegrityError(f"decoded {name!r} does not match its SHA-256: the file is corrupt")
            if not unverified_ok:
                raise machine_dependent(name, transform.kind, stored_verified=False)
            unverified.append(name)
        yield name, tensor
    warn_unverified(unverified, header["transform"]["kind"])


def report_parts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes per part; the header, hashes and framing are what the total leaves over."""
    groups = {"bitstreams": ("streams",), "tables": ("tables",), "scales": ("scales",),
              "decoder": ("decoder.",), "raw": ("raw.",)}
    return {part: sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefixes))
            for part, prefixes in groups.items()}


def layer_bytes(entry: dict) -> int | None:
    """Bytes of one coded tensor's bitstream, tables and scales (None for stored tensors)."""
    if entry["codec"] == "raw":
        return None
    rows = ChunkLayout.of(tuple(entry["shape"]), 1).rows
    return 4 * entry["words"] + 2 * sum(k for k in entry["k"] if k > 1) + 2 * rows


def _entry_symbols(entry: dict, layout: ChunkLayout, cursors: dict[str, _Cursor], precision: int) -> np.ndarray:
    name = entry["name"]
    if layout.num_chunks * layout.chunk_size < math.prod(entry["shape"]):
        raise ContainerError(f"{name!r}: shape and chunk layout in the header disagree")
    words = cursors["streams"].take(4 * entry["words"]).numpy().view(np.uint32)
    counts = cursors["tables"].take(sum(k for k in entry["k"] if k > 1)).numpy()
    try:
        tables = _parse_tables(entry["lo"], entry["k"], entry["escape"],
                               _with_singletons(counts, entry["k"], precision), precision)
        return _decode_tensor(words, tables, entry["split"], layout.num_chunks)
    except (ValueError, RuntimeError, OverflowError) as err:
        raise ContainerError(f"bitstream of {name!r} is corrupt: {err}") from err


def _with_singletons(counts: np.ndarray, sizes: list[int], precision: int) -> np.ndarray:
    """Re-insert the implied count of one-symbol tables, which are not stored."""
    parts, pos = [], 0
    for k in sizes:
        if k == 1:
            parts.append(np.array([1 << precision]))
        else:
            parts.append(counts[pos: pos + k])
            pos += k
    return np.concatenate(parts) if parts else np.zeros(0)


class _Table:
    def __init__(self, lo: int, counts: np.ndarray, escape: int):
        self.lo, self.counts, self.escape = lo, counts, escape

    @property
    def model(self):
        return constriction.stream.model.Categorical(self.counts.astype(np.float64), perfect=False)


def _parse_tables(los: list[int], sizes: list[int], escapes: list[int], counts: np.ndarray,
                  precision: int) -> list[_Table]:
    if not len(los) == len(sizes) == len(escapes) or sum(sizes) != len(counts) or min(sizes, default=1) < 1:
        raise ValueError("probability tables do not match their header")
    tables, pos = [], 0
    for lo, k, escape in zip(los, sizes, escapes):
        part = counts[pos: pos + k].astype(np.int64)
        if part.min() < 1 or part.sum() != (1 << precision):
            raise ValueError("probability tables are corrupt")
        tables.append(_Table(int(lo), part, int(escape)))
        pos += k
    return tables


def _num_contexts(dim: int) -> int:
    return min(dim + 1, NUM_CONTEXTS)


def _decode_stream(coder, table: _Table, length: int) -> np.ndarray:
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


def _decode_tensor(words: np.ndarray, tables: list[_Table], split: list[bool], length: int) -> np.ndarray:
    if len(tables) != sum(_num_contexts(j) if s else 1 for j, s in enumerate(split)):
        raise ValueError("probability tables do not match the context layout")
    coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32, copy=False))
    out = np.empty((length, len(split)), dtype=np.int32)
    nonzero = np.zeros(length, dtype=np.int64)
    tables = iter(tables)
    for j, use_split in enumerate(split):
        if use_split:
            ctx = np.minimum(nonzero, NUM_CONTEXTS - 1)
            for c in range(_num_contexts(j)):
                where = np.flatnonzero(ctx == c)
                out[where, j] = _decode_stream(coder, next(tables), len(where))
        else:
            out[:, j] = _decode_stream(coder, next(tables), length)
        nonzero += out[:, j] != 0
    if not coder.is_empty():
        raise ValueError("bitstream has data left after decoding: it does not match its tables")
    return out
