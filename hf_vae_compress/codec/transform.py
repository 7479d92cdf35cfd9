"""Stage 3: the learned transform, a small VAE over the model's own weight chunks.

The encoder maps a normalised chunk to a latent of the same size (a bottleneck loses accuracy:
unused latent dimensions fall to zero bits on their own), the latent is quantized with the
tensor's step, and the decoder maps it back. Each side is a per-tensor linear map (9x9 for 3x3
kernels: it learns each layer's decorrelating basis, a KLT-like coding gain) composed with a
residual MLP shared by all tensors and conditioned on the log step (it learns dead zones and
reconstruction offsets). The MLPs' last layers start at zero and the linear maps at each layer's KLT, an orthonormal
basis: before training the codec is scalar quantization in a decorrelated basis, and training
moves away from that by lowering distortion + beta * rate. ``transform="identity"`` is the
ablation with no transform at all (plain scalar quantization in the same pipeline).

``transform="vae-int"`` (:class:`PortableVAE`) keeps the float encoder (it runs only when
compressing) and drops the decoder's MLP: its decoder is the per-tensor linear map alone, stored as
int16 with a power-of-two exponent and evaluated in integer arithmetic (:mod:`.format.linear`), so
its containers decode to the same bits on every machine, as the identity's do.

This module holds the interface and the networks; fitting them (the KLT start, the training
loops, the Laplace prior that stands in for the coder's rate while training) is :mod:`.fit`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lattice import chunk_basis, coordinates
from .format import identity, linear
from .format.layout import ChunkLayout, from_chunks
from .quantize import dequantize, quantize

DECODE_BATCH = 1 << 18  # chunks per network call: bounds peak memory on large tensors


class ConditionedResidualMLP(nn.Module):
    """``x + fc2(relu(fc1(x) + w_c * log_step))``; starts as the identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.cond = nn.Parameter(torch.zeros(hidden))
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, log_step: torch.Tensor | float) -> torch.Tensor:
        if isinstance(log_step, torch.Tensor) and log_step.dim() > 0:
            hidden = self.fc1(x) + log_step[:, None] * self.cond
        else:  # one step for all rows: fold the condition into the bias
            hidden = F.linear(x, self.fc1.weight, self.fc1.bias + float(log_step) * self.cond)
        return x + self.fc2(F.relu(hidden))


def _per_tensor_linear(matrices: torch.Tensor, x: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """``x @ matrices[index].T`` row by row; one matmul when every row belongs to one tensor."""
    if isinstance(index, int):
        return x @ matrices[index].T
    return torch.einsum("bij,bj->bi", matrices[index], x)


class Analysis(nn.Module):
    """Encoder: a per-tensor linear map (decorrelates each layer's chunks), then the shared MLP."""

    def __init__(self, chunk_size: int, hidden_size: int, num_tensors: int):
        super().__init__()
        self.linear = nn.Parameter(torch.eye(chunk_size).repeat(num_tensors, 1, 1))
        self.mlp = ConditionedResidualMLP(chunk_size, hidden_size)

    def forward(self, x: torch.Tensor, log_step, index) -> torch.Tensor:
        return self.mlp(_per_tensor_linear(self.linear, x, index), log_step)


class Synthesis(nn.Module):
    """Decoder: the shared MLP, then a per-tensor linear map back to weight space."""

    def __init__(self, chunk_size: int, hidden_size: int, num_tensors: int):
        super().__init__()
        self.mlp = ConditionedResidualMLP(chunk_size, hidden_size)
        self.linear = nn.Parameter(torch.eye(chunk_size).repeat(num_tensors, 1, 1))

    def forward(self, y: torch.Tensor, log_step, index) -> torch.Tensor:
        return _per_tensor_linear(self.linear, self.mlp(y, log_step), index)


class LinearSynthesis(nn.Module):
    """The portable decoder: each tensor's linear map alone (no MLP, no step). While fitting the maps
    are parameters; a frozen copy (``trainable=False``) holds them as a buffer, the stored maps' float
    view that fine-tuning trains the latents through and leaves as stored."""

    def __init__(self, maps: torch.Tensor, trainable: bool = True):
        super().__init__()
        if trainable:
            self.linear = nn.Parameter(maps)
        else:
            self.register_buffer("linear", maps.detach().clone())

    def forward(self, y: torch.Tensor, log_step, index) -> torch.Tensor:
        return _per_tensor_linear(self.linear, y, index)


class Transform(nn.Module):
    """What the codec asks of a transform, so no caller needs to know which one it has.

    ``encode`` maps normalised chunks to integer symbols at a tensor's step, ``decode`` maps them
    back to chunks, and ``decode_weights`` goes all the way to the tensor (a transform may fuse
    the steps). ``stored_state``/``spec`` are what the container keeps of it, ``load_stored_state``
    reads it back; ``trainable_decoder`` is the network fine-tuning trains, if any. What a
    transform learns before coding, :mod:`.fit` fits.

    ``has_weight_grid`` says whether a symbol is a level on a grid in weight space (symbol times
    the row's factor), so that an encoder may choose symbols by their effect on the weights, as
    output-aware rounding does; a learned decoder maps symbols to weights through a network.

    ``linear_decoder`` says whether a tensor's chunk decodes to ``chunk_map(index) @ symbols``
    times the row's factor (None: the identity), so that output-aware rounding can choose the
    symbols of a chunk by their effect on the weights (:func:`~.output_aware.linear_latent_symbols`).

    ``portable`` says whether decoding gives the same bits on every machine: true only for a
    decoder without float kernels whose results depend on the CPU (matmuls, transcendental
    functions); a container of a non-portable transform is verified bit for bit only where its
    float output happens to match the writer's.
    """

    kind: str
    portable: bool = False
    has_weight_grid: bool = False
    linear_decoder: bool = False  # decodes a chunk as a linear map of its symbols (:meth:`chunk_map`)

    def encode(self, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, symbols: torch.Tensor, step: float, index: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_all(self, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
        """:meth:`encode` in batches of :data:`DECODE_BATCH` chunks."""
        return torch.cat([self.encode(c, step, index) for c in chunks.split(DECODE_BATCH)])

    @torch.no_grad()
    def decode_weights(self, symbols: torch.Tensor, step: float, index: int, layout: ChunkLayout,
                       scales: torch.Tensor) -> torch.Tensor:
        """The float32 tensor of ``symbols``: decoded chunks, un-chunked and de-scaled."""
        chunks = torch.cat([self.decode(s, step, index) for s in symbols.split(DECODE_BATCH)])
        return from_chunks(chunks, layout, scales)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {}

    def spec(self) -> dict:
        """What the header records of the transform beyond its kind."""
        return {}

    def load_stored_state(self, state: dict[str, torch.Tensor], spec: dict) -> None:
        if state:
            raise ValueError(f"the {self.kind} transform stores no weights, found {sorted(state)}")

    def trainable_decoder(self) -> nn.Module | None:
        return None

    def chunk_map(self, index: int) -> torch.Tensor | None:
        """The float64 matrix tensor ``index``'s chunks decode through, for a linear decoder; None
        where they decode as the identity."""
        return None


class LearnedTransform(Transform):
    """A transform fitted to the model's chunks (:mod:`.fit`): a float encoder, a decoder with
    per-tensor linear maps, and the tensors whose maps are learned and stored (``active_maps``;
    the others keep the identity)."""

    encoder: Analysis
    decoder: nn.Module  # has a per-tensor ``linear`` parameter, called as ``decoder(y, log_step, index)``

    def __init__(self) -> None:
        super().__init__()
        self.active_maps: list[int] = []

    def freeze_inactive_maps(self) -> None:
        """Keep the identity maps of tensors without a stored map out of training."""
        mask = torch.zeros(self.decoder.linear.shape[0], 1, 1)
        mask[self.active_maps] = 1
        for maps in (self.encoder.linear, self.decoder.linear):
            maps.register_hook(lambda grad: grad * mask)

    def encode(self, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
        return quantize(self.encoder(chunks, math.log(step), index), step)


class WeightVAE(LearnedTransform):
    """Encoder, decoder and training prior of the learned transform."""

    kind = "vae"

    def __init__(self, chunk_size: int, hidden_size: int, num_tensors: int):
        super().__init__()
        self.encoder = Analysis(chunk_size, hidden_size, num_tensors)
        self.decoder = Synthesis(chunk_size, hidden_size, num_tensors)

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """What the container stores: the MLP and the linear maps of the active tensors only."""
        state = {f"mlp.{k}": v for k, v in self.decoder.mlp.state_dict().items()}
        state["linear"] = self.decoder.linear.detach()[self.active_maps]
        return state

    def load_decoder_state(self, state: dict[str, torch.Tensor], active_maps: list[int]) -> None:
        linear = state.pop("linear")
        if linear.shape != (len(active_maps), *self.decoder.linear.shape[1:]):
            raise ValueError(f"stored linear maps {tuple(linear.shape)} do not match {len(active_maps)} tensors")
        self.decoder.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()}, strict=True)
        with torch.no_grad():
            self.decoder.linear[active_maps] = linear
        self.active_maps = list(active_maps)

    def decode(self, symbols: torch.Tensor, step: float, index: int) -> torch.Tensor:
        return self.decoder(dequantize(symbols, step), math.log(step), index)

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {k: v.to(torch.float16) for k, v in self.decoder_state().items()}

    def spec(self) -> dict:
        return {"linear_maps": self.active_maps}

    def load_stored_state(self, state: dict[str, torch.Tensor], spec: dict) -> None:
        self.load_decoder_state({k: v.float() for k, v in state.items()}, spec["linear_maps"])

    def trainable_decoder(self) -> nn.Module:
        self.freeze_inactive_maps()
        return self.decoder


class PortableVAE(LearnedTransform):
    """The learned transform with a decoder that is exact on every machine.

    The encoder is the float :class:`Analysis` network (it runs only when compressing); the
    decoder is each tensor's linear map alone, stored as an int16 matrix and a power-of-two
    exponent and evaluated in integer arithmetic (:mod:`.format.linear`). While fitting, the
    maps are float parameters (``decoder.linear``); :meth:`quantize_decoder_` fixes them to what
    the container stores, and from then on ``decoder.linear`` is their exact float view.

    Its latents are rounded to integers, or with :meth:`use_lattice_` quantized on a lattice
    (:mod:`.lattice`): the maps then decode the lattice's basis coordinates, and the container
    is the same kind of container, decoded the same way.
    """

    kind = "vae-int"
    portable = True  # integer accumulation, then exact or correctly-rounded IEEE operations only
    linear_decoder = True

    def __init__(self, chunk_size: int, hidden_size: int, num_tensors: int):
        super().__init__()
        self.encoder = Analysis(chunk_size, hidden_size, num_tensors)
        self.decoder = LinearSynthesis(torch.eye(chunk_size).repeat(num_tensors, 1, 1))
        self.maps: dict[int, tuple[np.ndarray, int]] = {}  # tensor -> (int16 matrix, exponent)
        self.latent_quantizer = "scalar"  # :data:`~.lattice.LATENT_QUANTIZERS`: how the encoder quantizes mapped latents

    @torch.no_grad()
    def use_lattice_(self, name: str) -> None:
        """Quantize the latents of every tensor with a map on lattice ``name`` from now on: each
        fitted map ``D`` becomes ``D B`` (``B`` the chunk's lattice basis, :func:`~.lattice.chunk_basis`),
        the map of the lattice point's basis coordinates, stored as any map is."""
        basis = chunk_basis(name, self.decoder.linear.shape[1])
        for t in self.active_maps:
            self.decoder.linear[t] = (self.decoder.linear[t].double() @ basis).float()
        self.latent_quantizer = name
        self.quantize_decoder_()

    @torch.no_grad()
    def quantize_decoder_(self) -> None:
        """Store each active map as int16 and an exponent, and set the float maps to their exact value."""
        self.maps = {}
        for t in self.active_maps:
            matrix, exponent = linear.quantize_matrix(self.decoder.linear[t].double().numpy())
            self._set_map(t, matrix, exponent)

    @torch.no_grad()
    def _set_map(self, t: int, matrix: np.ndarray, exponent: int) -> None:
        self.maps[t] = (matrix, exponent)
        self.decoder.linear[t] = torch.from_numpy(linear.dequantize_matrix(matrix, exponent))

    def chunk_map(self, index: int) -> torch.Tensor | None:
        if index not in self.maps:
            return None
        return torch.from_numpy(linear.dequantize_matrix(*self.maps[index]))

    def symbol_limit(self, index: int) -> int:
        """The largest ``|symbol|`` tensor ``index``'s map decodes exactly (:func:`~.format.linear.symbol_limit`)."""
        return linear.symbol_limit(self.maps[index][0]) if index in self.maps else (1 << 31) - 1

    def keep_maps_(self, indices: set[int]) -> None:
        """Keep only the maps of ``indices``: the other tensors decode as the identity (``auto``'s
        per-tensor choice, which their symbols must have been chosen for)."""
        self.active_maps = [t for t in self.active_maps if t in indices]
        self.maps = {t: m for t, m in self.maps.items() if t in indices}

    def encode(self, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
        """The encoder's symbols (a mapped tensor's on its lattice, :meth:`use_lattice_`), clipped where
        a huge symbol would leave the decoder's exact range."""
        if self.latent_quantizer == "scalar" or index not in self.maps:
            symbols = super().encode(chunks, step, index)
        else:
            latents = self.encoder(chunks, math.log(step), index).detach() / step
            symbols = coordinates(self.latent_quantizer, latents).to(torch.int32)
        limit = self.symbol_limit(index)
        if limit < (1 << 31) - 1:
            symbols.clamp_(-limit, limit)
        return symbols

    def decode(self, symbols: torch.Tensor, step: float, index: int) -> torch.Tensor:
        """Normalised chunks: the exact map output times the step (one float32 multiply)."""
        if index not in self.maps:
            return dequantize(symbols, step)
        return torch.from_numpy(linear.decode_chunks(symbols.numpy(), *self.maps[index])) * step

    @torch.no_grad()
    def decode_weights(self, symbols: torch.Tensor, step: float, index: int, layout: ChunkLayout,
                       scales: torch.Tensor) -> torch.Tensor:
        """The format's integer decode (:func:`~.format.linear.decode_weights`); a tensor without a
        stored map decodes as the identity (:func:`~.format.identity.decode_weights`)."""
        if index not in self.maps:
            return identity.decode_weights(symbols, step, layout, scales)
        return linear.decode_weights(symbols, *self.maps[index], step, layout, scales)

    def stored_state(self) -> dict[str, torch.Tensor]:
        dim = self.decoder.linear.shape[1]
        matrices = [torch.from_numpy(self.maps[t][0]) for t in self.active_maps]
        return {"linear": torch.stack(matrices) if matrices else torch.zeros(0, dim, dim, dtype=torch.int16),
                "exponents": torch.tensor([self.maps[t][1] for t in self.active_maps], dtype=torch.int8)}

    def spec(self) -> dict:
        return {"linear_maps": self.active_maps}

    def load_stored_state(self, state: dict[str, torch.Tensor], spec: dict) -> None:
        """The stored maps, checked: exactly ``linear`` (int16) and ``exponents`` (int8), one per
        listed tensor, the tensors listed once each in increasing order."""
        if set(state) != {"linear", "exponents"}:
            raise ValueError(f"expected stored linear and exponents, found {sorted(state)}")
        active = spec.get("linear_maps")
        num_tensors, dim = self.decoder.linear.shape[:2]
        if (not isinstance(active, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in active)
                or active != sorted(set(active)) or (active and not 0 <= active[0] <= active[-1] < num_tensors)):
            raise ValueError(f"linear_maps {active!r} is not an increasing list of coded tensor indices")
        matrices, exponents = state["linear"], state["exponents"]
        if matrices.dtype != torch.int16 or tuple(matrices.shape) != (len(active), dim, dim):
            raise ValueError(f"stored maps {matrices.dtype} {tuple(matrices.shape)} do not match {len(active)} tensors")
        if exponents.dtype != torch.int8 or tuple(exponents.shape) != (len(active),):
            raise ValueError(f"stored exponents {exponents.dtype} {tuple(exponents.shape)} do not match the maps")
        self.active_maps = list(active)
        for t, matrix, exponent in zip(active, matrices.numpy(), exponents.tolist()):
            linear.check_map(matrix, exponent)
            self._set_map(t, matrix, exponent)

    def trainable_decoder(self) -> nn.Module:
        """The stored maps, frozen: fine-tuning trains the latents against exactly this decoder."""
        return LinearSynthesis(self.decoder.linear, trainable=False)


class IdentityTransform(Transform):
    """The ablation: the same pipeline with no learned transform (plain scalar quantization)."""

    kind = "identity"
    portable = True  # one IEEE multiply per weight: correctly rounded on every machine
    has_weight_grid = True  # symbol * step * row scale

    def encode(self, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
        return quantize(chunks, step)

    def decode(self, symbols: torch.Tensor, step: float, index: int) -> torch.Tensor:
        return dequantize(symbols, step)

    @torch.no_grad()
    def decode_weights(self, symbols: torch.Tensor, step: float, index: int, layout: ChunkLayout,
                       scales: torch.Tensor) -> torch.Tensor:
        """The format's own identity arithmetic (:func:`~.format.identity.decode_weights`)."""
        return identity.decode_weights(symbols, step, layout, scales)


AUTO = "auto"  # a config's transform, not a container's: the portable VAE, each tensor choosing identity or its map


def container_kind(kind: str) -> str:
    """The transform kind a container written with config ``transform=kind`` records."""
    return PortableVAE.kind if kind == AUTO else kind


def transform_class(kind: str) -> type[Transform]:
    """The transform a container's ``transform.kind`` or a config's ``transform`` names (a
    container never names :data:`AUTO`: the reader refuses it)."""
    classes = {cls.kind: cls for cls in (WeightVAE, PortableVAE, IdentityTransform)}
    if container_kind(kind) not in classes:
        raise ValueError(f"unknown transform {kind!r}")
    return classes[container_kind(kind)]


def build_transform(kind: str, chunk_size: int, hidden_size: int, num_tensors: int) -> Transform:
    cls = transform_class(kind)
    return cls(chunk_size, hidden_size, num_tensors) if issubclass(cls, LearnedTransform) else cls()
