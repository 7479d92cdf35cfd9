"""Stage 4: uniform scalar quantization of latents with a per-tensor step.

Training needs two differentiable stand-ins for rounding: additive uniform noise (for the rate,
which must see a density) and straight-through rounding (for the decoder, which must see the
values it will really get).
"""

from __future__ import annotations

import torch


def quantize(latent: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """Integer symbols, ``round(latent / step)``."""
    return torch.round(latent / step).to(torch.int32)


def quantize_rdo(latent_in_steps: torch.Tensor, rate_weight: float, iterations: int = 2) -> torch.Tensor:
    """Rate-distortion optimised rounding: per value, ``round(u)`` or one step toward zero,
    whichever costs less in ``(u - k)**2 + rate_weight * bits(k)``.

    ``bits`` comes from each column's (latent dimension's) own histogram, refitted each
    iteration, the same table the entropy coder will use. This is the dead-zone quantizer an
    entropy-coded codec wants: small values that cost many bits for little distortion go to
    zero. ``rate_weight`` is in squared steps per bit.
    """
    u = latent_in_steps
    nearest = torch.round(u)
    toward_zero = nearest - torch.sign(nearest)
    symbols = nearest
    for _ in range(iterations):
        columns = []
        for j in range(u.shape[1]):
            bits = _column_bits(symbols[:, j])
            keep = (u[:, j] - nearest[:, j]) ** 2 + rate_weight * bits(nearest[:, j])
            shrink = (u[:, j] - toward_zero[:, j]) ** 2 + rate_weight * bits(toward_zero[:, j])
            columns.append(torch.where(shrink < keep, toward_zero[:, j], nearest[:, j]))
        symbols = torch.stack(columns, 1)
    return symbols.to(torch.int32)


def _column_bits(column: torch.Tensor):
    """``k -> -log2 p(k)`` under the column's histogram (add-half smoothed)."""
    lo = int(column.min())
    counts = torch.bincount((column - lo).to(torch.int64)).double() + 0.5
    bits = -torch.log2(counts / counts.sum())
    unseen = float(bits.max()) + 1

    def rate(k: torch.Tensor) -> torch.Tensor:
        index = (k - lo).to(torch.int64)
        inside = (index >= 0) & (index < len(bits))
        return torch.where(inside, bits[index.clamp(0, len(bits) - 1)], unseen).to(k.dtype)

    return rate


def dequantize(symbols: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    return symbols.to(torch.float32) * step


def noisy(latent_in_steps: torch.Tensor) -> torch.Tensor:
    """The training-time relaxation of rounding for the rate term."""
    return latent_in_steps + torch.empty_like(latent_in_steps).uniform_(-0.5, 0.5)


def round_ste(latent_in_steps: torch.Tensor) -> torch.Tensor:
    """Rounding in the forward pass, identity in the backward pass."""
    return latent_in_steps + (torch.round(latent_in_steps) - latent_in_steps).detach()
