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

During training a factorised Laplace prior per (tensor, latent dimension) gives the rate; at
coding time the entropy coder uses exact integer histograms of the quantized latents instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .format import identity
from .format.layout import ChunkLayout, from_chunks
from .quantize import dequantize, noisy, quantize, round_ste

logger = logging.getLogger(__name__)

DECODE_BATCH = 1 << 18  # chunks per network call: bounds peak memory on large tensors

# High-rate theory: with steps set by equal slopes, distortion in units of the step trades
# against bits at dD/dR = -2 ln2 * step^2 / 12, i.e. this many squared steps per bit.
RATE_WEIGHT = math.log(2) / 6


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
    the steps). ``fit``/``refine`` learn whatever the transform learns (nothing for the identity);
    ``stored_state``/``spec`` are what the container keeps of it, ``load_stored_state`` reads it
    back; ``trainable_decoder`` is the network fine-tuning trains, if any.

    ``portable`` says whether decoding gives the same bits on every machine: true only for a
    decoder without float kernels whose results depend on the CPU (matmuls, transcendental
    functions); a container of a non-portable transform is verified bit for bit only where its
    float output happens to match the writer's.
    """

    kind: str
    portable: bool = False

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

    def fit(self, chunks: torch.Tensor, index: torch.Tensor, log_steps: torch.Tensor, config,
            progress: bool, shard: "Shard | None") -> None:
        """Learn the transform on all coded chunks at the allocated steps (nothing to learn by default)."""

    def refine(self, chunks: torch.Tensor, symbols: torch.Tensor, index: torch.Tensor, log_steps: torch.Tensor,
               config, shard: "Shard | None") -> None:
        """Adapt the decoder to the symbols actually coded (nothing to adapt by default)."""

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

    def fit(self, chunks, index, log_steps, config, progress, shard) -> None:
        fit_vae(self, chunks, index, log_steps, config.train_steps, config.train_batch_chunks,
                config.learning_rate, config.seed, progress, shard)
        round_to_fp16_(self.decoder)

    def refine(self, chunks, symbols, index, log_steps, config, shard) -> None:
        refine_decoder(self, chunks, symbols, index, log_steps, config.train_steps // 2,
                       config.train_batch_chunks, config.learning_rate / 3, config.seed, shard)
        round_to_fp16_(self.decoder)

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


def laplace_bits(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bits of a unit-width bin centred on ``value`` under a zero-mean Laplace(scale)."""

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.5 * torch.sign(v) * (1 - torch.exp(-v.abs() / scale))

    prob = (cdf(value + 0.5) - cdf(value - 0.5)).clamp_min(1e-9)
    return -torch.log2(prob)


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel fit: it samples chunks ``rank::world_size`` and
    ``average`` all-reduces a list of gradient tensors in place (mean over processes)."""

    rank: int
    world_size: int
    average: Callable[[list[torch.Tensor]], None]


def _optimise(params: list[torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor], num_chunks: int,
              steps: int, batch_size: int, learning_rate: float, generator: torch.Generator,
              shard: Shard | None, progress: bool, desc: str) -> list[float]:
    """Adam with a cosine schedule over random batches of chunk indices (this process's shard)."""
    rank, world = (shard.rank, shard.world_size) if shard else (0, 1)
    pool = torch.arange(rank, num_chunks, world)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        loss = loss_of(pool[torch.randint(0, len(pool), (batch_size,), generator=generator)])
        optimizer.zero_grad()
        loss.backward()
        if shard is not None:
            shard.average([p.grad for p in params if p.grad is not None])
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def fit_vae(vae: WeightVAE, chunks: torch.Tensor, tensor_index: torch.Tensor, log_steps: torch.Tensor,
            steps: int, batch_size: int, learning_rate: float, seed: int, progress: bool = True,
            shard: Shard | None = None) -> list[float]:
    """Train encoder, decoder and prior on distortion (in squared steps) + RATE_WEIGHT * bits.

    ``log_steps`` are per-tensor steps at the rate being targeted; each sample's step is jittered
    by up to one octave either way so the step-conditioned networks work across the rate search.
    With a ``shard``, each process draws its batches from its own slice of the chunks and the
    gradients are averaged, so every process ends with the same networks.
    Returns the loss per step.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + (shard.rank if shard else 0))
    num_tensors, dim = len(log_steps), chunks.shape[1]
    vae.active_maps = init_klt_(vae, chunks, tensor_index)
    vae.freeze_inactive_maps()
    init_scale = torch.stack([chunks[tensor_index == t].abs().mean(0) for t in range(num_tensors)])
    log_prior_scale = nn.Parameter(init_scale.clamp_min(1e-3).log())

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x, t = chunks[idx], tensor_index[idx]
        log_step = log_steps[t] + (torch.rand(len(idx), generator=generator) * 2 - 1) * math.log(2)
        step = log_step.exp()[:, None]
        latent_in_steps = vae.encoder(x, log_step, t) / step
        x_hat = vae.decoder(round_ste(latent_in_steps) * step, log_step, t)
        distortion = ((x - x_hat) / step).pow(2).sum(1)
        bits = laplace_bits(noisy(latent_in_steps), log_prior_scale[t].exp() / step).sum(1)
        return (distortion + RATE_WEIGHT * bits).mean() / dim

    losses = _optimise([*vae.parameters(), log_prior_scale], loss_of, len(chunks), steps, batch_size,
                       learning_rate, generator, shard, progress, "fit VAE")
    logger.info("VAE fit: loss %.4f -> %.4f over %d steps", losses[0], losses[-1], steps)
    return losses


def refine_decoder(vae: WeightVAE, chunks: torch.Tensor, symbols: torch.Tensor, tensor_index: torch.Tensor,
                   log_steps: torch.Tensor, steps: int, batch_size: int, learning_rate: float, seed: int,
                   shard: Shard | None = None) -> None:
    """Fit the decoder to the symbols the encoder actually produced: training saw uniform noise
    and jittered steps, coding sees hard rounding at one step per tensor. A regression of chunks on
    symbols, in squared steps; the rate is fixed, so this only lowers distortion.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + (shard.rank if shard else 0) + 7)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        t = tensor_index[idx]
        step = log_steps[t].exp()[:, None]
        x_hat = vae.decoder(symbols[idx].float() * step, log_steps[t], t)
        return ((chunks[idx] - x_hat) / step).pow(2).mean()

    _optimise(list(vae.decoder.parameters()), loss_of, len(chunks), steps, batch_size, learning_rate, generator,
              shard, False, "refine decoder")


MAP_COST_BITS = 16  # a stored map entry is fp16


@torch.no_grad()
def init_klt_(vae: WeightVAE, chunks: torch.Tensor, tensor_index: torch.Tensor) -> list[int]:
    """Start each tensor's linear maps at its KLT (the eigenbasis of its chunk covariance).

    An orthonormal basis keeps squared error unchanged while compacting energy into fewer latent
    dimensions: the coding gain a linear transform can give, ``numel * 0.5 * log2(AM/GM)`` bits
    of the covariance eigenvalues at high rate. A tensor keeps a (stored) map only when that gain
    is at least twice the map's cost; the others keep the identity, untrained and not stored.
    Returns the indices of the tensors that keep a map.
    """
    dim = chunks.shape[1]
    active = []
    for t in range(vae.encoder.linear.shape[0]):
        x = chunks[tensor_index == t]
        if len(x) <= dim:
            continue
        values, vectors = torch.linalg.eigh(x.T @ x / len(x))
        values = values.clamp_min(1e-12)
        gain_bits = x.numel() * 0.5 * float(torch.log2(values.mean() / values.log().mean().exp()))
        if gain_bits < 2 * MAP_COST_BITS * dim * dim:
            continue
        basis = vectors.flip(1)  # largest variance first
        vae.encoder.linear[t] = basis.T
        vae.decoder.linear[t] = basis
        active.append(t)
    return active


def round_to_fp16_(module: nn.Module) -> None:
    """Round parameters to what the container stores, so encoder and decoder agree bit for bit."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).float())
