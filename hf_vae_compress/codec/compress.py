"""The codec's encode entry point: :func:`compress` (model -> :class:`~.compressed.CompressedModel`).

Pipeline: fold BatchNorm -> select tensors -> chunk and normalise -> encode -> quantize -> entropy-code
-> container.
The rate search estimates the coded size from the symbols' order-0 entropy (what pcodec reaches
within ~1 %); the side parts that do not depend on the steps (scales, 1-D tensors) are coded once,
exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .calibration import Calibration, calibrate
from .chunking import row_scales, to_chunks
from .compressed import CompressedModel
from .config import VAECompressionConfig, check_target_rate
from .correction import bias_corrections, norm_corrections
from .folding import BATCHNORM_FOLDED, fold_batchnorm, foldable_batchnorms
from .fit import Shard, fit, refine, refit_maps_, to_stored_precision_
from .format.layout import ChunkLayout
from .format.v2 import HEADER_BYTES_PER_TENSOR, code_side_parts
from .importance import mean_normalised_fisher
from .lattice import moves
from .latents import CodedTensor, Latents
from .output_aware import RATE_SCALE, layer_factor, linear_latent_symbols, output_aware_symbols
from .rate import Allocation, allocate, estimate_tensor_bits, steps_for
from .select import select_tensors
from .transform import AUTO, PortableVAE, Transform, build_transform, transform_class

logger = logging.getLogger(__name__)
OUTPUT_AWARE = ("output_aware", "rate_aware")  # the roundings that run GPTQ against calibration inputs
RATE_AWARE_AIMS = 3  # re-aims of rate-aware rounding's allocation at most (a GPTQ pass each)
SLOPE_STEP = 2 ** 0.25  # auto: the identity's second step (one quarter octave coarser), for its local RD slope
MAP_BITS_PER_ENTRY = 16  # auto: an int16 map entry, what keeping a tensor's map costs


def _untied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every tensor that shares storage with an earlier one (tied weights, e.g.
    an embedding and its output head) copied out.

    Each name is then coded on its own and decodes under its own name, so strict loaders find every
    key and a model that ties the two ties them again on load; the shared values are paid for once
    per name. Without the copy the container cannot be written at all (safetensors refuses tensors
    that share memory), which used to fail only after the whole encode.
    """
    owners: dict[int, str] = {}
    out = {}
    for name, tensor in state_dict.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in owners:
            logger.warning("%s shares its storage with %s (tied weights): coded separately, so the tied values "
                           "are stored twice", name, owners[pointer])
            tensor = tensor.clone()
        elif pointer is not None:
            owners[pointer] = name
        out[name] = tensor
    return out


def _prepare(state_dict: dict[str, torch.Tensor], names: list[str], config: VAECompressionConfig) -> list[CodedTensor]:
    out = []
    for name in names:
        tensor = state_dict[name]
        layout = ChunkLayout.of(tuple(tensor.shape), config.chunk_size)
        scales = row_scales(tensor, layout, per_channel=config.normalization == "channel")
        out.append(CodedTensor(name, tensor.dtype, layout, scales, to_chunks(tensor, layout, scales)))
    return out


def _sensitivities(coded: list[CodedTensor], calibration: Calibration | None) -> list[float]:
    """Mean normalised Fisher per coded tensor; all 1 (equal relative precision) without data."""
    if calibration is None:
        return [1.0] * len(coded)
    fisher = calibration.fisher
    values = [mean_normalised_fisher(fisher[c.name], c.scales) if c.name in fisher else None for c in coded]
    known = sorted(v for v in values if v)
    fallback = known[len(known) // 2] if known else 1.0
    return [v if v else fallback for v in values]


def _stored(state_dict: dict[str, torch.Tensor], names: list[str], config: VAECompressionConfig) -> dict:
    raw_dtype = getattr(torch, config.raw_dtype)
    return {n: (state_dict[n].to(raw_dtype) if state_dict[n].is_floating_point() else state_dict[n]).contiguous()
            for n in names}


def compress(model: torch.nn.Module | dict[str, torch.Tensor], config: VAECompressionConfig | None = None,
             calibration_data: Iterable | None = None, loss_fn: Callable | None = None,
             progress: bool = True, shard: Shard | None = None,
             calibration: Calibration | None = None) -> CompressedModel:
    """Compress a model (or a bare state dict) post-hoc.

    ``calibration_data`` yields model inputs and ``loss_fn(model, batch) -> (loss, batch_size)``
    is the task's Fisher loss (:meth:`hf_vae_compress.tasks.Classification.fisher_loss`, a
    detector's own loss); with them, steps are allocated by Fisher sensitivity, without them
    every tensor gets the same relative precision. With a ``shard`` the VAE fit is data-parallel
    over processes; everything else is deterministic and computed identically by each process,
    which all return the same result. ``calibration`` (from :func:`~.calibration.calibrate`)
    replaces the calibration pass: a rate search that compresses one model many times measures it
    once. Output-aware rounding and the bias and norm corrections (``config.rounding``,
    ``config.correct_biases``, ``config.correct_norms``) need it; without data they are skipped,
    and say so in the log. BatchNorms are stored folded (:mod:`.folding`) unless
    ``config.fold_batchnorm`` is off; a bare state dict has no modules to tell them by.
    """
    config = config or VAECompressionConfig()
    _check_inputs(config, calibration_data, loss_fn)
    clock = _Stages()
    torch.manual_seed(config.seed)
    state_dict = _untied({k: v.detach().cpu() for k, v in
                          (model.state_dict() if isinstance(model, torch.nn.Module) else model).items()})
    folded = _batchnorms_to_fold(model, config)
    state_dict = fold_batchnorm(state_dict, folded)
    coded_names, stored_names = _selected(state_dict, config)
    coded = _prepare(state_dict, coded_names, config)
    clock.mark("prepare")
    if calibration is None and calibration_data is not None and isinstance(model, torch.nn.Module):
        calibration = calibrate(model, calibration_data, config.calibration_batches, loss_fn, coded_names, progress)
        clock.mark("calibration")
    config = _feasible(config, model, calibration)
    stored = _stored(state_dict, stored_names, config)
    side = code_side_parts(coded, stored, config)
    clock.mark("container")
    allocation = _allocate(state_dict, coded, side, config, calibration, progress, shard, clock)
    transform, steps, symbols = allocation.quantizer.transform, allocation.steps, allocation.symbols
    if config.transform == AUTO:
        transform.keep_maps_(allocation.quantizer.chosen)
    if config.rounding not in OUTPUT_AWARE:  # output-aware latents were chosen for the maps as they are
        refine(transform, [c.chunks for c in coded], symbols, steps, config.fit, config.seed, shard)
    clock.mark("allocate")
    latents = Latents(state_dict, coded, symbols, steps, stored, transform, config)
    corrected = _corrections(model, latents, calibration)
    if corrected:  # a corrected running mean is folded into its bias again
        latents.stored = _stored(fold_batchnorm(dict(state_dict, **corrected), folded), stored_names, config)
        side = None  # the stored tensors changed: code them again
    clock.mark("corrections")
    compressed = CompressedModel.from_latents(latents, progress, side)
    clock.mark("container")
    compressed.stats["stage_seconds"] = clock.rounded()
    compressed.stats["encode_seconds"] = round(clock.total, 3)
    compressed.header["lam"] = allocation.lam
    compressed.header[BATCHNORM_FOLDED] = len(folded)
    return compressed


class _Stages:
    """Wall seconds by stage: :meth:`mark` charges the time since the previous mark to a stage,
    and :meth:`take` charges seconds measured inside the running stage to another (GPTQ and its
    Cholesky factors run inside the allocation), so the stages add up to the total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.total = 0.0
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self.total += now - self._last
        self._last = now

    def take(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.total += seconds
        self._last += seconds  # not charged again to the stage that is running

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def _check_inputs(config: VAECompressionConfig, calibration_data: Iterable | None, loss_fn: Callable | None) -> None:
    """Refuse what cannot work before any long work."""
    if config.target_bits_per_weight is not None:
        check_target_rate(config.target_bits_per_weight)
    if calibration_data is not None and loss_fn is None:
        raise ValueError("calibration_data needs the task's loss_fn(model, batch) -> (summed loss, batch size) to "
                         "measure sensitivities: for a classifier, hf_vae_compress.tasks.Classification.fisher_loss()")


def _batchnorms_to_fold(model: torch.nn.Module | dict[str, torch.Tensor],
                        config: VAECompressionConfig) -> dict[str, float]:
    """The BatchNorms (``{name: eps}``) to store folded: none when folding is off or ``model`` is a
    bare state dict (which cannot tell a BatchNorm's tensors from a look-alike's)."""
    if not config.fold_batchnorm:
        return {}
    if not isinstance(model, torch.nn.Module):
        logger.info("BatchNorm not folded: a bare state dict does not say which tensors belong to a BatchNorm")
        return {}
    return foldable_batchnorms(model, config.modules_to_not_convert)


def _selected(state_dict: dict[str, torch.Tensor], config: VAECompressionConfig) -> tuple[list[str], list[str]]:
    """The names of the tensors to code and to store; a ValueError when nothing would be coded."""
    coded_names, stored_names = select_tensors(state_dict, config)
    if not coded_names:
        raise ValueError(
            f"nothing to compress: none of the model's {len(state_dict)} tensors is a floating-point weight with "
            f"two or more dimensions and at least min_numel={config.min_numel} values (conv, linear, attention or "
            "embedding weights)" + (f" outside modules_to_not_convert={config.modules_to_not_convert}"
                                    if config.modules_to_not_convert else ""))
    return coded_names, stored_names


def _feasible(config: VAECompressionConfig, model, calibration: Calibration | None) -> VAECompressionConfig:
    """``config`` less what cannot be done here, so that the header records what was done, not
    what was asked: output-aware rounding needs calibration data and a transform with a weight
    grid, the corrections need a model and calibration data. A linear decoder (vae-int, auto) is
    rounded output-aware without the rate term."""
    cls = transform_class(config.transform)
    if config.rounding in OUTPUT_AWARE and not ((cls.has_weight_grid or cls.linear_decoder)
                                                and calibration is not None):
        logger.info("nearest rounding: output-aware (and rate-aware) rounding needs calibration data and a transform whose symbols "
                    "are levels in weight space (the identity) or a linear decoder's latents (vae-int)")
        config = dataclasses.replace(config, rounding="nearest")
    if config.rounding == "rate_aware" and cls.linear_decoder:
        logger.info("output-aware rounding: the rate term is not implemented for a linear decoder's latents")
        config = dataclasses.replace(config, rounding="output_aware")
    if (config.correct_biases or config.correct_norms) and (calibration is None or not isinstance(model, torch.nn.Module)):
        logger.warning("bias and norm corrections skipped: they need a model and calibration data")
        config = dataclasses.replace(config, correct_biases=False, correct_norms=False)
    return config


def _allocate(state_dict: dict[str, torch.Tensor], coded: list[CodedTensor], side: dict, config: VAECompressionConfig,
              calibration: Calibration | None, progress: bool, shard: Shard | None, clock: _Stages) -> Allocation:
    """The rate allocation (:func:`~.rate.allocate`) of the configured transform, fitted on the way;
    the seconds of output-aware rounding go to ``clock``'s stage "rounding"."""
    sens = _sensitivities(coded, calibration)
    fixed_bits = 8 * (sum(len(m) + len(p) for part in side.values() for m, p in part.streams)
                      + HEADER_BYTES_PER_TENSOR * len(state_dict))
    gptq = calibration if config.rounding in OUTPUT_AWARE else None
    rate_scale = RATE_SCALE if config.rounding == "rate_aware" else None

    def quantizer(transform: Transform) -> _Quantizer:
        return _Quantizer(transform, coded, sens, fixed_bits, state_dict, gptq, clock, progress, rate_scale,
                          auto=config.transform == AUTO and transform.linear_decoder)

    def learn(steps: list[float]) -> _Quantizer:
        transform = build_transform(config.transform, config.chunk_size, config.hidden_size, len(coded))
        fit(transform, [c.chunks for c in coded], steps, config.fit, config.seed, progress, shard)
        if config.latent_quantizer != "scalar":  # fitted with scalar rounding, then coded on the lattice
            transform.use_lattice_(config.latent_quantizer)
        return quantizer(transform)

    identity = build_transform("identity", config.chunk_size, config.hidden_size, len(coded))
    target = None if config.beta is not None else config.target_bits_per_weight * _num_weights(state_dict)
    return allocate(quantizer(identity), target, config.beta, sens, None if config.transform == identity.kind else learn)


def _num_weights(state_dict: dict[str, torch.Tensor]) -> int:
    """Every floating-point value, coded or stored: the denominator of bits per weight, as in
    :meth:`~.compressed.CompressedModel.report`."""
    return sum(v.numel() for v in state_dict.values() if v.is_floating_point())


@dataclass
class _Quantizer:
    """The coded tensors under one transform, rounded to nearest or, given a ``calibration``,
    output-aware, and rate-aware with a ``rate_scale`` (a :class:`~.rate.Quantizer`, what the
    rate allocation probes)."""

    transform: Transform
    coded: list[CodedTensor]
    sensitivities: list[float]
    fixed_bits: float  # everything but the symbols and the decoder: side parts and headers
    state_dict: dict[str, torch.Tensor]
    calibration: Calibration | None
    clock: _Stages
    progress: bool = False
    rate_scale: float | None = None
    auto: bool = False  # choose identity or the map per tensor (``chosen``: the tensors that keep their map)
    chosen: set[int] = dataclasses.field(default_factory=set)

    @property
    def regrids(self) -> int:
        """GPTQ's symbols cost a steady ratio more than nearest rounding's: one re-aim finds the
        target. Rate-aware ones cost a ratio less that shrinks as the step does (the finer the
        grid, the less a dead zone saves): up to :data:`RATE_AWARE_AIMS` re-aims."""
        if self.calibration is None:
            return 0
        return 1 if self.rate_scale is None else RATE_AWARE_AIMS

    def bits(self, lam: float) -> float:
        steps = steps_for(lam, self.sensitivities)
        return self.symbol_bits(self.transform.encode_all(c.chunks, step, i)
                                for i, (c, step) in enumerate(zip(self.coded, steps)))

    def symbol_bits(self, symbols: Iterable[torch.Tensor]) -> float:
        payload = sum(estimate_tensor_bits(s.numpy()) for s in symbols)
        decoder = sum(v.numel() * v.element_size() for v in self.transform.stored_state().values())
        return payload + self.fixed_bits + 8 * decoder

    def _moments(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return _layer_moments(self.state_dict, self.coded, self.calibration)

    def symbols(self, steps: list[float]) -> list[torch.Tensor]:
        nearest = [self.transform.encode_all(c.chunks, step, i) for i, (c, step) in enumerate(zip(self.coded, steps))]
        if self.calibration is None:
            return nearest
        start = time.perf_counter()
        if isinstance(self.transform, PortableVAE):  # its maps fitted to the output error, before the loop uses them
            refit_maps_(self.transform, [c.chunks for c in self.coded], nearest, steps, self._moments())
            to_stored_precision_(self.transform)
        out = _round_output_aware(self.state_dict, self.coded, steps, nearest, self.calibration, self.progress,
                                  self.rate_scale, self.transform, self.chosen if self.auto else None)
        self.clock.take("rounding", time.perf_counter() - start)
        return out


def _layer_moments(state_dict: dict[str, torch.Tensor], coded: list[CodedTensor],
                   calibration: Calibration) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Row scales and input second moments of the coded tensors whose rows are their layer's
    output rows (what :func:`~.fit.refit_maps_` fits a map to the output error with)."""
    return {i: (c.scales, calibration.layers[c.name].second) for i, c in enumerate(coded)
            if _rows_are_outputs(state_dict, c, calibration)}


def _rows_are_outputs(state_dict: dict[str, torch.Tensor], c: CodedTensor, calibration: Calibration) -> bool:
    """Whether ``c`` was measured and its layout's rows are its layer's output rows, the rows a
    map's output error is measured over (not a weight with one output row, whose layout rows are
    its inputs, nor a transposed convolution, whose stored rows are its input channels)."""
    inputs = calibration.layers.get(c.name)
    return inputs is not None and not inputs.transposed and c.layout.rows == state_dict[c.name].shape[0]


def _round_output_aware(state_dict: dict[str, torch.Tensor], coded: list[CodedTensor], steps: list[float],
                        symbols: list[torch.Tensor], calibration: Calibration, progress: bool,
                        rate_scale: float | None = None, transform: Transform | None = None,
                        chosen: set[int] | None = None) -> list[torch.Tensor]:
    """GPTQ symbols (rate-aware with a ``rate_scale``) for every coded tensor whose layer inputs
    were measured; the others keep their nearest-rounded ``symbols``. A tensor that ``transform``
    decodes through a linear map gets latents chosen in GPTQ's loop (:func:`_latents`). With a
    ``chosen`` set (``auto``) each such tensor is rounded both ways and keeps the cheaper
    (:func:`_choose`); ``chosen`` is refilled with the tensors that keep their map."""
    out = list(symbols)
    if chosen is not None:
        chosen.clear()
    # largest factors first: each is made once, at a peak above what the compress holds, which is
    # lowest early on (fewer rounded layers' symbols and factors are held yet); the order does not
    # change any tensor's symbols
    measured = sorted((i for i, c in enumerate(coded) if c.name in calibration.layers),
                      key=lambda i: -calibration.layers[coded[i].name].entries)
    for i in tqdm(measured, desc="output-aware rounding", disable=not progress, leave=False):
        c = coded[i]
        decoder = transform.chunk_map(i) if transform is not None else None
        if decoder is not None and not _rows_are_outputs(state_dict, c, calibration):
            continue  # the layout's rows are not GPTQ's (nearest latents kept)
        latents = None if decoder is None else _latents(state_dict, c, steps[i], decoder, calibration, transform, i)
        if latents is not None and chosen is None:
            out[i] = latents
            continue
        levels = _levels(state_dict, c, steps[i], calibration)
        if rate_scale is not None:
            levels = _rate_aware_if_better(state_dict, c, steps[i], levels, calibration, rate_scale)
        if latents is not None and _choose(state_dict, c, steps[i], levels, latents, decoder, calibration):
            out[i] = latents
            chosen.add(i)
        else:
            out[i] = levels
        if calibration.single_use and rate_scale is None and (transform is None or not transform.linear_decoder):
            calibration.layers[c.name].second = None  # factored, and read no more (Calibration.single_use)
    return out


def _levels(state_dict: dict[str, torch.Tensor], c: CodedTensor, step: float, calibration: Calibration,
            rate_scale: float | None = None) -> torch.Tensor:
    """The identity's GPTQ symbols of ``c`` at ``step``, in its chunk layout."""
    factors = (c.scales.double() * step).float()  # the decoder's per-row factor, exactly
    rows = output_aware_symbols(state_dict[c.name], factors, layer_factor(calibration, c.name), rate_scale,
                                calibration.layers[c.name])
    rows = torch.nn.functional.pad(rows, (0, c.layout.padded_len - c.layout.row_len))
    return rows.reshape(c.layout.num_chunks, c.layout.chunk_size)


def _latents(state_dict: dict[str, torch.Tensor], c: CodedTensor, step: float, decoder: torch.Tensor,
             calibration: Calibration, transform: PortableVAE, index: int) -> torch.Tensor:
    """The latents of ``c`` at ``step`` through its map ``decoder``, chosen in GPTQ's loop: the
    fitted encoder's rounding of each fed-back chunk. (Nearest plane on the map's lattice, what
    :func:`linear_latent_symbols` does without an encoder, lacks the encoder's learned dead zone:
    it coded more bytes at more output error on tests/test_vae_gptq.py's model, dev.) Lattice latents
    (``config.latent_quantizer``) start at the lattice point closest to the encoder's latent and move
    to a lattice neighbour while that lowers the chunk's output error."""
    factors = (c.scales.double() * step).float()
    factor = layer_factor(calibration, c.name, c.layout.chunk_size)
    rows = linear_latent_symbols(state_dict[c.name], factors, factor, decoder, transform.symbol_limit(index),
                                 lambda x: transform.encode(x * step, step, index),
                                 moves(transform.latent_quantizer, c.layout.chunk_size))
    return rows.reshape(c.layout.num_chunks, c.layout.chunk_size)


def _output_error(state_dict: dict[str, torch.Tensor], c: CodedTensor, step: float, symbols: torch.Tensor,
                  decoder: torch.Tensor | None, calibration: Calibration) -> float:
    """``tr(dW H dWᵀ)`` of ``c`` coded as ``symbols`` (through ``decoder``, None: the identity)."""
    chunks = symbols.double() if decoder is None else symbols.double() @ decoder.T
    rows = chunks.reshape(c.layout.rows, c.layout.padded_len)[:, : c.layout.row_len]
    weight = state_dict[c.name].double()
    h = calibration.layers[c.name].second.double()
    error = (rows * (c.scales.double() * step)[:, None]).reshape(weight.shape) - weight
    error = error.reshape(h.shape[0], -1, h.shape[-1])
    return float(((error @ h) * error).sum())


def _choose(state_dict: dict[str, torch.Tensor], c: CodedTensor, step: float, levels: torch.Tensor,
            latents: torch.Tensor, decoder: torch.Tensor, calibration: Calibration) -> bool:
    """Whether ``c``'s map and ``latents`` cost fewer bits than the identity's GPTQ ``levels`` at
    the same output error ``tr(dW H dWᵀ)`` (:func:`_beats_gptq`); the map's own bits count against it."""
    latent_bits = estimate_tensor_bits(latents.numpy()) + MAP_BITS_PER_ENTRY * decoder.numel()
    return _beats_gptq(state_dict, c, step, levels, _output_error(state_dict, c, step, latents, decoder, calibration),
                       latent_bits, calibration)


def _rate_aware_if_better(state_dict: dict[str, torch.Tensor], c: CodedTensor, step: float, levels: torch.Tensor,
                          calibration: Calibration, rate_scale: float) -> torch.Tensor:
    """``c``'s rate-aware symbols where they cost fewer bits than GPTQ's ``levels`` would at their
    output error (:func:`_beats_gptq`), else ``levels``.

    Rate-aware rounding prices bits with a model (a Gaussian ridge and the tensor's ECSQ slope);
    where the model is wrong it can trade far more output error than the bits it saves are worth.
    Dev, RT-DETR at 2.83 bits/weight: one layer with nearly low-rank inputs kept 63 % of its output
    at 124x GPTQ's output error, and mAP dropped 2.46 pt against GPTQ's 0.24. Measured against
    GPTQ's own rate-error curve, such a tensor keeps GPTQ's symbols."""
    rate_aware = _levels(state_dict, c, step, calibration, rate_scale)
    error = _output_error(state_dict, c, step, rate_aware, None, calibration)
    if _beats_gptq(state_dict, c, step, levels, error, estimate_tensor_bits(rate_aware.numpy()), calibration):
        return rate_aware
    return levels


def _beats_gptq(state_dict: dict[str, torch.Tensor], c: CodedTensor, step: float, levels: torch.Tensor,
                error: float, bits: float, calibration: Calibration) -> bool:
    """Whether a coding of ``c`` with output error ``error`` (``tr(dW H dWᵀ)``) in ``bits`` beats the
    identity's GPTQ ``levels`` at ``step``: GPTQ is rounded again one quarter octave coarser, and its
    bits at ``error`` are read off the line through its two points in (log error, bits). Where the two
    GPTQ points do not separate, GPTQ is kept."""
    coarse = _levels(state_dict, c, step * SLOPE_STEP, calibration)
    points = [(_output_error(state_dict, c, s, q, None, calibration), estimate_tensor_bits(q.numpy()))
              for s, q in ((step, levels), (step * SLOPE_STEP, coarse))]
    (gptq_error, gptq_bits), (coarse_error, coarse_bits) = points
    if not 0 < gptq_error < coarse_error:
        return False
    if error <= 0:
        return True
    slope = (coarse_bits - gptq_bits) / math.log(coarse_error / gptq_error)
    return bits < gptq_bits + slope * math.log(error / gptq_error)


def _corrections(model, latents: Latents, calibration: Calibration | None) -> dict[str, torch.Tensor]:
    """Corrected biases and norm statistics (by name) for the quantized weights, as configured
    (the caller has turned the corrections off where there is no model or calibration)."""
    config = latents.config
    if not (config.correct_biases or config.correct_norms):
        return {}
    original = latents.reference
    decoded = {c.name: latents.decode_tensor(i) for i, c in enumerate(latents.coded)}
    corrected = bias_corrections(original, decoded, calibration.layers) if config.correct_biases else {}
    if config.correct_norms:
        corrected.update(norm_corrections(model, dict(original, **decoded, **corrected), calibration))
    return corrected
