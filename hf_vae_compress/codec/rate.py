"""Rate control: per-tensor steps from one global trade-off, the search for a target rate, and
the coder's cost model that the search measures rates with.

With a tensor's sensitivity ``F`` (mean Fisher of its normalised weights), the loss cost of
quantizing it with step ``q`` is about ``F * q**2 / 12`` per weight. Equal slopes across tensors
(the optimal allocation) give ``q = lam / sqrt(F)`` for one global ``lam``; the Lagrangian
``loss + beta * bits`` gives ``lam = sqrt(6 * beta / ln 2)``.

:func:`allocate` is the one entry point: it sets ``lam`` from ``beta`` or searches it for a
target size, around the transform's fit and the rounding's extra cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from .format.grid import stored_step
from .format.streams import MAX_STREAM
from .transform import Transform

logger = logging.getLogger(__name__)

STREAM_OVERHEAD_BITS = 8 * 40  # pcodec's meta + framing of a stream, measured on Laplacian streams
REAIM_TOLERANCE = 0.01  # a re-aimed allocation this close to the target is not aimed again
SPARSE_SPAN_FACTOR = 16  # a symbol range this many times the count (plus 64 Ki) is counted by sorting, not a table


class Quantizer(Protocol):
    """What rate allocation probes: a transform and the tensors it codes, rounded as configured."""

    transform: Transform
    # Its symbols are not the nearest-rounded ones ``bits`` estimates (output-aware rounding):
    # how many times :func:`allocate` may re-aim for them (False/0: never).
    regrids: int

    def bits(self, lam: float) -> float:
        """The estimated container bits at ``lam`` with nearest-rounded symbols."""

    def symbols(self, steps: list[float]) -> list[torch.Tensor]:
        """The symbols coded at ``steps``, rounded as configured."""

    def symbol_bits(self, symbols: list[torch.Tensor]) -> float:
        """The estimated container bits of these symbols."""


@dataclass
class Allocation:
    """The trade-off, the per-tensor steps it gives and the symbols coded at them, by ``quantizer``."""

    quantizer: Quantizer
    lam: float
    steps: list[float]
    symbols: list[torch.Tensor]


def allocate(quantizer: Quantizer, target_bits: float | None, beta: float | None, sensitivities: list[float],
             learn: Callable[[list[float]], Quantizer] | None = None) -> Allocation:
    """The allocation at a fixed ``beta``, or the one whose estimated size is ``target_bits``.

    ``learn(steps)``, for a transform that is fitted, returns the quantizer of the transform
    fitted at the steps ``quantizer`` (the identity) allocates; its decoder and its symbols cost
    other bits, so the target is searched again. A quantizer whose symbols are not the nearest-
    rounded ones the search estimates (``regrids``: how many times it is re-aimed) is aimed
    again, each time by the ratio its symbols missed the target by, until they are within
    :data:`REAIM_TOLERANCE` of it.
    """
    def trade_off(q: Quantizer, target: float) -> float:
        return lam_from_beta(beta) if beta is not None else search_lam(q.bits, target, sensitivities)

    lam = trade_off(quantizer, target_bits)
    if learn is not None:
        quantizer = learn(steps_for(lam, sensitivities))
        lam = trade_off(quantizer, target_bits)
    steps = steps_for(lam, sensitivities)
    symbols = quantizer.symbols(steps)
    aim = target_bits
    for _ in range(int(quantizer.regrids) if beta is None else 0):
        # GPTQ's symbols cost more bits than the nearest-rounded ones the search matched to the
        # target (dev: 36 % more on resnet18 at 0.25 bits/weight), rate-aware ones fewer, by a
        # ratio that drifts with the step: aim by the ratio, and again if it drifted.
        actual = quantizer.symbol_bits(symbols)
        if abs(actual - target_bits) <= REAIM_TOLERANCE * target_bits:
            break
        aim *= target_bits / actual
        lam = trade_off(quantizer, aim)
        steps = steps_for(lam, sensitivities)
        symbols = quantizer.symbols(steps)
    return Allocation(quantizer, lam, steps, symbols)


def lam_from_beta(beta: float) -> float:
    return math.sqrt(6 * beta / math.log(2))


def steps_for(lam: float, sensitivities: list[float]) -> list[float]:
    """Per-tensor steps, rounded to what the header stores (encoder and decoder use the same value)."""
    return [stored_step(lam / math.sqrt(s)) for s in sensitivities]


def search_lam(total_bits: Callable[[float], float], target_bits: float, sensitivities: list[float],
               iterations: int = 40, tolerance: float = 0.002) -> float:
    """Bisection on ``log(lam)`` for ``total_bits(lam) == target_bits`` (bits fall as lam grows).

    The bracket spans steps from 1e-4 to 1e2 (in units of the normalised weights) for the median
    tensor, wide enough for any useful rate. Returns a lam within tolerance, else the smallest one tried whose rate fits.
    """
    median = sorted(math.sqrt(s) for s in sensitivities)[len(sensitivities) // 2]
    lo, hi = math.log(1e-4 * median), math.log(1e2 * median)
    best = math.exp(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        bits = total_bits(math.exp(mid))
        if abs(bits - target_bits) <= tolerance * target_bits:
            best = math.exp(mid)
            break
        if bits > target_bits:
            lo = mid
        else:
            hi, best = mid, math.exp(mid)
    logger.info("rate search: lam=%.4g for %.4g target bits", best, target_bits)
    return best


def estimate_bits(values: np.ndarray) -> float:
    """Coded bits of a stream of integer symbols: its order-0 entropy plus pcodec's fixed cost."""
    values = values.reshape(-1)
    if len(values) == 0:
        return 0.0
    low, high = int(values.min()), int(values.max())
    if _sparse(high - low + 1, len(values)):
        return _stream_bits(np.unique(values, return_counts=True)[1], len(values))
    return _stream_bits(np.bincount(values - low), len(values))


def _sparse(span: int, count: int) -> bool:
    """Whether ``count`` symbols spread over ``span`` values are too sparse to count with a dense
    ``bincount``: at a tiny step (a rate search's extreme probe, or a tensor with outliers) symbols
    reach 2**31, and a table over that range would take many GB. Sorting them is then cheaper."""
    return span > SPARSE_SPAN_FACTOR * count + (1 << 16)


def _stream_bits(counts: np.ndarray, length: int) -> float:
    """:func:`estimate_bits` of a stream of ``length`` symbols from their counts (in symbol order)."""
    counts = counts[counts > 0]
    entropy = float(-(counts * np.log2(counts / length)).sum())
    return 1.005 * entropy + STREAM_OVERHEAD_BITS * math.ceil(length / MAX_STREAM)


def estimate_tensor_bits(symbols: np.ndarray) -> float:
    """Coded bits of a tensor's (chunks, dims) symbols in the layout :func:`~.format.streams.compress_tensor`
    would pick: one stream, or one per dimension. Both come from one count of (symbol, dimension)
    pairs (the rate search calls this for every tensor at every probe)."""
    chunks, dims = symbols.shape
    if dims == 1 or chunks == 0:
        return estimate_bits(symbols)
    low, high = int(symbols.min()), int(symbols.max())
    pairs = symbols.astype(np.int64)
    pairs -= low
    pairs *= dims
    pairs += np.arange(dims)
    if _sparse((high - low + 1) * dims, symbols.size):  # only the (symbol, dimension) pairs present
        present, counts = np.unique(pairs, return_counts=True)
        flat = estimate_bits(symbols)
        return min(flat, sum(_stream_bits(counts[present % dims == j], chunks) for j in range(dims)))
    counts = np.bincount(pairs.reshape(-1), minlength=(high - low + 1) * dims).reshape(-1, dims)
    flat = _stream_bits(counts.sum(1), symbols.size)
    return min(flat, sum(_stream_bits(counts[:, j], chunks) for j in range(dims)))
