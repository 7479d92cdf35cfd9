"""Stage 1: decide which tensors the codec chunks and codes, and which it stores (as coded floats)."""

from __future__ import annotations

import torch

from .config import VAECompressionConfig, excluded


def is_coded(name: str, tensor: torch.Tensor, config: VAECompressionConfig) -> bool:
    """Multi-dimensional floating-point tensors of at least ``min_numel`` values are coded.

    That covers conv and linear weights, attention projections, embeddings and position
    embeddings. Biases, norms and BN statistics are coded with a fine relative precision
    (``vector_mantissa_bits``) and integer buffers stay exact: they are few values, and errors in
    them shift whole channels.
    """
    if not tensor.is_floating_point() or tensor.numel() < config.min_numel:
        return False
    if sum(d > 1 for d in tensor.shape) < 2:
        return False
    return not excluded(name, config.modules_to_not_convert)


def select_tensors(state_dict: dict[str, torch.Tensor], config: VAECompressionConfig) -> tuple[list[str], list[str]]:
    """Names of the coded and of the stored tensors, in state-dict order."""
    coded = [n for n, t in state_dict.items() if is_coded(n, t, config)]
    chosen = set(coded)
    return coded, [n for n in state_dict if n not in chosen]
