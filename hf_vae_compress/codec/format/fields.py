"""Checked reads of a container header's JSON fields, shared by every reader.

A header is untrusted input (a file from the Hub): every value is type- and range-checked before
it sizes an allocation or a slice, and each failure is a :class:`ContainerError` naming the field.
"""

from __future__ import annotations

import math

from ..config import VAECompressionConfig
from ..transform import container_kind, transform_class
from .framing import ContainerError
from .limits import MAX_CHUNK_SIZE, MAX_HIDDEN_SIZE, MAX_NUMEL, MAX_TENSOR_DIMS

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "bool")


def fail(field_name: str, problem: str) -> ContainerError:
    return ContainerError(f"container header field {field_name}: {problem}")


def get_field(obj: dict, key: str, kind: type | tuple, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise fail(f"{where}.{key}", "missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(f"{where}.{key}", f"expected {kind}, got {type(value).__name__}")
    return value


def int_field(obj: dict, key: str, where: str, lo: int, hi: int) -> int:
    value = get_field(obj, key, int, where)
    if isinstance(value, bool) or not lo <= value <= hi:
        raise fail(f"{where}.{key}", f"{value!r} is outside [{lo}, {hi}]")
    return value


def shape_field(entry: dict, where: str) -> list[int]:
    shape = get_field(entry, "shape", list, where)
    if len(shape) > MAX_TENSOR_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_NUMEL for d in shape):
        raise fail(f"{where}.shape", f"{shape!r} is not a shape")
    if math.prod(shape) > MAX_NUMEL:
        raise fail(f"{where}.shape", f"{shape!r} has more than {MAX_NUMEL} values")
    return shape


def entry_fields(entry: dict, where: str, seen: set[str]) -> tuple[str, str, str, list[int]]:
    """A tensor-table entry's name (a new string), dtype and codec names, and shape, checked."""
    name = get_field(entry, "name", str, where)
    if name in seen:
        raise fail(f"{where}.name", f"duplicate tensor name {name!r}")
    seen.add(name)
    return name, get_field(entry, "dtype", str, where), get_field(entry, "codec", str, where), shape_field(entry, where)


# Config fields that containers record and the config no longer has (v1's ANS table precision; the
# VAE's training settings, now nested under ``fit``): no decode reads them, so they are dropped on read.
RETIRED_CONFIG_FIELDS = ("table_precision", "train_steps", "train_batch_chunks", "learning_rate")


def stored_config(header: dict) -> VAECompressionConfig:
    """The codec config a container was written with. Containers older than output-aware rounding
    name no rounding: they rounded to nearest."""
    stored = get_field(header, "config", dict, "header")
    try:
        return VAECompressionConfig.from_dict(
            {"rounding": "nearest", **{k: v for k, v in stored.items() if k not in RETIRED_CONFIG_FIELDS}})
    except (TypeError, ValueError) as err:
        raise fail("config", str(err)) from err


def codec_fields(header: dict) -> tuple[VAECompressionConfig, dict, str, int, int]:
    """The header's codec config and its transform spec, kind, chunk size and hidden size, checked
    against the readers' limits."""
    config = stored_config(header)
    spec = get_field(header, "transform", dict, "header")
    kind = get_field(spec, "kind", str, "transform")
    try:
        if container_kind(kind) != kind:
            raise ValueError(f"{kind!r} is a config's transform, recorded in a container as {container_kind(kind)!r}")
        transform_class(kind)  # the kinds this library decodes
    except ValueError as err:
        raise fail("transform.kind", str(err)) from err
    chunk_size = int_field(spec, "chunk_size", "transform", 1, MAX_CHUNK_SIZE)
    hidden_size = int_field(spec, "hidden_size", "transform", 1, MAX_HIDDEN_SIZE)
    return config, spec, kind, chunk_size, hidden_size
