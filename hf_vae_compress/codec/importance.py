"""Parameter importance: the diagonal Fisher information from a few calibration batches.

The loss whose gradients are squared is the task's (:mod:`hf_vae_compress.tasks` supplies it: a
classifier's sampled-label cross-entropy, a detector's own matching loss), so this module knows
nothing of what a model outputs. Per-weight Fisher values are far too noisy to weight individual
weights (the codec starves weights the net needs); they are used only averaged over a tensor, in
:func:`mean_normalised_fisher`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm


def fisher_diagonal(model: torch.nn.Module, batches: Iterable, num_batches: int,
                    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, int]],
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Squared-gradient accumulators per parameter name, averaged over examples.

    ``batches`` yields model inputs (a tensor, or a dict of keyword arguments); ``loss_fn(model,
    batch) -> (loss, batch_size)`` is the task's loss summed over the batch's examples (the
    square of a summed gradient over the batch size estimates the per-example squared gradient
    when the per-example gradients have zero mean, as a sampled-label loss's do).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    seen = 0
    for i, batch in enumerate(tqdm(batches, total=num_batches, desc="fisher", disable=not progress, leave=False)):
        if i >= num_batches:
            break
        model.zero_grad(set_to_none=True)
        loss, size = loss_fn(model, batch)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.float().pow(2) / size
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if seen == 0:
        raise ValueError("no calibration batches were given")
    return {n: f / seen for n, f in fisher.items()}


def mean_normalised_fisher(fisher: torch.Tensor, scales: torch.Tensor) -> float:
    """Mean Fisher of the normalised weights ``w / scale`` of one tensor (rows = output channels).

    This is the per-tensor sensitivity that sets the tensor's quantization step: an error of
    ``e`` in normalised units costs about ``F * e**2`` in loss.
    """
    rows = fisher.reshape(len(scales), -1)
    return float((rows * scales[:, None].pow(2)).mean())
