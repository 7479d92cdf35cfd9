"""Which module reads which container version, and which one writes.

A container's bytes mean what its version's module says: :mod:`.v1` (frozen: read only) and
:mod:`.v2` (read and written). Each exposes the same names (its ``VERSION``, ``NAMES_VERIFIED``,
``iter_decoded``, ``stored_verified``, ``unpack``, ``seal``, ``report_parts``, ``layer_bytes``), so
callers ask the registry for a reader instead of branching on version numbers. A new version is
a new module added here; the old ones stay, unchanged, for the files already written.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from . import v1, v2
from .framing import ContainerError, read_container

READERS: dict[int, ModuleType] = {v1.VERSION: v1, v2.VERSION: v2}
WRITER = v2  # what :func:`~.v2.assemble` writes; the newest version


def reader(version: int) -> ModuleType:
    """The module that reads ``version``."""
    if version not in READERS:
        raise ContainerError(f"format version {version!r} is not one this library reads ({sorted(READERS)})")
    return READERS[version]


def read(path: str | Path) -> tuple[ModuleType, dict, dict[str, torch.Tensor]]:
    """A container file's reader, header and stored tensors (framing validated, nothing decoded)."""
    version, header, tensors = read_container(path, READERS)
    return reader(version), header, tensors
