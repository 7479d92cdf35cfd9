"""What the codec learns from calibration data, measured once per model and shared by every
compression of it (a rate search compresses one model many times).

- The diagonal Fisher (:mod:`.importance`) sets each tensor's step.
- Per coded layer, the second moment of its inputs, ``H = E[x xᵀ]``: the output error of a weight
  error ``ΔW`` is ``tr(ΔW H ΔWᵀ)``, which is what output-aware rounding (:mod:`.output_aware`)
  minimises and what bias correction (:mod:`.correction`) needs the mean of. A grouped
  convolution's output rows each see only their group's input channels, so it gets one ``H`` per
  group (depthwise: one per channel), each over that group's patch. A transposed convolution is
  measured as the direct convolution it equals (its input spread out by the stride and padded,
  its kernel flipped and its channel axes swapped: :func:`as_rows`).
- Per normalisation layer with running statistics, the mean of its inputs on the same batches,
  measured when norm correction first asks (it is off by default): the correction compares them
  with the quantized model's.

Inputs are captured with forward hooks and reduced to ``groups x d x d`` sums as each batch
passes: no activation is kept. Layers are measured in passes over the batches, as many layers per
pass as their statistics fit ``max_bytes``, so memory is bounded by the budget and not by the model.
The first pass is the Fisher's own forward pass (a forward of a large model on a few hundred
images takes minutes on a CPU); only layers beyond the budget cost passes of their own. The Fisher's
backward passes are bounded the same way, by :data:`~.importance.ACTIVATION_BYTES` of activations:
a batch that does not fit goes through in micro-batches, each keeping its share of the batch's rows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .importance import ACTIVATION_BYTES, even_bounds, examples_per_backward, fisher_diagonal, model_inputs

logger = logging.getLogger(__name__)

# Rows of a convolution's unfolded input kept per batch: every spatial position of a large
# feature map adds little information about a d x d moment but costs n * d^2 to accumulate.
MAX_ROWS_PER_BATCH = 2048
MAX_STATISTICS_BYTES = 1 << 30
# Columns per block of :func:`add_gram`'s products: wide enough that each is an efficient matrix product.
GRAM_BLOCK = 512
# Measured as the direct convolutions they equal (:func:`as_rows`, :func:`layer_rows`).
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)


@dataclass
class LayerInputs:
    """A layer's input moments per group of its output rows: ``second[g]`` = E[x xᵀ] (d x d) and
    ``mean[g]`` = E[x] (d), where x is what the rows of group g multiply when the weight is viewed as
    (out, d): a feature vector for a linear layer, an unfolded patch of the group's input channels
    for a convolution. Output rows ``g * out/groups`` to ``(g+1) * out/groups`` belong to group g
    (PyTorch's grouped convolution); an ungrouped layer has one group."""

    second: torch.Tensor | None  # (groups, d, d); None once a single-use calibration has factored it
    mean: torch.Tensor  # (groups, d)
    transposed: bool = False  # a transposed convolution's: its rows are :func:`as_rows`'s, not the stored weight's

    @property
    def groups(self) -> int:
        return len(self.mean)

    @property
    def entries(self) -> int:
        """groups x d x d: the size of the second moment, and of the GPTQ factor made from it."""
        return self.mean.numel() * self.mean.shape[-1]


@dataclass
class Calibration:
    """Everything measured on calibration data. ``batches`` are kept (a few batches of model
    inputs; a sequence that makes each batch when it is taken, such as the tasks' 8-bit images,
    is kept as it is, not as floats) because norm correction reruns them through the quantized model."""

    fisher: dict[str, torch.Tensor]
    layers: dict[str, LayerInputs] = field(default_factory=dict)  # keyed by the weight's name
    batches: Sequence = field(default_factory=list)
    # per layer, output-aware rounding's column order and Cholesky factor: they do not depend on the
    # rate, so :func:`.output_aware.layer_factor` computes them on first use and keeps them here,
    # where every probe of a rate search finds them
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    # True where no later compression will use it (a fixed rate compresses once): the identity's
    # output-aware rounding then drops each layer's second moment once its factor is made (nothing
    # reads it again; its re-aim reuses the factor), so the factors and the moments, 0.46 GB each on
    # resnet50, are not held together
    single_use: bool = False
    # wall seconds of the measurements, by stage ("fisher", "moments": the moments' share of the
    # Fisher's forward pass and their own passes), for the caller's timing report
    seconds: dict[str, float] = field(default_factory=dict)
    _norm_means: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def norm_means(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-channel input mean of every norm layer of the original ``model`` on the calibration
        batches (by module name), measured on first use and kept."""
        if self._norm_means is None:
            self._norm_means = norm_input_means(model, self.batches, norm_layers(model))
        return self._norm_means


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[g] @ b[g]`` for every group g. One group goes through the plain matrix product, not a
    batched one (whose kernel may sum in another order): ungrouped layers then get the same bits,
    and so the same symbols, as before grouped layers were measured."""
    return (a[0] @ b[0]).unsqueeze(0) if len(a) == 1 else a @ b


def output_aware_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The weights (of ``names``, or all) whose output error ``tr(ΔW H ΔWᵀ)`` the codec can
    measure: those of ``nn.Linear``, of zero-padded ``nn.Conv1d`` and ``nn.Conv2d``, grouped
    and depthwise ones included, and of ungrouped ``nn.ConvTranspose1d`` and ``nn.ConvTranspose2d``
    (weight name -> module).

    Not measured: grouped transposed convolutions, embeddings (a one-hot input: ``H`` is diagonal
    and output-aware rounding would be nearest rounding), and convolutions that pad by reflection
    or replication or with ``padding="same"`` (their patches are not what :func:`layer_rows` cuts):
    those round to nearest. A transposed convolution called with ``output_size`` is measured as if
    without: the output rows that this adds at the bottom and right are not in its statistics."""
    wanted = None if names is None else set(names)
    found = {}
    for module_name, module in model.named_modules():
        weight_name = f"{module_name}.weight" if module_name else "weight"
        if wanted is not None and weight_name not in wanted:
            continue
        direct = isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str)
        if isinstance(module, nn.Linear) or direct or (isinstance(module, TRANSPOSED) and module.groups == 1):
            found[weight_name] = module
    return found



def input_groups(module: nn.Module) -> int:
    """How many groups of output rows see distinct inputs: a convolution's ``groups``, else 1."""
    return module.groups if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1


def as_rows(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``weight`` as the (out, d) rows that multiply :func:`layer_rows`'s inputs: the stored rows
    for a linear layer or a convolution. A transposed convolution's (in, out, *kernel) weight is
    the weight of the direct convolution it equals, (out, in, *kernel) with the kernel flipped."""
    if not transposed:
        return weight.reshape(len(weight), -1)
    spatial = tuple(range(2, weight.ndim))
    return weight.flip(spatial).transpose(0, 1).reshape(weight.shape[1], -1)


def from_rows(rows: torch.Tensor, shape: torch.Size, transposed: bool = False) -> torch.Tensor:
    """The inverse of :func:`as_rows`: ``rows`` in the stored weight's ``shape``."""
    if not transposed:
        return rows.reshape(shape)
    spatial = tuple(range(2, len(shape)))
    return rows.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).flip(spatial)


def input_size(module: nn.Module) -> int:
    """d: the length of a row of :func:`as_rows` (a group's, for a grouped convolution)."""
    if isinstance(module, TRANSPOSED):
        return module.weight.shape[0] * module.weight[0, 0].numel()
    return module.weight[0].numel()


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


def layer_rows(module: nn.Module, x: torch.Tensor, generator: torch.Generator,
               max_rows: int = MAX_ROWS_PER_BATCH) -> torch.Tensor:
    """The layer's input as (n, groups * d) rows, at most ``max_rows`` of them (a seeded random
    subset). Columns ``g * d`` to ``(g+1) * d`` are what group g's rows of the
    weight, viewed as (out, d), multiply: a patch is ordered by input channel, then kernel row and
    column (as ``unfold`` orders it), and a group's channels are consecutive. A 1-D convolution is
    cut as a 2-D one of height 1, and a transposed convolution as the direct one it equals
    (:func:`_direct_input`)."""
    x = x.detach().float()
    if isinstance(module, TRANSPOSED):
        return _patches(*_direct_input(module, x), generator, max_rows)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        rows = x.reshape(-1, x.shape[-1])
        return rows[_sampled(len(rows), generator, max_rows)] if len(rows) > max_rows else rows
    if isinstance(module.padding, str):
        raise ValueError(f"string padding {module.padding!r} is not supported")
    geometry = module.kernel_size, module.dilation, module.padding, module.stride
    if isinstance(module, nn.Conv1d):  # a 2-D convolution of height 1
        (kernel,), (dilation,), (padding,), (stride,) = geometry
        x, geometry = x.unsqueeze(-2), ((1, kernel), (1, dilation), (0, padding), (1, stride))
    return _patches(x if x.ndim == 4 else x.unsqueeze(0), *geometry, generator, max_rows)


def _direct_input(module: nn.Module, x: torch.Tensor) -> tuple:
    """A transposed convolution's input ``x`` as the input of the direct convolution it equals
    (stride 1, no padding, the same dilation, the kernel of :func:`as_rows`), with that geometry:
    ``x`` spread out by the stride (stride - 1 zeros between its pixels) and padded by
    ``dilation * (kernel - 1) - padding`` on each side, plus ``output_padding`` after (a negative
    pad crops). A 1-D one is cut as a 2-D one of height 1."""
    kernel, dilation, padding = module.kernel_size, module.dilation, module.padding
    stride, extra = module.stride, module.output_padding
    if isinstance(module, nn.ConvTranspose1d):
        x = x.unsqueeze(-2)
        kernel, dilation, stride = ((1, *v) for v in (kernel, dilation, stride))
        padding, extra = ((0, *v) for v in (padding, extra))
    x = x if x.ndim == 4 else x.unsqueeze(0)
    batch, channels, height, width = x.shape
    spread = x.new_zeros(batch, channels, (height - 1) * stride[0] + 1, (width - 1) * stride[1] + 1)
    spread[:, :, ::stride[0], ::stride[1]] = x
    before = [dl * (k - 1) - p for k, dl, p in zip(kernel, dilation, padding)]
    spread = nn.functional.pad(spread, (before[1], before[1] + extra[1], before[0], before[0] + extra[0]))
    return spread, tuple(kernel), tuple(dilation), (0, 0), (1, 1)


def _sampled(count: int, generator: torch.Generator, max_rows: int) -> torch.Tensor:
    return torch.randperm(count, generator=generator)[:max_rows]


def _patches(x: torch.Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple,
             generator: torch.Generator, max_rows: int) -> torch.Tensor:
    """The rows of ``unfold(x)`` (one patch per image and output position, in that order), or the
    seeded random subset of them that :func:`layer_rows` keeps, cut out of ``x`` directly: unfolding
    a whole early feature map to keep a few thousand of its patches took most of a resnet50
    calibration's time."""
    batch, channels, height, width = x.shape
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    count = batch * out_h * out_w
    index = _sampled(count, generator, max_rows) if count > max_rows else torch.arange(count)
    image, position = index // (out_h * out_w), index % (out_h * out_w)
    top = (position // out_w * sh)[:, None] + torch.arange(kh) * dh  # padded coordinates, (rows, kh)
    left = (position % out_w * sw)[:, None] + torch.arange(kw) * dw  # (rows, kw)
    if kh * kw == 1:  # one pixel per row, gathered from the map as it is
        if ph or pw:
            x = nn.functional.pad(x, (pw, pw, ph, ph))
        patches = x[image[:, None], torch.arange(channels)[None, :], top, left]
    else:  # from a channels-last copy, where a kernel position's channels are contiguous: 2-3.5x as fast (dev)
        x = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()
        patches = x[image[:, None, None], top[:, :, None], left[:, None, :]].permute(0, 3, 1, 2)
    return patches.reshape(len(index), -1)


class _Recorder:
    """Forward pre-hooks that keep, per module of ``modules``, sums over every call while they are
    attached (:meth:`attached`): ``reduce(module, input, sums)`` returns the module's sums with the
    input's added (``sums`` is None at the first call), so statistics are gathered without keeping
    activations, whichever forward passes run meanwhile. ``seconds`` is the time spent in them."""

    def __init__(self, modules: dict[str, nn.Module], reduce: Callable[[nn.Module, torch.Tensor, tuple | None], tuple]):
        self.modules, self.reduce = modules, reduce
        self.sums: dict[str, tuple] = {}
        self.seconds = 0.0

    def _hook(self, name: str):
        def record(module, args):
            start = time.perf_counter()
            with torch.no_grad():
                self.sums[name] = self.reduce(module, args[0].detach().float(), self.sums.get(name))
            self.seconds += time.perf_counter() - start
        return record

    @contextmanager
    def attached(self) -> Iterator["_Recorder"]:
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _summed(sums: tuple | None, terms: tuple) -> tuple:
    """``sums + terms`` term by term (``terms`` at first), tensors in place."""
    if sums is None:
        return terms
    return tuple(a.add_(b) if isinstance(a, torch.Tensor) else a + b for a, b in zip(sums, terms))


def _run(model: nn.Module, batches: list, desc: str, progress: bool) -> None:
    """Every batch through ``model`` in eval mode, without gradients (for the hooks attached to it)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                args, kwargs = model_inputs(batch)
                model(*args, **kwargs)
    finally:
        model.train(was_training)


def _accumulate(model: nn.Module, batches: list, modules: dict[str, nn.Module],
                reduce: Callable[[nn.Module, torch.Tensor], tuple]) -> dict[str, tuple]:
    """Run ``batches`` through ``model`` (eval, no grad) and sum, per module of ``modules``,
    the tuple ``reduce(module, input)`` over batches."""
    with _Recorder(modules, lambda module, x, sums: _summed(sums, reduce(module, x))).attached() as recorder:
        _run(model, batches, "", progress=False)
    return recorder.sums


def norm_input_means(model: nn.Module, batches: list, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-channel input mean of each module in ``modules`` over ``batches`` (channels are dim 1)."""
    def reduce(_module, x):
        x = x.transpose(0, 1).reshape(x.shape[1], -1)
        return x.sum(1), x.shape[1]

    return {name: total / n for name, (total, n) in _accumulate(model, batches, modules, reduce).items()}


def _passes(layers: dict[str, nn.Module], max_bytes: int) -> list[list[str]]:
    """Consecutive layers whose groups x d x d float32 sums fit ``max_bytes`` together (a layer
    larger than the budget goes alone). A grouped layer's sums are never larger than an ungrouped
    one's with the same input channels: groups * d² = (in * kernel) * d."""
    passes, current, size = [], [], 0
    for name, module in layers.items():
        d = input_size(module)
        cost = 4 * input_groups(module) * d * d
        if current and size + cost > max_bytes:
            passes.append(current)
            current, size = [], 0
        current.append(name)
        size += cost
    return passes + ([current] if current else [])


def _moments(module: nn.Module, sums: tuple | None, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``sums`` plus, per group, the sums of x xᵀ (groups x d x d) and of x (groups x d) over
    ``rows``, and their count (all zero when ``sums`` is None), added in place. An ungrouped layer's
    x xᵀ is added by :func:`add_gram`: its blocks above the diagonal wait for :func:`mirror_gram`."""
    groups = input_groups(module)
    if groups == 1:
        second = add_gram(None if sums is None else sums[0][0], rows)[None]
        return (second,) + _summed(None if sums is None else sums[1:], (rows.sum(0)[None], len(rows)))
    per_group = rows.reshape(len(rows), groups, -1).transpose(0, 1)
    terms = grouped_matmul(per_group.transpose(1, 2), per_group), rows.sum(0).reshape(groups, -1), len(rows)
    return _summed(sums, terms)


def add_gram(total: torch.Tensor | None, rows: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``total + rowsᵀ rows`` (d x d; a new sum when ``total`` is None), added in place and by
    column blocks of ``block``: only each block's products with itself and the columns after it,
    the blocks on and below the diagonal. The sum is symmetric, so :func:`mirror_gram` copies the
    rest once the last rows are in. This saves up to half of the products, and the d x d product
    of every (micro-)batch and its addition: these products are most of a large layer's moments
    (dev, resnet50 at 224 px: 2.0 s of each 32-image batch, against 0.7 s for cutting out the rows
    before :func:`_patches` gathered from a channels-last copy). Each entry is still one dot
    product of two columns over the rows, added to the sum, as with the plain product."""
    d = rows.shape[1]
    total = torch.zeros(d, d, dtype=rows.dtype) if total is None else total
    for start, stop in even_bounds(d, block):  # no thin last block, which a matrix-vector kernel would sum otherwise
        total[start:, start:stop].add_(rows[:, start:].T @ rows[:, start:stop])
    return total


def mirror_gram(total: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``total`` (d x d, of :func:`add_gram`) with its blocks above the diagonal copied, in place, from below."""
    for start, stop in even_bounds(total.shape[-1], block):
        total[start:stop, stop:] = total[stop:, start:stop].T
    return total


class _MomentRecorder(_Recorder):
    """A recorder of the moments of ``layers``; its rows are drawn from a generator seeded afresh
    per recorder, so a layer's statistics do not depend on which pass measured it with which others.

    A forward of a whole batch keeps :data:`MAX_ROWS_PER_BATCH` rows per layer; when the Fisher
    cuts a batch into micro-batches, :meth:`share` gives each its share of them, so the moments
    cost what they cost unsplit (:data:`MAX_ROWS_PER_BATCH` per micro-batch would multiply it)."""

    def __init__(self, layers: dict[str, nn.Module]):
        generator = torch.Generator().manual_seed(0)
        self.max_rows = MAX_ROWS_PER_BATCH
        super().__init__(layers, lambda module, x, sums: _moments(module, sums, layer_rows(module, x, generator,
                                                                                           self.max_rows)))

    def share(self, examples: int, batch_examples: int) -> None:
        """The next forward is of ``examples`` of a batch of ``batch_examples``: keep that share of the batch's rows."""
        self.max_rows = math.ceil(MAX_ROWS_PER_BATCH * examples / batch_examples)


def _layer_inputs(sums: dict[str, tuple], layers: dict[str, nn.Module]) -> dict[str, LayerInputs]:
    """Sums over counts (an ungrouped layer's x xᵀ completed by :func:`mirror_gram`), divided in
    place: the sums are not needed again, and a copy of a large model's statistics would double
    their memory."""
    return {name: LayerInputs((mirror_gram(second[0])[None] if len(second) == 1 else second).div_(n), total.div_(n),
                              transposed=isinstance(layers[name], TRANSPOSED))
            for name, (second, total, n) in sums.items()}


def layer_statistics(model: nn.Module, batches: list, layers: dict[str, nn.Module],
                     max_bytes: int = MAX_STATISTICS_BYTES, progress: bool = False) -> dict[str, LayerInputs]:
    """:class:`LayerInputs` for every layer of ``layers``, in as few passes over ``batches`` as fit ``max_bytes``."""
    out = {}
    passes = _passes(layers, max_bytes)
    for i, names in enumerate(passes):
        recorder = _MomentRecorder({n: layers[n] for n in names})
        with recorder.attached():
            _run(model, batches, f"input moments {i + 1}/{len(passes)}", progress)
        out.update(_layer_inputs(recorder.sums, layers))
    return out


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the heap memory freed since the last call back to the operating system, where the C
    library can (glibc). Why: the Fisher's backward passes free their activations into glibc's heap,
    which keeps them (its mmap threshold rises to the size of the tensors freed, so later ones of
    that size come from the heap and stay there once freed). A fixed-rate resnet50 compress at
    224 px went from 2.87 to 2.14 GB RSS here, before the rounding where it peaks. Nothing
    measured changes."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def calibrate(model: nn.Module, batches: Iterable, num_batches: int,
              loss_fn: Callable[[nn.Module, object], tuple[torch.Tensor, int]],
              coded_names: Iterable[str] | None = None, progress: bool = True,
              max_bytes: int = MAX_STATISTICS_BYTES, activation_bytes: int = ACTIVATION_BYTES) -> Calibration:
    """Fisher of the task's ``loss_fn`` (see :func:`~.importance.fisher_diagonal`) and layer input
    moments (of ``coded_names``, or of every eligible layer) from ``num_batches`` batches, which
    are kept for the norm statistics (a sequence of at most ``num_batches`` as it is: it may make
    its batches as they are taken, and listing them would hold them all).

    The moments of the first layers whose statistics fit ``max_bytes`` are recorded during the
    Fisher's forward passes (the loss's forward of each batch, in eval mode: the same inputs as a
    plain forward); the rest, if any, take passes of their own (:func:`layer_statistics`). The
    Fisher's backward passes hold at most ``activation_bytes`` of saved activations
    (:func:`~.importance.examples_per_backward`, measured before the hooks are attached)."""
    batches = batches if isinstance(batches, Sequence) and len(batches) <= num_batches \
        else [b for _, b in zip(range(num_batches), batches)]
    layers = output_aware_layers(model, coded_names)
    passes = _passes(layers, max_bytes)
    per_backward = examples_per_backward(model, batches[0], activation_bytes) if batches else None
    first = _MomentRecorder({n: layers[n] for n in (passes[0] if passes else [])})
    start = time.perf_counter()
    with first.attached():
        fisher = fisher_diagonal(model, batches, num_batches, loss_fn, progress, per_backward, first.share)
    fisher_seconds = time.perf_counter() - start
    statistics = _layer_inputs(first.sums, layers)
    rest = {n: layers[n] for names in passes[1:] for n in names}
    start = time.perf_counter()
    statistics.update(layer_statistics(model, batches, rest, max_bytes, progress) if rest else {})
    seconds = {"fisher": fisher_seconds - first.seconds, "moments": first.seconds + time.perf_counter() - start}
    release_freed_memory()
    logger.info("calibration: %d batches (at most %s examples per backward), input moments of %d layers in %d passes "
                "(%.1f s Fisher, %.1f s moments)", len(batches), per_backward, len(statistics), len(passes),
                seconds["fisher"], seconds["moments"])
    return Calibration(fisher, statistics, batches,
                       seconds={k: round(v, 3) for k, v in seconds.items()})
