"""The weights as a differentiable function of the container's latents, for task fine-tuning.

EPR-style: each coded tensor's integer latents become continuous parameters (in units of the
tensor's step). The forward pass rounds them straight-through and runs them through the same
decoder the container stores, so the weights the network trains with are the weights it will
decode to. The rate is the Laplace prior's bits of the noisy latents. Stored tensors that are
trainable parameters (biases, norm weights) are trained as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fit import laplace_bits, round_to_fp16_
from .format.layout import from_chunks
from .latents import Latents
from .quantize import noisy, round_ste


class LatentParametrization(nn.Module):
    """Trainable latents + decoder + prior + stored parameters; ``forward()`` gives the weights."""

    def __init__(self, latents: Latents, trainable_stored: set[str]):
        super().__init__()
        self.template = latents
        self.latent = nn.ParameterList([nn.Parameter(s.float()) for s in latents.symbols])
        self.log_steps = [math.log(s) for s in latents.steps]
        prior = torch.stack([s.float().abs().mean(0).clamp_min(0.05) for s in latents.symbols])
        self.log_prior_scale = nn.Parameter(prior.log())
        self.decoder = latents.transform.trainable_decoder()  # the encoder is not needed, nor trained
        self.stored_names = [n for n in latents.stored if n in trainable_stored]
        self.stored = nn.ParameterList([nn.Parameter(latents.stored[n].float()) for n in self.stored_names])

    def forward(self) -> dict[str, torch.Tensor]:
        weights = {}
        for i, c in enumerate(self.template.coded):
            step = math.exp(self.log_steps[i])
            y = round_ste(self.latent[i]) * step
            x = self.decoder(y, self.log_steps[i], i) if self.decoder is not None else y
            weights[c.name] = from_chunks(x, c.layout, c.scales)
        weights.update(zip(self.stored_names, self.stored))
        return weights

    def rate_bits(self) -> torch.Tensor:
        """Estimated bits of all latents under the training prior (differentiable)."""
        scales = self.log_prior_scale.exp()
        return sum(laplace_bits(noisy(y), scales[i]).sum() for i, y in enumerate(self.latent))

    @torch.no_grad()
    def to_latents(self) -> Latents:
        """Round back to integer latents (and stored tensors to their storage dtype)."""
        if self.decoder is not None:
            round_to_fp16_(self.decoder)
        t = self.template
        stored = dict(t.stored)
        for name, value in zip(self.stored_names, self.stored):
            stored[name] = value.detach().to(t.stored[name].dtype)
        symbols = [torch.round(y.detach()).to(torch.int32) for y in self.latent]
        return Latents(t.reference, t.coded, symbols, t.steps, stored, t.transform, t.config, t.fp32_bytes)
