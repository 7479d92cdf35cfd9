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

This module holds the interface and the networks; fitting them (the KLT start, the training
loops, the Laplace prior that stands in for the coder's rate while training) is :mod:`.fit`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .format import identity
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

    ``portable`` says whether decoding gives the same bits on every machine: true only for a
    decoder without float kernels whose results depend on the CPU (matmuls, transcendental
    functions); a container of a non-portable transform is verified bit for bit only where its
    float output happens to match the writer's.
    """

    kind: str
    portable: bool = False
    has_weight_grid: bool = False

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


class WeightVAE(Transform):
    """Encoder, decoder and training prior of the learned transform."""

    kind = "vae"

    def __init__(self, chunk_size: int, hidden_size: int, num_tensors: int):
        super().__init__()
        self.encoder = Analysis(chunk_size, hidden_size, num_tensors)
        self.decoder = Synthesis(chunk_size, hidden_size, num_tensors)
        self.active_maps: list[int] = []  # tensors whose linear maps are learned and stored

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """What the container stores: the MLP and the linear maps of the active tensors only."""
        state = {f"mlp.{k}": v for k, v in self.decoder.mlp.state_dict().items()}
        state["linear"] = self.decoder.linear.detach()[self.active_maps]
        return state

    def freeze_inactive_maps(self) -> None:
        """Keep the identity maps of tensors without a stored map out of training."""
        mask = torch.zeros(self.decoder.linear.shape[0], 1, 1)
        mask[self.active_maps] = 1
        for linear in (self.encoder.linear, self.decoder.linear):
            linear.register_hook(lambda grad: grad * mask)

    def load_decoder_state(self, state: dict[str, torch.Tensor], active_maps: list[int]) -> None:
        linear = state.pop("linear")
        if linear.shape != (len(active_maps), *self.decoder.linear.shape[1:]):
            raise ValueError(f"stored linear maps {tuple(linear.shape)} do not match {len(active_maps)} tensors")
        self.decoder.mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()}, strict=True)
        with torch.no_grad():
            self.decoder.linear[active_maps] = linear
        self.active_maps = list(active_maps)

    def encode(self, chunks: torch.Tensor, step: float, index: int) -> torch.Tensor:
        return quantize(self.encoder(chunks, math.log(step), index), step)

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


def transform_class(kind: str) -> type[Transform]:
    """The transform a container's ``transform.kind`` names."""
    classes = {cls.kind: cls for cls in (WeightVAE, IdentityTransform)}
    if kind not in classes:
        raise ValueError(f"unknown transform {kind!r}")
    return classes[kind]


def build_transform(kind: str, chunk_size: int, hidden_size: int, num_tensors: int) -> Transform:
    cls = transform_class(kind)
    return cls(chunk_size, hidden_size, num_tensors) if cls is WeightVAE else cls()
