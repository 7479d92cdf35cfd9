"""Images made from the model itself, for users with no data at all (``--dataset none``).

Output-aware rounding and the Fisher allocation need inputs that drive a model the way real data
does, and a rate needs a check. Without data both come from the model:

* **BatchNorm statistics (ZeroQ: Cai et al., CVPR 2020; "The Knowledge Within": Haroush et al.,
  CVPR 2020).** Every BatchNorm layer stores the mean and variance of its inputs over the training
  data. Images are optimised, from Gaussian noise, until the per-channel mean and standard deviation
  of each BatchNorm layer's input over the batch match those running statistics:
  ``sum over layers of ||mean_batch - running_mean||_2 + ||std_batch - sqrt(running_var + eps)||_2``.
  This covers CNNs and the BatchNorm backbones of detectors.
* **Patch similarity (PSAQ-ViT: Li et al., ECCV 2022)**, for models without BatchNorm whose blocks
  output token sequences (vision transformers). Nothing stores data statistics there, but real
  images give each block's patch tokens a *diverse* cosine self-similarity (some patches alike, many
  not), while noise or images pushed to one class give a narrow one. The prior maximises the
  differential entropy of each image's pairwise token similarities, estimated by a Gaussian kernel
  density (:func:`similarity_entropy`), averaged over the blocks (:func:`token_blocks` finds them:
  the longest stack of modules that each map a token sequence to one of the same shape).
* **Otherwise** only the smoothness term below (and the targets, if any) shapes the images.

Besides the prior, images may be pulled towards **targets** (:class:`Targets`): classes taken
round-robin for a classifier without BatchNorm (class inversion, as PSAQ-ViT and DeepInversion, Yin
et al., CVPR 2020, do), or sampled boxes for a detector (DIODE, Chawla et al., WACV 2021). Without
BatchNorm statistics the mean absolute difference of neighbouring pixels (total variation) is added
so the images are smooth rather than adversarial noise. The terms are weighted equally; the weights
were not tuned on any model.

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
from typing import Callable

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
PRIOR_PATCH_SIMILARITY = "patch-similarity"
PRIOR_SMOOTHNESS = "smoothness-only"
# Tokens whose pairwise similarities the patch-similarity prior scores per block: all of a small
# ViT's, evenly spaced ones of a large one (ViT-B/16 has 197: 19,306 pairs per image and block would
# hold gigabytes of kernel evaluations for the backward pass). The density is estimated on a grid of
# SIMILARITY_GRID points; both bound memory, neither was tuned on a model.
MAX_SIMILARITY_TOKENS = 64
SIMILARITY_GRID = 64


@dataclass(frozen=True)
class Targets:
    """What images are pulled towards besides the prior: ``loss(model, images, index)`` runs the
    model on a batch of images (``index``: their positions among all the images made, so each gets
    its own fixed target) and returns the loss towards their targets; ``kind`` names them."""

    kind: str
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


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
    targets: str | None = None  # Targets.kind, None: none

    def describe(self) -> dict:
        return dict(prior=self.prior, targets=self.targets, calibration_images=len(self.calibration),
                    check_images=len(self.check),
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


class _PatchSimilarityLoss:
    """PSAQ-ViT's prior: minus the mean over ``blocks`` of the entropy of each image's token
    similarities (:func:`similarity_entropy`), from forward hooks on the blocks' outputs."""

    def __init__(self, blocks: list[nn.Module]):
        self.entropies: list[torch.Tensor] = []
        self.handles = [block.register_forward_hook(self._record) for block in blocks]

    def _record(self, module: nn.Module, args, output) -> None:
        self.entropies.append(similarity_entropy(_first_tensor(output)).mean())

    def take(self) -> torch.Tensor:
        total, self.entropies = -torch.stack(self.entropies).mean(), []
        return total

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def similarity_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """Per image of ``tokens`` (batch, tokens, features), the differential entropy of the cosine
    similarities between its distinct pairs of tokens (at most :data:`MAX_SIMILARITY_TOKENS`, evenly
    spaced).

    The density is a Gaussian kernel estimate with Silverman's bandwidth on :data:`SIMILARITY_GRID`
    points spanning the samples, *binned* (Wand, 1994): each similarity is split linearly between its
    two nearest grid points, and the kernel is applied to the bins, which costs grid x grid rather
    than grid x pairs per image and keeps a gradient for every similarity. The entropy is integrated
    by the trapezoid rule on the grid. Bandwidth and grid carry no gradient: the similarities move,
    the estimator's scale does not. PSAQ-ViT's code uses a fixed bandwidth of 0.01 on 10 points,
    which on a few hundred pairs mostly measures the gaps between samples; Silverman's rule adapts
    to their spread and count.
    """
    count = tokens.shape[1]
    if count > MAX_SIMILARITY_TOKENS:
        tokens = tokens[:, torch.linspace(0, count - 1, MAX_SIMILARITY_TOKENS).round().long()]
        count = MAX_SIMILARITY_TOKENS
    unit = F.normalize(tokens.float(), dim=-1)
    rows, cols = torch.triu_indices(count, count, 1)
    samples = (unit @ unit.transpose(1, 2))[:, rows, cols]  # (batch, pairs)
    with torch.no_grad():
        spread = samples.std(1, keepdim=True).clamp_min(1e-4)
        bandwidth = 1.06 * spread * samples.shape[1] ** -0.2
        low, high = samples.amin(1, keepdim=True) - 3 * bandwidth, samples.amax(1, keepdim=True) + 3 * bandwidth
        grid = low + (high - low) * torch.linspace(0, 1, SIMILARITY_GRID)  # (batch, grid)
        kernel = torch.exp(-0.5 * ((grid.unsqueeze(2) - grid.unsqueeze(1)) / bandwidth.unsqueeze(2)) ** 2)
    position = (samples - low) / (high - low) * (SIMILARITY_GRID - 1)
    left = position.detach().floor().clamp(0, SIMILARITY_GRID - 2)
    right_share = position - left
    bins = torch.zeros_like(grid).scatter_add(1, left.long(), 1 - right_share) \
        .scatter_add(1, left.long() + 1, right_share)
    density = (kernel @ bins.unsqueeze(2)).squeeze(2) / (samples.shape[1] * bandwidth * math.sqrt(2 * math.pi))
    return torch.trapezoid(-density * torch.log(density + 1e-12), grid, dim=1)


def _first_tensor(value) -> torch.Tensor | None:
    """A module's output or first argument as one tensor: itself, or the first tensor of a tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def token_blocks(model: nn.Module, example: torch.Tensor, call) -> list[nn.Module]:
    """The blocks of a transformer, found by running it once on ``example`` (a batch): the children
    of the ``nn.ModuleList`` or ``nn.Sequential`` with the most children that *every* one map a token
    sequence (batch, tokens > 1, features) to one of the same shape, as residual blocks do (first in
    module order on a tie). Empty when no stack qualifies (a CNN's stages map feature maps)."""
    shapes: dict[nn.Module, bool] = {}

    def record(module: nn.Module, args, kwargs, output) -> None:
        x, y = _first_tensor(args) if args else _first_tensor(list(kwargs.values())), _first_tensor(output)
        shapes[module] = (x is not None and y is not None and x.ndim == 3 and x.shape[0] == len(example)
                          and x.shape[1] > 1 and y.shape == x.shape)

    stacks = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m)]
    handles = [child.register_forward_hook(record, with_kwargs=True) for stack in stacks for child in stack]
    try:
        with torch.no_grad():
            call(model, example)
    finally:
        for handle in handles:
            handle.remove()
    qualified = [stack for stack in stacks if all(shapes.get(child, False) for child in stack)]
    return list(max(qualified, key=len)) if qualified else []


def _smoothness(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally and vertically neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def synthesize(model: nn.Module, bounds: tuple[torch.Tensor, torch.Tensor], config: SyntheticConfig,
               targets: Targets | None = None, call=None, progress: bool = True) -> SyntheticImages:
    """Images optimised for ``model`` (see the module docstring), within ``bounds`` (from
    :func:`input_bounds`, each of one image's shape), pulled towards ``targets`` when given;
    ``call(model, x)`` runs the model on a batch (default: ``model(x)``)."""
    call = call or (lambda m, x: m(x))
    start = time.perf_counter()
    low, high = bounds
    total = config.calibration_images + config.check_images
    generator = torch.Generator().manual_seed(config.seed)
    was_training = model.training
    model.eval()
    prior, hooks = _prior(model, low, call)
    batches, first, last = [], [], []
    try:
        starts = range(0, total, config.batch_size)
        for offset in tqdm(starts, desc="synthetic images", disable=not progress, leave=False):
            index = torch.arange(offset, min(offset + config.batch_size, total))
            x, losses = _optimise(model, call, index, bounds, config, generator, prior, hooks, targets)
            batches.append(x)
            first.append(losses[0])
            last.append(losses[-1])
    finally:
        if hooks is not None:
            hooks.close()
        model.train(was_training)
    images = torch.cat(batches)
    order = torch.randperm(total, generator=generator)  # both sets from every batch
    images = images[order]
    seconds = time.perf_counter() - start
    result = SyntheticImages(images[:config.calibration_images], images[config.calibration_images:], prior, seconds,
                             float(sum(first) / len(first)), float(sum(last) / len(last)), config,
                             targets.kind if targets is not None else None)
    logger.info("synthetic images: %s", result.describe())
    return result


def _prior(model: nn.Module, low: torch.Tensor, call) -> tuple[str, _BatchNormLoss | _PatchSimilarityLoss | None]:
    """The strongest prior ``model`` offers (module docstring) and the hooks that compute it."""
    if norm_layers(model):
        return PRIOR_BATCHNORM, _BatchNormLoss(model)
    blocks = token_blocks(model, low.expand(2, *low.shape), call)
    prior = PRIOR_PATCH_SIMILARITY if blocks else PRIOR_SMOOTHNESS
    logger.warning("the model has no BatchNorm statistics: synthetic images follow the %s prior%s, a weaker signal "
                   "of what real inputs look like", prior, f" over {len(blocks)} token blocks" if blocks else "")
    return prior, _PatchSimilarityLoss(blocks) if blocks else None


def _optimise(model: nn.Module, call, index: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor],
              config: SyntheticConfig, generator: torch.Generator, prior: str,
              hooks: _BatchNormLoss | _PatchSimilarityLoss | None,
              targets: Targets | None) -> tuple[torch.Tensor, list[float]]:
    """One batch (images ``index``): Gaussian noise (clamped to the input's range), then
    ``config.steps`` Adam steps on the prior's hooks' loss, the smoothness term (without BatchNorm
    statistics) and the targets' loss."""
    low, high = bounds
    x = torch.randn((len(index), *low.shape), generator=generator).clamp_(low, high).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=config.lr)
    losses = []
    for step in range(config.steps + 1):
        if targets is not None:
            loss = targets.loss(model, x, index)
        else:
            call(model, x)  # the hooks record what the prior needs
            loss = x.new_zeros(())
        if hooks is not None:
            loss = loss + hooks.take()
        if prior != PRIOR_BATCHNORM:
            loss = loss + _smoothness(x)
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


def class_targets(num_classes: int) -> Targets:
    """Cross-entropy towards classes taken round-robin over the images, so every class is represented."""
    return Targets("classes", lambda model, x, index: F.cross_entropy(logits_of(model(x)).float(),
                                                                       index % num_classes))


__all__ = ["PRIOR_BATCHNORM", "PRIOR_PATCH_SIMILARITY", "PRIOR_SMOOTHNESS", "SYNTHETIC_BUDGET_SHARE",
           "SyntheticConfig", "SyntheticImages", "Targets", "class_targets", "input_bounds", "similarity_entropy",
           "synthesize", "token_blocks"]
