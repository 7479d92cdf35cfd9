"""What the codec learns from calibration data, measured once per model and shared by every
compression of it (a rate search compresses one model many times).

- The diagonal Fisher (:mod:`.importance`) sets each tensor's step.
- Per coded layer, the second moment of its inputs, ``H = E[x xᵀ]``: the output error of a weight
  error ``ΔW`` is ``tr(ΔW H ΔWᵀ)``, which is what output-aware rounding (:mod:`.output_aware`)
  minimises and what bias correction (:mod:`.correction`) needs the mean of.
- Per normalisation layer with running statistics, the mean of its inputs on the same batches,
  measured when norm correction first asks (it is off by default): the correction compares them
  with the quantized model's.

Inputs are captured with forward hooks and reduced to ``d x d`` sums as each batch passes: no
activation is kept. Layers are taken in groups whose statistics fit ``max_bytes``, one forward
pass over the batches per group, so memory is bounded by the budget and not by the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .importance import fisher_diagonal

logger = logging.getLogger(__name__)

# Rows of a convolution's unfolded input kept per batch: every spatial position of a large
# feature map adds little information about a d x d moment but costs n * d^2 to accumulate.
MAX_ROWS_PER_BATCH = 2048
MAX_STATISTICS_BYTES = 1 << 30


@dataclass
class LayerInputs:
    """A layer's input moments: ``second`` = E[x xᵀ] (d x d) and ``mean`` = E[x] (d), where x is an
    input row of the layer's weight viewed as (out, d): a feature vector for a linear layer, an
    unfolded patch for a convolution."""

    second: torch.Tensor
    mean: torch.Tensor


@dataclass
class Calibration:
    """Everything measured on calibration data. ``batches`` are kept (they are small: a few
    batches of model inputs) because norm correction reruns them through the quantized model."""

    fisher: dict[str, torch.Tensor]
    layers: dict[str, LayerInputs] = field(default_factory=dict)  # keyed by the weight's name
    batches: list = field(default_factory=list)
    # per layer, output-aware rounding's column order and Cholesky factor: they do not depend on the
    # rate, so :func:`.output_aware.layer_factor` computes them on first use and keeps them here,
    # where every probe of a rate search finds them
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _norm_means: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def norm_means(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-channel input mean of every norm layer of the original ``model`` on the calibration
        batches (by module name), measured on first use and kept."""
        if self._norm_means is None:
            self._norm_means = norm_input_means(model, self.batches, norm_layers(model))
        return self._norm_means


def model_inputs(batch) -> tuple[tuple, dict]:
    """A calibration batch as call arguments. Labels are dropped: the statistics are of the
    inputs the deployed model sees, and without them a detector skips its matching loss."""
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    return (batch,), {}


def output_aware_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The weights (of ``names``, or all) whose output error ``tr(ΔW H ΔWᵀ)`` the codec can
    measure: those of ``nn.Linear`` and of ungrouped, zero-padded ``nn.Conv2d`` (weight name -> module)."""
    wanted = None if names is None else set(names)
    found = {}
    for module_name, module in model.named_modules():
        weight_name = f"{module_name}.weight" if module_name else "weight"
        if wanted is not None and weight_name not in wanted:
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                             and module.padding_mode == "zeros"):
            found[weight_name] = module
    return found


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that normalise with stored running statistics: BatchNorm and look-alikes such as
    frozen batch norms (buffers ``running_mean`` and ``running_var`` of one value per channel)."""
    out = {}
    for name, module in model.named_modules():
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.ndim == 1 \
                and mean.shape == var.shape:
            out[name] = module
    return out


def layer_rows(module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The layer's input as (n, d) rows matching its weight's (out, d) view, at most
    :data:`MAX_ROWS_PER_BATCH` of them (a seeded random subset)."""
    x = x.detach().float()
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):
            raise ValueError(f"string padding {module.padding!r} is not supported")
        x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        x = x.transpose(1, 2)
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) > MAX_ROWS_PER_BATCH:
        rows = rows[torch.randperm(len(rows), generator=generator)[:MAX_ROWS_PER_BATCH]]
    return rows


def _accumulate(model: nn.Module, batches: list, modules: dict[str, nn.Module],
                reduce: Callable[[nn.Module, torch.Tensor], tuple]) -> dict[str, tuple]:
    """Run ``batches`` through ``model`` (eval, no grad) and sum, per module of ``modules``,
    the tuple ``reduce(module, input)`` over batches: statistics without keeping activations."""
    sums: dict[str, tuple] = {}

    def hook(name):
        def record(module, args):
            terms = reduce(module, args[0].detach().float())
            sums[name] = terms if name not in sums else tuple(a + b for a, b in zip(sums[name], terms))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = model_inputs(batch)
                model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sums


def norm_input_means(model: nn.Module, batches: list, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-channel input mean of each module in ``modules`` over ``batches`` (channels are dim 1)."""
    def reduce(_module, x):
        x = x.transpose(0, 1).reshape(x.shape[1], -1)
        return x.sum(1), x.shape[1]

    return {name: total / n for name, (total, n) in _accumulate(model, batches, modules, reduce).items()}


def _groups(layers: dict[str, nn.Module], max_bytes: int) -> list[list[str]]:
    """Consecutive layers whose d x d float32 sums fit ``max_bytes`` together (a layer larger
    than the budget goes alone)."""
    groups, current, size = [], [], 0
    for name, module in layers.items():
        d = module.weight[0].numel()
        cost = 4 * d * d
        if current and size + cost > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += cost
    return groups + ([current] if current else [])


def layer_statistics(model: nn.Module, batches: list, layers: dict[str, nn.Module],
                     max_bytes: int = MAX_STATISTICS_BYTES, progress: bool = False) -> dict[str, LayerInputs]:
    """:class:`LayerInputs` for every layer of ``layers``, one pass over ``batches`` per group."""
    out = {}
    groups = _groups(layers, max_bytes)
    for group in tqdm(groups, desc="input moments", disable=not progress or len(groups) == 1, leave=False):
        generator = torch.Generator().manual_seed(0)

        def reduce(module, x):
            rows = layer_rows(module, x, generator)
            return rows.T @ rows, rows.sum(0), len(rows)

        sums = _accumulate(model, batches, {n: layers[n] for n in group}, reduce)
        out.update({name: LayerInputs(second / n, total / n) for name, (second, total, n) in sums.items()})
    return out


def calibrate(model: nn.Module, batches: Iterable, num_batches: int,
              loss_fn: Callable[[nn.Module, object], tuple[torch.Tensor, int]],
              coded_names: Iterable[str] | None = None, progress: bool = True) -> Calibration:
    """Fisher of the task's ``loss_fn`` (see :func:`~.importance.fisher_diagonal`) and layer input
    moments (of ``coded_names``, or of every eligible layer) from ``num_batches`` batches, which
    are kept for the norm statistics."""
    batches = [b for _, b in zip(range(num_batches), batches)]
    fisher = fisher_diagonal(model, batches, num_batches, loss_fn, progress)
    layers = layer_statistics(model, batches, output_aware_layers(model, coded_names), progress=progress)
    logger.info("calibration: %d batches, input moments of %d layers", len(batches), len(layers))
    return Calibration(fisher, layers, batches)
