"""Parameter importance: the diagonal Fisher information from a few calibration batches.

The loss whose gradients are squared is the task's (:mod:`hf_vae_compress.tasks` supplies it: a
classifier's sampled-label cross-entropy, a detector's own matching loss), so this module knows
nothing of what a model outputs. Per-weight Fisher values are far too noisy to weight individual
weights (the codec starves weights the net needs); they are used only averaged over a tensor, in
:func:`mean_normalised_fisher`.

Memory is bounded by :data:`ACTIVATION_BYTES`, not by the model or the image size: what a
backward pass holds is the activations its forward saved, per example, so a calibration batch
whose examples would save more is cut into micro-batches that each fit, and their gradients are
summed before the square (the same estimator as one backward of the whole batch).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

# Activation bytes one backward of the Fisher may hold (what its forward saves for the backward,
# measured per example by :func:`saved_bytes_per_example`). A resnet50 at 224 px saves about
# 0.1 GB per example, so a 32-image batch held 3 GB; small images fit a whole batch.
ACTIVATION_BYTES = 512 << 20


def model_inputs(batch) -> tuple[tuple, dict]:
    """A calibration batch as call arguments. Labels are dropped: the statistics are of the
    inputs the deployed model sees, and without them a detector skips its matching loss."""
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    return (batch,), {}


def batch_length(batch) -> int:
    """Examples in a batch: the length of its tensor, or of the first tensor or list of a dict
    (a detector's ``pixel_values``), or of a list."""
    if isinstance(batch, torch.Tensor) and batch.ndim:
        return len(batch)
    if isinstance(batch, (list, tuple)):
        return len(batch)
    for value in batch.values() if isinstance(batch, dict) else ():
        if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim):
            return len(value)
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}")


def split_batch(batch, bounds: list[tuple[int, int]]) -> list:
    """``batch[start:stop]`` for each ``(start, stop)`` of ``bounds``, along the batch dimension:
    a tensor or list as long as the batch is sliced (tensors as views), a dict value by value;
    anything else (a scalar, a tensor of another length) goes whole to every part."""
    length = batch_length(batch)
    return _cut(batch, length, bounds)


def _cut(value, length: int, bounds: list[tuple[int, int]]) -> list:
    if isinstance(value, dict):
        parts = {k: _cut(v, length, bounds) for k, v in value.items()}
        return [{k: parts[k][i] for k in value} for i in range(len(bounds))]
    if (isinstance(value, torch.Tensor) and value.ndim and len(value) == length) or \
            (isinstance(value, (list, tuple)) and len(value) == length):
        return [value[start:stop] for start, stop in bounds]
    return [value] * len(bounds)


def even_bounds(length: int, most: int) -> list[tuple[int, int]]:
    """``length`` examples in as few consecutive parts of at most ``most`` as there can be, of
    near-equal sizes (the first parts one larger)."""
    parts = math.ceil(length / max(1, most))
    small, extra = divmod(length, parts)
    stops = [0]
    for i in range(parts):
        stops.append(stops[-1] + small + (i < extra))
    return list(zip(stops[:-1], stops[1:]))


def saved_bytes_per_example(model: torch.nn.Module, batch) -> int:
    """Bytes the forward of one example (``batch``'s first) saves for its backward: the activation
    memory a backward holds per example. Parameters, which are saved whatever the batch size, are
    not counted, and a storage several saved tensors view is counted once. Measured with the
    model's own forward (not the task's loss, whose sampled labels must not be drawn twice) in
    eval mode, as the Fisher runs it."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    first = _cut(batch, batch_length(batch), [(0, 1)])[0]
    args, kwargs = model_inputs(_copied(first))  # its own storage: a view would count the whole batch's
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    return total


def _copied(value):
    """Tensors of a (nested) batch copied, so that each owns its storage."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value.clone() if isinstance(value, torch.Tensor) else value


def examples_per_backward(model: torch.nn.Module, batch, budget: int = ACTIVATION_BYTES) -> int:
    """How many examples one backward may take within ``budget`` bytes of saved activations
    (at least one)."""
    return max(1, budget // max(1, saved_bytes_per_example(model, batch)))


def fisher_diagonal(model: torch.nn.Module, batches: Iterable, num_batches: int,
                    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, int]],
                    progress: bool = True, per_backward: int | None = None,
                    before_forward: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Squared-gradient accumulators per parameter name, averaged over examples.

    ``batches`` yields model inputs (a tensor, or a dict of keyword arguments); ``loss_fn(model,
    batch) -> (loss, batch_size)`` is the task's loss summed over the batch's examples (the
    square of a summed gradient over the batch size estimates the per-example squared gradient
    when the per-example gradients have zero mean, as a sampled-label loss's do).

    A batch of more than ``per_backward`` examples (None: :func:`examples_per_backward` on the
    first batch) is cut into micro-batches (:func:`split_batch`) whose gradients add up in
    ``p.grad`` before the batch's sum is squared; a batch that fits takes one ``loss_fn`` call,
    as it always did. ``before_forward(examples, batch_examples)``, if given, is called before
    each ``loss_fn`` call (calibration keeps its input moments' rows per batch with it).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    seen = 0
    for i, batch in enumerate(tqdm(batches, total=num_batches, desc="fisher", disable=not progress, leave=False)):
        if i >= num_batches:
            break
        if per_backward is None:
            per_backward = examples_per_backward(model, batch)
        model.zero_grad(set_to_none=True)
        size = _backward(model, batch, loss_fn, per_backward, before_forward)
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.float().pow(2) / size
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if seen == 0:
        raise ValueError("no calibration batches were given")
    return {n: f / seen for n, f in fisher.items()}


def _backward(model: torch.nn.Module, batch, loss_fn: Callable, per_backward: int,
              before_forward: Callable[[int, int], None] | None) -> int:
    """The gradient of ``batch``'s summed loss into ``p.grad``, in backward passes of at most
    ``per_backward`` examples; returns the batch size ``loss_fn`` reported (summed over parts)."""
    length = batch_length(batch)
    parts = [batch] if length <= per_backward else split_batch(batch, even_bounds(length, per_backward))
    size = 0
    for part in parts:
        if before_forward is not None:
            before_forward(batch_length(part), length)
        loss, part_size = loss_fn(model, part)
        loss.backward()
        size += part_size
    return size


def mean_normalised_fisher(fisher: torch.Tensor, scales: torch.Tensor) -> float:
    """Mean Fisher of the normalised weights ``w / scale`` of one tensor (rows = output channels).

    This is the per-tensor sensitivity that sets the tensor's quantization step: an error of
    ``e`` in normalised units costs about ``F * e**2`` in loss.
    """
    rows = fisher.reshape(len(scales), -1)
    return float((rows * scales[:, None].pow(2)).mean())
