"""Fitting the learned transforms (:class:`~.transform.WeightVAE`, :class:`~.transform.PortableVAE`)
to the model's own chunks.

:func:`fit` trains encoder, decoder and a factorised Laplace prior per (tensor, latent
dimension) on distortion + rate at the steps the rate allocation gives, starting each tensor's
linear maps at its KLT; :func:`refine` then fits the decoder to the symbols actually coded. The
prior stands in for the coder's rate only while training: at coding time the entropy coder uses
exact integer histograms of the quantized latents. Fine-tuning (:mod:`.reparam`) trains with
the same prior. A transform without networks (the identity) learns nothing here.

The portable VAE's decoder is linear, so its refinement is a closed form: each map is the
least-squares regression of the tensor's chunks on its coded symbols, then rounded to the int16
map the container stores. Its encoder is not refitted after that rounding: it only chooses
symbols, and whatever it chooses is decoded, and checksummed, through the integer maps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FitConfig
from .quantize import noisy, round_ste
from .transform import LearnedTransform, PortableVAE, Transform

logger = logging.getLogger(__name__)

# High-rate theory: with steps set by equal slopes, distortion in units of the step trades
# against bits at dD/dR = -2 ln2 * step^2 / 12, i.e. this many squared steps per bit.
RATE_WEIGHT = math.log(2) / 6


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel fit: it samples chunks ``rank::world_size`` and
    ``average`` all-reduces a list of gradient tensors in place (mean over processes)."""

    rank: int
    world_size: int
    average: Callable[[list[torch.Tensor]], None]


def fit(transform: Transform, chunks: list[torch.Tensor], steps: list[float], config: FitConfig, seed: int,
        progress: bool = True, shard: Shard | None = None) -> None:
    """Learn ``transform`` on every coded tensor's normalised ``chunks`` at its allocated step."""
    if isinstance(transform, LearnedTransform):
        flat, index, log_steps = training_data(chunks, steps)
        fit_vae(transform, flat, index, log_steps, config.train_steps, config.train_batch_chunks,
                config.learning_rate, seed, progress, shard)
        to_stored_precision_(transform)


def refine(transform: Transform, chunks: list[torch.Tensor], symbols: list[torch.Tensor], steps: list[float],
           config: FitConfig, seed: int, shard: Shard | None = None) -> None:
    """Adapt ``transform``'s decoder to the ``symbols`` actually coded: the float VAE's by training
    (half the fit's steps, at a third of its learning rate), the portable VAE's linear maps by least
    squares (:func:`refit_maps_`; deterministic, so every process of a shard computes the same)."""
    if isinstance(transform, PortableVAE):
        refit_maps_(transform, chunks, symbols, steps)
    elif isinstance(transform, LearnedTransform):
        flat, index, log_steps = training_data(chunks, steps)
        refine_decoder(transform, flat, torch.cat(symbols), index, log_steps, config.train_steps // 2,
                       config.train_batch_chunks, config.learning_rate / 3, seed, shard)
    else:
        return
    to_stored_precision_(transform)


def training_data(chunks: list[torch.Tensor], steps: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All chunks, their tensor index and the per-tensor log steps: a transform's training data."""
    index = torch.cat([torch.full((len(c),), i) for i, c in enumerate(chunks)])
    return torch.cat(chunks), index, torch.tensor([math.log(s) for s in steps])


def laplace_bits(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bits of a unit-width bin centred on ``value`` under a zero-mean Laplace(scale)."""

    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.5 * torch.sign(v) * (1 - torch.exp(-v.abs() / scale))

    prob = (cdf(value + 0.5) - cdf(value - 0.5)).clamp_min(1e-9)
    return -torch.log2(prob)


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


def fit_vae(vae: LearnedTransform, chunks: torch.Tensor, tensor_index: torch.Tensor, log_steps: torch.Tensor,
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


def refine_decoder(vae: LearnedTransform, chunks: torch.Tensor, symbols: torch.Tensor, tensor_index: torch.Tensor,
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


MAP_COST_BITS = 16  # a stored map entry is fp16 (the float VAE) or int16 (the portable one)
RIDGE = 1e-9  # least-squares maps: a ridge (relative to the symbols' energy) towards the fitted map


@torch.no_grad()
def refit_maps_(vae: PortableVAE, chunks: list[torch.Tensor], symbols: list[torch.Tensor], steps: list[float],
                moments: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Each active tensor's map set to the least-squares decoder of its coded symbols.

    With ``Y = symbols * step`` and chunks ``X``, the map ``D`` minimising ``|X - Y D^T|^2`` (the
    tensor's squared error in normalised weights: the fit's distortion) is
    ``D^T = (Y^T Y + r I)^-1 (Y^T X + r D0^T)``; the tiny ridge ``r`` towards the fitted map ``D0``
    only decides the latent dimensions no symbol uses (all zero at low rates). In float64.

    A tensor in ``moments`` (its row scales and its layer's input second moments ``H``, groups x
    d x d) is fitted to its layer's output error instead (:func:`_output_weighted_map`).
    """
    for t in vae.active_maps:
        y = symbols[t].double() * steps[t]
        x = chunks[t].double()
        start = vae.decoder.linear[t].double()
        if moments is not None and t in moments:
            vae.decoder.linear[t] = _output_weighted_map(x, y, *moments[t], start).float()
            continue
        gram = y.T @ y
        ridge = RIDGE * (float(gram.diagonal().sum()) / len(gram) + 1.0)
        solved = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), y.T @ x + ridge * start.T)
        vae.decoder.linear[t] = solved.T.float()


def _output_weighted_map(x: torch.Tensor, y: torch.Tensor, scales: torch.Tensor, h: torch.Tensor,
                         start: torch.Tensor) -> torch.Tensor:
    """The map ``D`` minimising the layer's output error ``tr(dW H dWᵀ)`` (issue 24, item 3) over
    the diagonal blocks of ``H``: chunk ``p`` of row ``r`` (``x``: its normalised weights, ``y``:
    its latents times the step) costs ``scale_r² (x - D y)ᵀ H_pp (x - D y)``; the cross terms
    between chunks, which the map cannot act on one chunk at a time, are left out. The normal
    equations ``sum H_pp D A_p = sum H_pp B_p`` (``A_p = sum_r scale_r² y yᵀ``, ``B_p`` with ``x``)
    are one (c² x c²) system in ``vec(D)``: ``sum A_pᵀ ⊗ H_pp``. Same ridge as the plain fit."""
    groups, d = h.shape[0], h.shape[-1]
    c = x.shape[1]
    blocks = -(-d // c)
    padded = h.new_zeros(groups, blocks * c, blocks * c)
    padded[:, :d, :d] = h
    hb = padded.reshape(groups, blocks, c, blocks, c).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (g, P, c, c)
    weight = (scales.double() ** 2).reshape(groups, -1)
    xg, yg = x.reshape(groups, -1, blocks, c), y.reshape(groups, -1, blocks, c)
    a = torch.einsum("grpi,grpj,gr->gpij", yg, yg, weight)
    b = torch.einsum("grpi,grpj,gr->gpij", xg, yg, weight)
    system = torch.einsum("gpji,gpkl->ikjl", a, hb.double()).reshape(c * c, c * c)
    rhs = torch.einsum("gpkl,gplj->kj", hb.double(), b)
    ridge = RIDGE * (float(system.diagonal().sum()) / len(system) + 1.0)
    solved = torch.linalg.solve(system + ridge * torch.eye(len(system), dtype=system.dtype),
                                (rhs + ridge * start).T.reshape(-1))
    return solved.reshape(c, c).T


def to_stored_precision_(transform: LearnedTransform) -> None:
    """Round the decoder to what the container stores, so encoder and decoder agree bit for bit:
    the portable VAE's maps to int16 and an exponent, the float VAE's parameters to fp16."""
    if isinstance(transform, PortableVAE):
        transform.quantize_decoder_()
    else:
        round_to_fp16_(transform.decoder)


@torch.no_grad()
def init_klt_(vae: LearnedTransform, chunks: torch.Tensor, tensor_index: torch.Tensor) -> list[int]:
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
