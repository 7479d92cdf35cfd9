"""Sequential scoring of a rate-search probe: stop on a growing random subset of the selection split
as soon as the full split's verdict is decided, with a bounded chance of deciding otherwise.

The full-split rule (:meth:`hf_vae_compress.pipeline.Source.validation_drop`) pairs the base's and
the probe's 0/1 scores per example, ``d_i = base_i - probe_i``, and accepts a probe when the drop
plus one standard error fits the allowed points: ``100 (mean(d) + std(d, ddof=1) / sqrt(N)) <=
allowed``. With 0/1 scores ``d_i`` is -1, 0 or 1, so that statistic is a function
:func:`drop_statistic_pt` of two counts over the ``N`` examples: ``L`` that the probe *lost* (base
right, probe wrong) and ``G`` that it *gained*.

**Looks.** The examples are scored in a fixed seeded order, so the first ``n`` are a simple random
sample without replacement of the ``N``: the lost count among them is hypergeometric given ``L``,
the gained count given ``G``. At each look size (:func:`look_sizes`) exact one-sided hypergeometric
bounds give ``L`` and ``G`` an interval each; they are finite-population bounds (the unscored
``N - n`` examples are all that is unknown, so a look near ``N`` pins the counts down).
:func:`drop_statistic_pt` is non-decreasing in ``L`` and non-increasing in ``G`` (``tests/
test_sequential.py`` checks every feasible pair of counts for several ``N``), so its largest and
smallest values over the two intervals are at two corners: :func:`decide` accepts when even the
largest fits, rejects when even the smallest does not, and otherwise asks for the next look. The
last look is the full split, where the full-split rule decides exactly as without early stopping.

**Guarantee.** For any pair of score vectors, over the seeded order, the probability that some look
accepts a probe the full split rejects is at most :data:`STOPPING_ERROR`: an early accept needs the
upper bound on ``L`` or the lower bound on ``G`` to be wrong at some look, and each of those
``2 K`` bounds (``K`` early looks) is at level ``STOPPING_ERROR / (2 K)`` (a union bound, valid
whatever the dependence between looks). The margin is **0 pt**: an early accept claims the full
split's own verdict, not a looser one, so a probe the full split rejects by any amount is accepted
early with at most that probability. The same holds for early rejects. Scores other than 0/1 are
never stopped early (:func:`binary`); mAP has no per-example scores and is always scored whole.

**Screen, steer, verify.** Near the budget no sound rule accepts before most of the split is
scored (at 1,000 examples and 0.5 pt, five lost examples can hide among any 125 unscored ones), so a
search that scored every undecided probe whole would pay a pass per probe. The rate search instead
pauses each probe's looks at :func:`screening_size`: a probe still undecided there gets a
*provisional* verdict, the full-split rule predicted from the examples scored (their drop plus the
standard error the whole split would have: their own, shrunk by ``sqrt(n / N)``), which only steers
the bisection. A guessed accept steers it down at once: every later probe of its bracket is smaller,
so it is scored on only if none of them holds. A guessed reject steers it up for good, so it must
first be sure: its looks resume while it is a reject that :func:`steering_verdict` is not sure of (a
bound at :data:`STEERING_ERROR`, far looser than the stopping error, since a reject returns
nothing), once the accept above it is sound. A provisional accept's looks resume from where they
paused, on to a sound verdict (the full split at the latest), when a guessed reject below it is to
be scored on, and after the bisection, smallest first, until one holds; where the verdict
overturns the accept, the bracket above it, which the bisection left for the guess, is bisected
with the probes it spent below. Pausing adds no look and
a provisional verdict is never returned, so every final verdict is one today's sequential scoring
of that probe would give: the guarantee above holds unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import hypergeom

# Chance, per probe and per direction, that an early verdict differs from the full split's: a
# 6-probe search then errs somewhere with at most 1.2 %, while the log(1 / error) the bounds pay
# keeps catastrophic probes stopping at the first look.
STOPPING_ERROR = 1e-3
# The smallest look: a batch. Fewer examples rarely decide anything (a bound at this level needs
# about log(2 K / error) ~ 9 lost examples before it can reject) and cost a model call each.
FIRST_LOOK = 64
SCORING_SEED = 0  # the order examples are scored in: the same for the base and every probe
# What the screening of all of a search's probes costs together, in passes of the split
# (screening_size). The scoring a search cannot avoid is two passes, the base's and the verification
# of the container it returns (a near-budget probe is only decided near the whole split); screening
# as much again keeps the search's scoring a fixed number of passes however many probes it makes.
SCREENING_PASSES = 1.0
# Chance, per search, that the bisection steers up on a reject the whole split would not make
# (steering_verdict): a guessed reject is scored on until it is this sure. A wrong steer is not
# unsound (every answer is verified) but costs the smaller rates below the probe for good.
STEERING_ERROR = 0.05


def look_sizes(total: int, first: int = FIRST_LOOK) -> list[int]:
    """How many examples are scored at each look, ending with ``total``.

    Doubling from ``first`` to half the split, then halving what is left (``N/2, 3N/4, 7N/8, ...``
    while at least ``first`` remain): a probe far from the budget stops at the cost of at most twice
    the examples that decided it; one close to it can still be accepted near the end, where the
    finite population leaves little unknown. ``K`` looks cost a factor ``log(K)`` in the bounds.
    A split under ``2 first`` examples is scored whole.
    """
    sizes = set()
    size = first
    while size < total / 2:
        sizes.add(size)
        size *= 2
    rest = total // 2
    while rest >= first:
        sizes.add(total - rest)
        rest //= 2
    return sorted(s for s in sizes if 0 < s < total) + [total]


def screening_size(total: int, probes: int) -> int:
    """Examples a rate-search probe is scored on at most before it gets a provisional verdict: the
    probes' share of :data:`SCREENING_PASSES` passes of the ``total`` examples, rounded down to a
    look (:func:`look_sizes`) so that a paused probe stops where its sound verdict was just checked
    and the looks, and with them the bounds, stay those of scoring it whole. At least the first look
    (a batch); a split too small to stop early is screened whole (no provisional verdicts)."""
    looks = look_sizes(total)
    share = max(SCREENING_PASSES * total / probes, looks[0])
    return max(size for size in looks if size <= share)


def drop_statistic_pt(lost: int, gained: int, total: int) -> float:
    """What the full-split rule compares with the allowed points, ``100 (mean(d) + std(d, ddof=1) /
    sqrt(N))``, for ``lost`` examples with ``d = 1`` and ``gained`` with ``d = -1`` of ``total``."""
    net, discordant = lost - gained, lost + gained
    variance = max(discordant - net * net / total, 0.0) / (total - 1)
    return 100 * (net / total + math.sqrt(variance / total))


def provisional_accept(drop_pt: float, se_pt: float, scored: int, total: int, allowed_pt: float) -> bool:
    """The full-split rule predicted from ``scored`` of ``total`` examples: their drop plus the
    standard error the whole split would have (theirs shrunk by ``sqrt(scored / total)``), within
    ``allowed_pt``; with every example scored, the rule itself. A paused probe's guess: it only
    steers the search, and the answer is verified before it is returned. With the screen's own,
    wider SE (at 512 examples about the size of a 0.5 pt budget) nearly every probe with a real drop
    was guessed a reject, and the default's containers came out 1.7-2.6x larger than with
    whole-split scoring on two reference models (rate_accuracy.json)."""
    return drop_pt + se_pt * math.sqrt(scored / total) <= allowed_pt


def binary(scores: np.ndarray) -> bool:
    """Whether per-example scores are 0/1, the case the bounds are exact for."""
    return bool(np.isin(scores, (0.0, 1.0)).all())


@functools.lru_cache(maxsize=4096)  # looks repeat the same counts across probes
def _upper(count: int, scored: int, total: int, delta: float) -> int:
    """The largest population count ``K`` (of ``total``) still consistent, at level ``delta``, with
    ``count`` of them among ``scored`` drawn without replacement: ``P(X <= count | K) > delta``.
    That probability falls as ``K`` grows, so a bisection finds it."""
    low, high = count, count + total - scored
    while low < high:
        middle = (low + high + 1) // 2
        if hypergeom.cdf(count, total, middle, scored) > delta:
            low = middle
        else:
            high = middle - 1
    return low


def _interval(count: int, scored: int, total: int, delta: float) -> tuple[int, int]:
    """One-sided bounds at level ``delta`` each on a population count; the lower bound is the
    upper bound of the complement."""
    return total - _upper(scored - count, scored, total, delta), _upper(count, scored, total, delta)


@dataclass(frozen=True)
class Verdict:
    """A look's decision: ``accepted`` True or False when decided, None to score on; ``low_pt`` and
    ``high_pt`` bound the full split's drop plus one standard error (``allowed`` is compared with them)."""

    accepted: bool | None
    low_pt: float
    high_pt: float


def decide(lost: int, gained: int, scored: int, total: int, allowed_pt: float, early_looks: int,
           error: float = STOPPING_ERROR) -> Verdict:
    """The verdict at an early look with ``lost`` and ``gained`` among ``scored`` of ``total``
    examples, when the search makes ``early_looks`` looks before the full split (module docstring)."""
    delta = error / (2 * early_looks)
    lost_low, lost_high = _interval(lost, scored, total, delta)
    gained_low, gained_high = _interval(gained, scored, total, delta)
    unscored = total - scored  # the counts of the unscored examples share them
    lost_high = min(lost_high, lost + unscored - (gained_low - gained))
    gained_high = min(gained_high, gained + unscored - (lost_low - lost))
    low, high = drop_statistic_pt(lost_low, gained_high, total), drop_statistic_pt(lost_high, gained_low, total)
    accepted = True if high <= allowed_pt else False if low > allowed_pt else None
    return Verdict(accepted, low, high)


def early_verdict(base: np.ndarray, probe: np.ndarray, total: int, allowed_pt: float, early_looks: int) -> Verdict | None:
    """The verdict at an early look where ``base`` and ``probe`` are the two models' scores on the
    same first examples of the scoring order; None where no early verdict may be given: scores
    that are not 0/1, or the whole split (where the full-split rule decides)."""
    if len(probe) >= total or not (binary(base) and binary(probe)):
        return None
    differences = base - probe
    return decide(int((differences > 0).sum()), int((differences < 0).sum()), len(probe), total, allowed_pt,
                  early_looks)


def steering_looks(total: int, screen: int) -> int:
    """How many looks a probe screened on ``screen`` of ``total`` examples may be steered on at:
    the screen and each later early look (:func:`look_sizes`), where a probe whose guess is a
    reject not yet sure is scored on (see :func:`steering_verdict`)."""
    return sum(screen <= size < total for size in look_sizes(total))


def steering_verdict(base: np.ndarray, probe: np.ndarray, total: int, allowed_pt: float, probes: int,
                     screen: int) -> bool | None:
    """The whole split's rule where it is sure enough for a search of ``probes`` probes to steer on
    (True: it keeps the budget, False: it does not), None where it is not; ``base`` and ``probe``
    are the two models' scores on the first examples of the scoring order, as in
    :func:`early_verdict`, at one of the looks from the ``screen`` on.

    Sure means :func:`decide`'s bounds at level :data:`STEERING_ERROR` shared by the search's probes
    and by each probe's looks from the screen on (:func:`steering_looks`: a union bound, as for the
    stopping error) put the whole split's rule on one side of the budget: then the bisection steers
    the wrong way on some sure verdict with at most that chance. The bounds are exact
    (hypergeometric), so a screen that saw few or no discordant examples is not taken for a sure
    one: a normal interval around its estimated SE of about 0 would be. With every example scored it
    is the rule itself; scores that are not 0/1 have no bounds, so they are never sure early.

    Why: a guess steers the bisection for good. On fmnist-vit a probe read 0.59 pt on its 512
    screened examples against a 0.5 pt budget (the whole split: 0.18 +- 0.11); the search moved
    up and never probed below it, and its answer came out 1.35x larger than whole-split scoring's
    (benchmarks/results/default_compress.json)."""
    scored = len(probe)
    if scored >= total:
        differences = 100 * (base - probe)
        return provisional_accept(float(differences.mean()), float(differences.std(ddof=1) / math.sqrt(scored)),
                                  scored, total, allowed_pt)
    if not (binary(base) and binary(probe)):
        return None
    differences = base - probe
    return decide(int((differences > 0).sum()), int((differences < 0).sum()), scored, total, allowed_pt,
                  early_looks=steering_looks(total, screen), error=STEERING_ERROR / probes).accepted


__all__ = ["FIRST_LOOK", "SCORING_SEED", "SCREENING_PASSES", "STEERING_ERROR", "STOPPING_ERROR", "Verdict", "binary",
           "decide", "drop_statistic_pt", "early_verdict", "look_sizes", "provisional_accept", "screening_size",
           "steering_looks", "steering_verdict"]
