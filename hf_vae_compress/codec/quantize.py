"""Stage 4: uniform scalar quantization of latents with a per-tensor step.

Training needs two differentiable stand-ins for rounding: additive uniform noise (for the rate,
which must see a density) and straight-through rounding (for the decoder, which must see the
values it will really get).
"""

from __future__ import annotations

import torch


def quantize(latent: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """Integer symbols, ``round(latent / step)`` (rounded in place: the rate search quantizes every
    coded weight at every probe)."""
    return torch.div(latent, step).round_().to(torch.int32)


def dequantize(symbols: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    return symbols.to(torch.float32) * step


def noisy(latent_in_steps: torch.Tensor) -> torch.Tensor:
    """The training-time relaxation of rounding for the rate term."""
    return latent_in_steps + torch.empty_like(latent_in_steps).uniform_(-0.5, 0.5)


def round_ste(latent_in_steps: torch.Tensor) -> torch.Tensor:
    """Rounding in the forward pass, identity in the backward pass."""
    return latent_in_steps + (torch.round(latent_in_steps) - latent_in_steps).detach()
