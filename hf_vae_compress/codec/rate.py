"""Rate control: per-tensor steps from one global trade-off, and the search for a target rate.

With a tensor's sensitivity ``F`` (mean Fisher of its normalised weights), the loss cost of
quantizing it with step ``q`` is about ``F * q**2 / 12`` per weight. Equal slopes across tensors
(the optimal allocation) give ``q = lam / sqrt(F)`` for one global ``lam``; the Lagrangian
``loss + beta * bits`` gives ``lam = sqrt(6 * beta / ln 2)``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

logger = logging.getLogger(__name__)


def lam_from_beta(beta: float) -> float:
    return math.sqrt(6 * beta / math.log(2))


STEP_DIGITS = 4  # significant digits of a stored step: within 0.05 % of the allocation's, 13 fewer header bytes


def steps_for(lam: float, sensitivities: list[float]) -> list[float]:
    """Per-tensor steps, rounded to what the header stores (encoder and decoder use the same value)."""
    return [float(f"{lam / math.sqrt(s):.{STEP_DIGITS}g}") for s in sensitivities]


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
