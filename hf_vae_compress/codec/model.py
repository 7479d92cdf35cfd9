"""The codec's two entry points: :func:`compress` (model -> CompressedModel) and
:meth:`CompressedModel.decode` (container -> state dict).

Pipeline: select tensors -> chunk and normalise -> encode -> quantize -> entropy-code -> container.
Decoding runs the same stages in reverse through the same functions the encoder used to compute
the hashes, so a container that verifies decodes to exactly the weights that were measured.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

from . import entropy
from .chunking import ChunkLayout, from_chunks, row_scales, to_chunks
from .config import VAECompressionConfig
from .container import CONTAINER_NAME, FORMAT_NAME, FORMAT_VERSION, ContainerError, read_container, serialize
from .importance import fisher_diagonal, mean_normalised_fisher
from .rate import lam_from_beta, search_lam, steps_for
from .select import select_tensors
from .transform import Shard, WeightVAE, build_transform, fit_vae, refine_decoder, round_to_fp16_

logger = logging.getLogger(__name__)

DECODE_BATCH = 1 << 18  # chunks per decoder call: bounds peak memory on large tensors


class IntegrityError(ContainerError):
    """Decoded data does not match the hashes recorded at compression time."""


def _sha256(t: torch.Tensor | np.ndarray) -> str:
    array = t.contiguous().reshape(-1).view(torch.uint8).numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    return hashlib.sha256(memoryview(array.reshape(-1))).hexdigest()  # hashes in place, without a copy


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ContainerError(f"unknown dtype {name!r} in container header")
    return dtype


@dataclass
class _Coded:
    """A coded tensor between stages: its layout, stored scales and normalised chunks."""

    name: str
    dtype: torch.dtype
    layout: ChunkLayout
    scales: torch.Tensor
    chunks: torch.Tensor


def _prepare(state_dict: dict[str, torch.Tensor], names: list[str], config: VAECompressionConfig) -> list[_Coded]:
    out = []
    for name in names:
        tensor = state_dict[name]
        layout = ChunkLayout.of(tuple(tensor.shape), config.chunk_size)
        scales = row_scales(tensor, layout, per_channel=config.normalization == "channel")
        out.append(_Coded(name, tensor.dtype, layout, scales, to_chunks(tensor, layout, scales)))
    return out


@torch.no_grad()
def _encode(transform: torch.nn.Module, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
    return torch.cat([transform.encode(c, step, index) for c in chunks.split(DECODE_BATCH)])


@torch.no_grad()
def _decode(transform: torch.nn.Module, symbols: torch.Tensor, step: float, index: int) -> torch.Tensor:
    return torch.cat([transform.decode(s, step, index) for s in symbols.split(DECODE_BATCH)])


def _sensitivities(model, coded: list[_Coded], calibration_data, config, loss_fn, progress,
                   fisher: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Mean normalised Fisher per coded tensor; all 1 (equal relative precision) without data."""
    if fisher is None:
        if calibration_data is None or not isinstance(model, torch.nn.Module):
            return [1.0] * len(coded)
        fisher = fisher_diagonal(model, calibration_data, config.calibration_batches, loss_fn, progress)
    values = [mean_normalised_fisher(fisher[c.name], c.scales) if c.name in fisher else None for c in coded]
    known = sorted(v for v in values if v)
    fallback = known[len(known) // 2] if known else 1.0
    return [v if v else fallback for v in values]


def _stored(state_dict: dict[str, torch.Tensor], names: list[str], config: VAECompressionConfig) -> dict:
    raw_dtype = _dtype(config.raw_dtype)
    return {n: (state_dict[n].to(raw_dtype) if state_dict[n].is_floating_point() else state_dict[n]).contiguous()
            for n in names}


def compress(model: torch.nn.Module | dict[str, torch.Tensor], config: VAECompressionConfig | None = None,
             calibration_data: Iterable | None = None, loss_fn: Callable | None = None,
             progress: bool = True, shard: Shard | None = None,
             fisher: dict[str, torch.Tensor] | None = None) -> "CompressedModel":
    """Compress a model (or a bare state dict) post-hoc.

    ``calibration_data`` yields model inputs; with it, steps are allocated by Fisher sensitivity,
    without it every tensor gets the same relative precision. ``loss_fn(model, batch) ->
    (loss, batch_size)`` replaces the sampled-label classification loss for other tasks.
    With a ``shard`` the VAE fit is data-parallel over processes; everything else is
    deterministic and computed identically by each process, which all return the same result.
    ``fisher`` (from :func:`~.importance.fisher_diagonal`) replaces the calibration pass: a rate
    search that compresses one model many times measures it once.
    """
    config = config or VAECompressionConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    state_dict = {k: v.detach().cpu() for k, v in
                  (model.state_dict() if isinstance(model, torch.nn.Module) else model).items()}
    coded_names, raw_names = select_tensors(state_dict, config)
    coded = _prepare(state_dict, coded_names, config)
    sens = _sensitivities(model, coded, calibration_data, config, loss_fn, progress, fisher)
    stored = _stored(state_dict, raw_names, config)
    num_weights = sum(v.numel() for v in state_dict.values() if v.is_floating_point())
    fixed_bits = 8 * _fixed_bytes(coded, stored, config)

    def total_bits(transform: torch.nn.Module, lam: float) -> float:
        steps = steps_for(lam, sens)
        payload = 0.0
        for i, (c, step) in enumerate(zip(coded, steps)):
            payload += entropy.estimate_tensor_bits(_encode(transform, c.chunks, step, i).numpy(), config.table_precision)
        return payload + fixed_bits

    transform = build_transform("identity", config.chunk_size, config.hidden_size, len(coded))
    if config.beta is not None:
        lam = lam_from_beta(config.beta)
    else:
        target = config.target_bits_per_weight * num_weights
        lam = search_lam(lambda l: total_bits(transform, l), target, sens)
    if config.transform == "vae":
        transform = build_transform("vae", config.chunk_size, config.hidden_size, len(coded))
        _fit(transform, coded, steps_for(lam, sens), config, progress, shard)
        if config.beta is None:
            lam = search_lam(lambda l: total_bits(transform, l), target, sens)
    steps = steps_for(lam, sens)
    symbols = [_encode(transform, c.chunks, step, i) for i, (c, step) in enumerate(zip(coded, steps))]
    if isinstance(transform, WeightVAE):
        _refine(transform, coded, symbols, steps, config, shard)

    compressed = assemble(Latents(state_dict, coded, symbols, steps, stored, transform, config), progress)
    compressed.header["encode_seconds"] = round(time.perf_counter() - start, 3)
    compressed.header["lam"] = lam
    return compressed


def _fit(vae: WeightVAE, coded: list[_Coded], steps: list[float], config: VAECompressionConfig,
         progress: bool, shard: Shard | None) -> None:
    chunks, index, log_steps = _flat(coded, steps)
    fit_vae(vae, chunks, index, log_steps, config.train_steps, config.train_batch_chunks,
            config.learning_rate, config.seed, progress, shard)
    round_to_fp16_(vae.decoder)


def _flat(coded: list[_Coded], steps: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All chunks, their tensor index and the per-tensor log steps: the VAE's training data."""
    chunks = torch.cat([c.chunks for c in coded])
    index = torch.cat([torch.full((len(c.chunks),), i) for i, c in enumerate(coded)])
    return chunks, index, torch.tensor([math.log(s) for s in steps])


def _refine(vae: WeightVAE, coded: list[_Coded], symbols: list[torch.Tensor], steps: list[float],
            config: VAECompressionConfig, shard: Shard | None) -> None:
    chunks, index, log_steps = _flat(coded, steps)
    refine_decoder(vae, chunks, torch.cat(symbols), index, log_steps, config.train_steps // 2,
                   config.train_batch_chunks, config.learning_rate / 3, config.seed, shard)
    round_to_fp16_(vae.decoder)


def _fixed_bytes(coded: list[_Coded], stored: dict, config: VAECompressionConfig) -> int:
    """Bytes of everything but bitstreams and tables: raw tensors, scales, hashes, decoder, header."""
    decoder = 0
    if config.transform == "vae":
        d, h = config.chunk_size, config.hidden_size
        decoder = 2 * (d * h + 2 * h + h * d + d)  # plus the linear maps that pay for themselves
    header = 60 * len(coded) + 30 * len(stored) + 1500  # compressed JSON, measured on real models
    return (sum(v.numel() * v.element_size() for v in stored.values()) + 32 * (len(coded) + len(stored))
            + sum(2 * len(c.scales) for c in coded) + decoder + header)


@dataclass
class Latents:
    """Everything a container is built from, on the decode side: what fine-tuning edits.

    ``reference`` is a state dict with the model's names, shapes and dtypes (its values are not
    used: meta tensors do); ``symbols[i]`` are the integer latents of ``coded[i]``, decoded with
    ``steps[i]``.
    """

    reference: dict[str, torch.Tensor]
    coded: list[_Coded]
    symbols: list[torch.Tensor]
    steps: list[float]
    stored: dict[str, torch.Tensor]
    transform: torch.nn.Module
    config: VAECompressionConfig
    fp32_bytes: int | None = None  # size of the fp32 safetensors of the same weights

    def decode_tensor(self, i: int) -> torch.Tensor:
        c = self.coded[i]
        return from_chunks(_decode(self.transform, self.symbols[i], self.steps[i], i), c.layout, c.scales).to(c.dtype)


def assemble(latents: Latents, progress: bool = False) -> "CompressedModel":
    """Entropy-code every tensor and build the header, hashing what the decoder will produce."""
    config, transform = latents.config, latents.transform
    entries, hashes = {}, {}
    streams, tables, scales = [], [], []
    for i, c in enumerate(tqdm(latents.coded, desc="encode", unit="tensor", disable=not progress, leave=False)):
        words, stream_tables, split = entropy.encode_tensor(latents.symbols[i].numpy(), config.table_precision)
        streams.append(words.view(np.uint8))
        tables += [t.counts for t in stream_tables if len(t.counts) > 1]
        scales.append(c.scales.to(torch.float16))
        entries[c.name] = dict(name=c.name, codec=config.transform, shape=list(c.layout.shape),
                               dtype=_dtype_name(c.dtype), step=latents.steps[i], words=len(words),
                               lo=[t.lo for t in stream_tables], k=[len(t.counts) for t in stream_tables],
                               escape=[t.escape for t in stream_tables], split=split)
        hashes[c.name] = _sha256(latents.decode_tensor(i))
    raw: dict[str, list[torch.Tensor]] = {}
    for name, value in latents.stored.items():
        raw.setdefault(_dtype_name(value.dtype), []).append(value.reshape(-1))
        original = latents.reference[name]
        entries[name] = dict(name=name, codec="raw", shape=list(original.shape), dtype=_dtype_name(original.dtype),
                             stored=_dtype_name(value.dtype))
        hashes[name] = _sha256(value.to(original.dtype))
    names = [n for n in latents.reference if n in entries]
    tensors = {
        "sha256": torch.tensor([list(bytes.fromhex(hashes[n])) for n in names], dtype=torch.uint8),
        "streams": torch.from_numpy(np.concatenate(streams or [np.zeros(0, np.uint8)]).copy()),
        "tables": torch.from_numpy(np.concatenate(tables or [np.zeros(0)]).astype(np.uint16)),
        "scales": torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float16),
        **{f"raw.{dtype}": torch.cat(parts) for dtype, parts in raw.items()},
    }
    transform_spec = dict(kind=config.transform, chunk_size=config.chunk_size, hidden_size=config.hidden_size)
    if isinstance(transform, WeightVAE):
        tensors.update({f"decoder.{k}": v.to(torch.float16) for k, v in transform.decoder_state().items()})
        transform_spec["linear_maps"] = transform.active_maps
    fp32_bytes = latents.fp32_bytes or len(safetensors.torch.save(
        {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in latents.reference.items()}))
    header = dict(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, config=config.to_dict(),
        transform=transform_spec, tensors=[entries[n] for n in names], fp32_safetensors_bytes=fp32_bytes,
        library={"hf_vae_compress": _version("hf-vae-compress"), "constriction": _version("constriction")},
    )
    return CompressedModel(header, tensors)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Cursor:
    """Walks a concatenated part in tensor-table order."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.pos = tensor, 0

    def take(self, n: int) -> torch.Tensor:
        if self.pos + n > len(self.tensor):
            raise ContainerError("container data is shorter than its header says")
        out = self.tensor[self.pos: self.pos + n]
        self.pos += n
        return out


class CompressedModel:
    """A compressed checkpoint: the container's header and tensors, held in memory."""

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor]):
        self.header = header
        self.tensors = tensors

    @property
    def config(self) -> VAECompressionConfig:
        return VAECompressionConfig.from_dict(self.header["config"])

    def to_bytes(self) -> bytes:
        """The exact bytes of the container file."""
        return serialize(self.header, self.tensors)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONTAINER_NAME
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CompressedModel":
        """Load from a container file or a folder holding ``model.vaec.safetensors``."""
        path = Path(path)
        header, tensors = read_container(path / CONTAINER_NAME if path.is_dir() else path)
        return cls(header, tensors)

    def _transform(self) -> torch.nn.Module:
        spec = self.header["transform"]
        num_coded = sum(e["codec"] != "raw" for e in self.header["tensors"])
        transform = build_transform(spec["kind"], spec["chunk_size"], spec["hidden_size"], num_coded)
        if isinstance(transform, WeightVAE):
            prefix = "decoder."
            weights = {k[len(prefix):]: v.float() for k, v in self.tensors.items() if k.startswith(prefix)}
            try:
                transform.load_decoder_state(weights, spec["linear_maps"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ContainerError(f"container decoder weights do not match its header: {err}") from err
        return transform.eval()

    def unpack(self, progress: bool = False) -> Latents:
        """Entropy-decode the container into editable :class:`Latents` (no hash checks yet)."""
        try:
            transform = self._transform()
            cursors = {k: _Cursor(self.tensors[k]) for k in _PARTS}
            cursors.update({k: _Cursor(v) for k, v in self.tensors.items() if k.startswith("raw.")})
            entries = self.header["tensors"]
            chunk_size = self.header["transform"]["chunk_size"]
            precision = self.header["config"]["table_precision"]
        except KeyError as err:
            raise ContainerError(f"container is missing {err}") from err
        reference, coded, symbols, steps, stored = {}, [], [], [], {}
        for entry in tqdm(entries, desc="decode", unit="tensor", disable=not progress, leave=False):
            name, dtype, shape = entry["name"], _dtype(entry["dtype"]), entry["shape"]
            reference[name] = torch.empty(shape, dtype=dtype, device="meta")
            if entry["codec"] == "raw":
                key = f"raw.{entry['stored']}"
                if key not in cursors:
                    raise ContainerError(f"container is missing {key!r} for {name!r}")
                stored[name] = cursors[key].take(math.prod(shape)).reshape(shape)
                continue
            layout = ChunkLayout.of(tuple(shape), chunk_size)
            symbols.append(self._entry_symbols(entry, layout, cursors, precision))
            coded.append(_Coded(name, dtype, layout, cursors["scales"].take(layout.rows).float(), None))
            steps.append(entry["step"])
        return Latents(reference, coded, symbols, steps, stored, transform, self.config,
                       self.header["fp32_safetensors_bytes"])

    def decode(self, progress: bool = False) -> dict[str, torch.Tensor]:
        """The dense state dict, every tensor checked against its SHA-256."""
        latents = self.unpack(progress)
        hashes = self.tensors.get("sha256")
        if hashes is None or hashes.shape != (len(latents.reference), 32):
            raise ContainerError("container hash table does not match its header")
        decoded = {c.name: i for i, c in enumerate(latents.coded)}
        out = {}
        for (name, ref), digest in zip(latents.reference.items(), hashes):
            if name in decoded:
                tensor = latents.decode_tensor(decoded[name])
            else:
                tensor = latents.stored[name].to(ref.dtype)
            if _sha256(tensor) != bytes(digest.tolist()).hex():
                raise IntegrityError(f"decoded {name!r} does not match its SHA-256: the file is corrupt")
            out[name] = tensor
        return out

    def _entry_symbols(self, entry: dict, layout: ChunkLayout, cursors: dict[str, _Cursor],
                       precision: int) -> torch.Tensor:
        name = entry["name"]
        if layout.num_chunks * layout.chunk_size < math.prod(entry["shape"]):
            raise ContainerError(f"{name!r}: shape and chunk layout in the header disagree")
        words = cursors["streams"].take(4 * entry["words"]).numpy().view(np.uint32)
        counts = cursors["tables"].take(sum(k for k in entry["k"] if k > 1)).numpy()
        try:
            tables = entropy.parse_tables(entry["lo"], entry["k"], entry["escape"],
                                          _with_singletons(counts, entry["k"], precision), precision)
            symbols = entropy.decode_tensor(words, tables, entry["split"], layout.num_chunks)
        except (ValueError, RuntimeError, OverflowError) as err:
            raise ContainerError(f"bitstream of {name!r} is corrupt: {err}") from err
        return torch.from_numpy(symbols)

    def report(self) -> dict:
        """Bytes per part, bits per weight and per-tensor rates of the container as it is written."""
        groups = {"bitstreams": ("streams",), "tables": ("tables",), "scales": ("scales",),
                  "decoder": ("decoder.",), "raw": ("raw.",)}
        sizes = {part: sum(v.numel() * v.element_size() for k, v in self.tensors.items() if k.startswith(prefixes))
                 for part, prefixes in groups.items()}
        total = len(self.to_bytes())
        sizes["header"] = total - sum(sizes.values())  # header, hashes and safetensors framing
        floats = [e for e in self.header["tensors"] if e["dtype"].startswith(("float", "bfloat"))]
        num_weights = sum(math.prod(e["shape"]) for e in floats)
        layers = []
        for e in self.header["tensors"]:
            if e["codec"] == "raw":
                continue
            rows = ChunkLayout.of(tuple(e["shape"]), 1).rows
            nbytes = 4 * e["words"] + 2 * sum(k for k in e["k"] if k > 1) + 2 * rows
            layers.append(dict(name=e["name"], shape=e["shape"], step=e["step"], bytes=nbytes,
                               bits_per_weight=8 * nbytes / math.prod(e["shape"])))
        return dict(total_bytes=total, parts=sizes, num_weights=num_weights,
                    bits_per_weight=8 * total / num_weights,
                    fp32_safetensors_bytes=self.header["fp32_safetensors_bytes"],
                    ratio_vs_fp32=self.header["fp32_safetensors_bytes"] / total, layers=layers)


_PARTS = ("streams", "tables", "scales")


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
