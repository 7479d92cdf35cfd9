"""Parameter importance: the diagonal Fisher information from a few calibration batches.

Labels are sampled from the model's own predictive distribution, so no labels are needed and
the score has zero mean: the square of a batch's summed gradient divided by the batch size is
then an unbiased estimate of the per-example squared gradient. Per-weight Fisher values are far
too noisy to weight individual weights (the codec starves weights the net needs); they are used
only averaged over a tensor, in :func:`mean_normalised_fisher`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def fisher_diagonal(model: torch.nn.Module, batches: Iterable, num_batches: int,
                    loss_fn: Callable | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Squared-gradient accumulators per parameter name, averaged over examples.

    ``batches`` yields model inputs (a tensor, or a dict of keyword arguments). ``loss_fn(model,
    batch)``, when given, replaces the sampled-label classification loss: e.g. a detector's own loss.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    seen = 0
    generator = torch.Generator().manual_seed(0)
    for i, batch in enumerate(tqdm(batches, total=num_batches, desc="fisher", disable=not progress, leave=False)):
        if i >= num_batches:
            break
        model.zero_grad(set_to_none=True)
        if loss_fn is not None:
            loss, size = loss_fn(model, batch)
        else:
            logits = _logits(model(**batch) if isinstance(batch, dict) else model(batch)).float()
            sampled = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator).squeeze(1)
            loss = torch.nn.functional.cross_entropy(logits, sampled, reduction="sum")
            size = logits.shape[0]
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
