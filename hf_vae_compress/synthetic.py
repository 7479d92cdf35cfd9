"""Images made from the model itself, for users with no data at all (``--dataset none``).

Output-aware rounding and the Fisher allocation need inputs that drive a model the way real data
does, and a rate needs a check. Without data both come from the model:

* **BatchNorm statistics (ZeroQ: Cai et al., CVPR 2020; "The Knowledge Within": Haroush et al.,
  CVPR 2020).** Every BatchNorm layer stores the mean and variance of its inputs over the training
  data. Images are optimised, from Gaussian noise, until the per-channel mean and standard deviation
  of each BatchNorm layer's input over the batch match those running statistics:
  ``sum over layers of ||mean_batch - running_mean||_2 + ||std_batch - sqrt(running_var + eps)||_2``.
  This covers CNNs and the BatchNorm backbones of detectors.
* **A prior for models without BatchNorm** (a ViT): nothing stores data statistics, so images are
  inverted towards classes instead ("class inversion with a smoothness prior", after DeepInversion's
  image priors, Yin et al., CVPR 2020): cross-entropy towards a target distribution, plus the mean
  absolute difference of neighbouring pixels (total variation) so the images are smooth rather than
  adversarial noise. The two terms are weighted equally; the weights were not tuned on any model.
  The target is not one class (which drives every image to the model's most confident output, far
  from any decision boundary, where no small weight error flips a prediction and an agreement check
  sees nothing) but a mixture of two classes, after the boundary-supporting samples of Qimera (Choi
  et al., NeurIPS 2021): probability ``p`` on a class taken round-robin (every class is represented),
  ``1 - p`` on another drawn at random, ``p`` drawn uniformly from [1/2, 1]. The images' top-two
  probability margins ``2p - 1`` then spread evenly from the decision boundary to full confidence,
  a prior with no preferred confidence, chosen a priori, not measured on any model.

Images live in the model's input space (after its preprocessing) and are clamped, after every
step, to what the preprocessing can produce: between the preprocessed all-black and all-white
images (:func:`input_bounds`). Everything is seeded: the same model and seed give the same images
on the same machine. The cost is reported (:attr:`SyntheticImages.seconds`).

Agreement on these images is *not* accuracy: they are not drawn from the data the model is used on.
The pipeline holds agreement on them to a smaller budget (:data:`SYNTHETIC_BUDGET_SHARE`) and says so.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .codec.calibration import norm_layers
from .evaluate import logits_of

logger = logging.getLogger(__name__)

# Share of the task's budget that disagreement on synthetic images may use. Synthetic images are not
# the images the model is used on, so how disagreement there relates to the accuracy drop on real
# data is unknown; half the budget is kept in reserve. Chosen a priori (not measured on any model).
SYNTHETIC_BUDGET_SHARE = 0.5
PRIOR_BATCHNORM = "batchnorm-statistics"
PRIOR_CLASS_INVERSION = "class-mixture-inversion-smoothness"
PRIOR_SMOOTHNESS = "smoothness-only"


@dataclass(frozen=True)
class SyntheticConfig:
    """How many images to make and how hard to optimise them.

    ZeroQ calibrates on one batch of 32 images optimised for 500 Adam steps at learning rate 0.5.
    Every step is a forward and a backward pass of the whole model per image, which on two CPU cores
    costs seconds per batch, so the default takes ZeroQ's 32 calibration images, far fewer steps,
    and decays the learning rate to zero over them (a cosine), spending the steps on converging
    rather than oscillating. ``check_images``, made in the same batches but never calibrated on,
    score the rate's agreement with the original. Agreement there must be near-perfect (see
    :data:`SYNTHETIC_BUDGET_SHARE`: one disagreement in 128 already exceeds a quarter point), so more
    check images make the check stricter, at a cost linear in their number.
    """

    calibration_images: int = 32
    check_images: int = 128
    steps: int = 20
    lr: float = 0.5
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_images < 1 or self.check_images < 0 or self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"synthetic images need at least one calibration image, a positive batch and "
                             f"non-negative counts: {self}")


@dataclass
class SyntheticImages:
    """Synthetic model inputs and what they cost: ``calibration`` and ``check`` are disjoint."""

    calibration: torch.Tensor
    check: torch.Tensor
    prior: str
    seconds: float
    loss_start: float
    loss_end: float
    config: SyntheticConfig = field(default_factory=SyntheticConfig)

    def describe(self) -> dict:
        return dict(prior=self.prior, calibration_images=len(self.calibration), check_images=len(self.check),
                    steps=self.config.steps, lr=self.config.lr, seed=self.config.seed, seconds=round(self.seconds, 2),
                    loss_start=self.loss_start, loss_end=self.loss_end)


def input_bounds(black: torch.Tensor, white: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel lower and upper bounds of the model's input, from the preprocessed all-black and
    all-white images (a normalisation may flip their order; both are kept as given shapes)."""
    return torch.minimum(black, white), torch.maximum(black, white)


class _BatchNormLoss:
    """ZeroQ's statistics loss, gathered by forward pre-hooks on every norm layer with running statistics."""

    def __init__(self, model: nn.Module):
        self.terms: list[torch.Tensor] = []
        self.handles = [module.register_forward_pre_hook(self._record) for module in norm_layers(model).values()]

    def _record(self, module: nn.Module, args) -> None:
        x = args[0]
        channels = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean, var = channels.mean(1), channels.var(1, unbiased=False)
        eps = float(getattr(module, "eps", 1e-5))
        std = (var + eps).sqrt()
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean.float())
                          + torch.linalg.vector_norm(std - (module.running_var.float() + eps).sqrt()))

    def take(self) -> torch.Tensor:
        total, self.terms = torch.stack(self.terms).sum(), []
        return total

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _smoothness(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally and vertically neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _mixture_targets(offset: int, size: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Target distributions of images ``offset`` to ``offset + size`` (see the module docstring):
    ``p ~ U[1/2, 1]`` on class ``index mod num_classes``, ``1 - p`` on another class drawn uniformly."""
    first = torch.arange(offset, offset + size) % num_classes
    targets = torch.zeros(size, num_classes)
    if num_classes == 1:
        return targets.fill_(1.0)
    second = (first + torch.randint(1, num_classes, (size,), generator=generator)) % num_classes
    p = 0.5 + 0.5 * torch.rand(size, generator=generator)
    rows = torch.arange(size)
    targets[rows, first] = p
    targets[rows, second] = 1 - p
    return targets


def synthesize(model: nn.Module, bounds: tuple[torch.Tensor, torch.Tensor], config: SyntheticConfig,
               num_classes: int | None, call=None, progress: bool = True) -> SyntheticImages:
    """Images optimised for ``model`` (see the module docstring), within ``bounds`` (from
    :func:`input_bounds`, each of one image's shape). ``num_classes`` (None: not a classifier) lets
    a model without BatchNorm be inverted towards classes; ``call(model, x)`` runs the model on a
    batch (default: ``model(x)``)."""
    call = call or (lambda m, x: m(x))
    start = time.perf_counter()
    low, high = bounds
    total = config.calibration_images + config.check_images
    generator = torch.Generator().manual_seed(config.seed)
    has_norms = bool(norm_layers(model))
    prior = PRIOR_BATCHNORM if has_norms else PRIOR_CLASS_INVERSION if num_classes else PRIOR_SMOOTHNESS
    if not has_norms:
        logger.warning("the model has no BatchNorm statistics: synthetic images follow the %s prior, a weaker "
                       "signal of what real inputs look like", prior)
    was_training = model.training
    model.eval()
    batches, first, last = [], [], []
    statistics = _BatchNormLoss(model) if has_norms else None
    try:
        starts = range(0, total, config.batch_size)
        for offset in tqdm(starts, desc="synthetic images", disable=not progress, leave=False):
            size = min(config.batch_size, total - offset)
            # drawn only where used: BatchNorm images take the seed's stream from its start
            targets = _mixture_targets(offset, size, num_classes, generator) if num_classes and not has_norms else None
            x, losses = _optimise(model, call, size, low, high, config, generator, statistics, targets)
            batches.append(x)
            first.append(losses[0])
            last.append(losses[-1])
    finally:
        if statistics is not None:
            statistics.close()
        model.train(was_training)
    images = torch.cat(batches)
    order = torch.randperm(total, generator=generator)  # both sets from every batch
    images = images[order]
    seconds = time.perf_counter() - start
    result = SyntheticImages(images[:config.calibration_images], images[config.calibration_images:], prior, seconds,
                             float(sum(first) / len(first)), float(sum(last) / len(last)), config)
    logger.info("synthetic images: %s", result.describe())
    return result


def _optimise(model: nn.Module, call, size: int, low: torch.Tensor, high: torch.Tensor, config: SyntheticConfig,
              generator: torch.Generator, statistics: _BatchNormLoss | None,
              targets: torch.Tensor | None) -> tuple[torch.Tensor, list[float]]:
    """One batch: Gaussian noise (clamped to the input's range), then ``config.steps`` Adam steps."""
    x = torch.randn((size, *low.shape), generator=generator).clamp_(low, high).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=config.lr)
    losses = []
    for step in range(config.steps + 1):
        output = call(model, x)
        if statistics is not None:
            loss = statistics.take()
        else:
            loss = _smoothness(x)
            if targets is not None:
                loss = loss + F.cross_entropy(logits_of(output).float(), targets)
        losses.append(float(loss.detach()))
        if step == config.steps:
            break
        for group in optimiser.param_groups:  # cosine decay to zero over the steps
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        (grad,) = torch.autograd.grad(loss, x)
        x.grad = grad
        optimiser.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    return x.detach(), losses


__all__ = ["PRIOR_BATCHNORM", "PRIOR_CLASS_INVERSION", "PRIOR_SMOOTHNESS", "SYNTHETIC_BUDGET_SHARE",
           "SyntheticConfig", "SyntheticImages", "input_bounds", "synthesize"]
