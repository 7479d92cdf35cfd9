"""The codec's encode entry point: :func:`compress` (model -> :class:`~.compressed.CompressedModel`).

Pipeline: select tensors -> chunk and normalise -> encode -> quantize -> entropy-code -> container.
The rate search estimates the coded size from the symbols' order-0 entropy (what pcodec reaches
within ~1 %); the side parts that do not depend on the steps (scales, 1-D tensors) are coded once,
exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Iterable

import torch

from .chunking import row_scales, to_chunks
from .compressed import CompressedModel
from .config import VAECompressionConfig, check_target_rate
from .calibration import Calibration, calibrate
from .correction import bias_corrections, norm_corrections
from .format.layout import ChunkLayout
from .format.v2 import HEADER_BYTES_PER_TENSOR, code_side_parts
from .importance import mean_normalised_fisher
from .latents import CodedTensor, Latents
from .output_aware import output_aware_symbols
from .rate import estimate_tensor_bits, lam_from_beta, search_lam, steps_for
from .select import select_tensors
from .transform import Shard, Transform, build_transform

logger = logging.getLogger(__name__)


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

    ``calibration_data`` yields model inputs; with it, steps are allocated by Fisher sensitivity,
    without it every tensor gets the same relative precision. ``loss_fn(model, batch) ->
    (loss, batch_size)`` replaces the sampled-label classification loss for other tasks.
    With a ``shard`` the VAE fit is data-parallel over processes; everything else is
    deterministic and computed identically by each process, which all return the same result.
    ``calibration`` (from :func:`~.calibration.calibrate`) replaces the calibration pass: a rate
    search that compresses one model many times measures it once. Output-aware rounding and the
    bias and norm corrections (``config.rounding``, ``config.correct_biases``,
    ``config.correct_norms``) need it; without data they are skipped, and say so in the log.
    """
    config = config or VAECompressionConfig()
    if config.target_bits_per_weight is not None:
        check_target_rate(config.target_bits_per_weight)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    state_dict = _untied({k: v.detach().cpu() for k, v in
                          (model.state_dict() if isinstance(model, torch.nn.Module) else model).items()})
    coded_names, stored_names = select_tensors(state_dict, config)
    if not coded_names:
        raise ValueError(
            f"nothing to compress: none of the model's {len(state_dict)} tensors is a floating-point weight with "
            f"two or more dimensions and at least min_numel={config.min_numel} values (conv, linear, attention or "
            "embedding weights)" + (f" outside modules_to_not_convert={config.modules_to_not_convert}"
                                    if config.modules_to_not_convert else ""))
    coded = _prepare(state_dict, coded_names, config)
    if calibration is None and calibration_data is not None and isinstance(model, torch.nn.Module):
        calibration = calibrate(model, calibration_data, config.calibration_batches, coded_names, loss_fn, progress)
    sens = _sensitivities(coded, calibration)
    stored = _stored(state_dict, stored_names, config)
    num_weights = sum(v.numel() for v in state_dict.values() if v.is_floating_point())
    side = code_side_parts(coded, stored, config)
    fixed_bits = 8 * (sum(len(m) + len(p) for part in side.values() for m, p in part.streams)
                      + HEADER_BYTES_PER_TENSOR * len(state_dict))

    def total_bits(transform: Transform, lam: float) -> float:
        payload = sum(estimate_tensor_bits(transform.encode_all(c.chunks, step, i).numpy())
                      for i, (c, step) in enumerate(zip(coded, steps_for(lam, sens))))
        decoder = sum(v.numel() * v.element_size() for v in transform.stored_state().values())
        return payload + fixed_bits + 8 * decoder

    transform = build_transform("identity", config.chunk_size, config.hidden_size, len(coded))
    if config.beta is not None:
        lam = lam_from_beta(config.beta)
    else:
        target = config.target_bits_per_weight * num_weights
        lam = search_lam(lambda l: total_bits(transform, l), target, sens)
    if config.transform != "identity":
        transform = build_transform(config.transform, config.chunk_size, config.hidden_size, len(coded))
        chunks, index, log_steps = _flat(coded, steps_for(lam, sens))
        transform.fit(chunks, index, log_steps, config, progress, shard)
        if config.beta is None:
            lam = search_lam(lambda l: total_bits(transform, l), target, sens)
    def nearest(steps: list[float]) -> list[torch.Tensor]:
        return [transform.encode_all(c.chunks, step, i) for i, (c, step) in enumerate(zip(coded, steps))]

    steps = steps_for(lam, sens)
    symbols = nearest(steps)
    if config.rounding == "output_aware" and transform.kind == "identity" and calibration is not None:
        symbols = _round_output_aware(state_dict, coded, steps, symbols, calibration)
        if config.beta is None:
            # GPTQ's symbols cost more bits than the nearest-rounded ones the search matched to the
            # target (dev: 36 % more on resnet18 at 0.25 bits/weight): aim lower by that ratio, once.
            actual = fixed_bits + sum(estimate_tensor_bits(s.numpy()) for s in symbols)
            lam = search_lam(lambda l: total_bits(transform, l), target * target / actual, sens)
            steps = steps_for(lam, sens)
            symbols = _round_output_aware(state_dict, coded, steps, nearest(steps), calibration)
    elif config.rounding == "output_aware":  # the header records what was done, not what was asked
        logger.info("nearest rounding: output-aware rounding needs calibration data and the identity transform")
        config = dataclasses.replace(config, rounding="nearest")
    if (config.correct_biases or config.correct_norms) and (calibration is None or not isinstance(model, torch.nn.Module)):
        logger.warning("bias and norm corrections skipped: they need a model and calibration data")
        config = dataclasses.replace(config, correct_biases=False, correct_norms=False)
    if coded:
        chunks, index, log_steps = _flat(coded, steps)
        transform.refine(chunks, torch.cat(symbols), index, log_steps, config, shard)

    latents = Latents(state_dict, coded, symbols, steps, stored, transform, config)
    corrected = _corrections(model, latents, calibration)
    if corrected:
        latents.stored = _stored(dict(state_dict, **corrected), stored_names, config)
        side = None  # the stored tensors changed: code them again
    compressed = CompressedModel.from_latents(latents, progress, side)
    compressed.stats["encode_seconds"] = round(time.perf_counter() - start, 3)
    compressed.header["lam"] = lam
    return compressed


def _round_output_aware(state_dict: dict[str, torch.Tensor], coded: list[CodedTensor], steps: list[float],
                        symbols: list[torch.Tensor], calibration: Calibration) -> list[torch.Tensor]:
    """GPTQ symbols for every coded tensor whose layer inputs were measured; the others keep
    their nearest-rounded ``symbols``. Only the identity transform has a grid in weight space."""
    out = list(symbols)
    for i, c in enumerate(coded):
        if c.name not in calibration.layers:
            continue
        factors = (c.scales.double() * steps[i]).float()  # the decoder's per-row factor, exactly
        rows = output_aware_symbols(state_dict[c.name], factors, calibration.inverse_cholesky(c.name))
        rows = torch.nn.functional.pad(rows, (0, c.layout.padded_len - c.layout.row_len))
        out[i] = rows.reshape(c.layout.num_chunks, c.layout.chunk_size)
    return out


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


def _flat(coded: list[CodedTensor], steps: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All chunks, their tensor index and the per-tensor log steps: a transform's training data."""
    chunks = torch.cat([c.chunks for c in coded])
    index = torch.cat([torch.full((len(c.chunks),), i) for i, c in enumerate(coded)])
    return chunks, index, torch.tensor([math.log(s) for s in steps])
