"""The rate search: the smallest container whose drop on the held-out split keeps a budget.

:func:`search_smallest` bisects the target bits per weight; each probe is a compression of one
opened :class:`~hf_vae_compress.pipeline.Source` (one shared calibration), judged by
:meth:`~hf_vae_compress.pipeline.Source.judge` on the selection split the source chose (see
:mod:`hf_vae_compress.pipeline` for which split and why).

A probe is scored on a growing seeded subset of the split and stops as soon as the whole split's
verdict is decided (:mod:`hf_vae_compress.sequential`: a probe far from the budget costs a
fraction of a pass). A probe still undecided after its share of one screening pass gets a
provisional verdict that steers the bisection: a guessed accept at once (every later probe of its
bracket is smaller, so it is scored on only where none of them holds), a guessed reject once it is
sure at the steering error (it is scored on until it is). At the end the smallest provisional
accept is scored on to a sound verdict (the whole split, judged by the same rule as before, at the
latest); where that overturns it, the bracket above it is bisected with the probes spent below it,
and the next smallest candidate is taken the same way. A bracket is bisected no further once it is
resolved: once the measured bits per weight of the probes at its two ends are within the
``resolution`` of :func:`search_smallest` (by default the gap the whole range halved by every probe
reaches), so a bracket bisected again above an overturned accept stops as soon as it is as fine as
the search's own first bracket, rather than spending as many probes as it spent below.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import CompressedModel, VAECompressionConfig
from .finetune import FinetuneConfig
from .pipeline import Source, UncheckedAccuracyError, is_main, timed
from .sequential import look_sizes, screening_size, steering_verdict
from .tasks import CHECK_SYNTHETIC

logger = logging.getLogger(__name__)

SEARCH_RANGE_BPW = (0.125, 8.0)
SEARCH_PROBES = 6  # at most, per bracket
# A bracket is resolved once its ends' measured bits per weight are within this relative gap (see
# search_smallest); None: the gap SEARCH_PROBES halvings of the range reach, (8 / 0.125)^(1/64) - 1 = 6.7 %.
SEARCH_RESOLUTION: float | None = None


@dataclass
class SearchResult:
    """The outcome of :func:`search_smallest`: the chosen container (None if no probe fit), its
    measured drop, every probe, and the wall-clock seconds of the whole search.

    ``stage_seconds`` splits ``seconds`` by stage and adds up to it: the stages of
    :meth:`~hf_vae_compress.pipeline.Source.open` run inside the search (none when it is handed an opened source, whose own
    ``stage_seconds`` has them), ``compress`` and ``score`` summed over the probes, ``verify`` for
    scoring probes on past their screen, before steering or after the last probe (absent when none
    was), ``save``,
    and ``other`` for the rest (bookkeeping, logging)."""

    compressed: CompressedModel | None
    validation: dict | None
    probes: list[dict]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


ProbeReport = Callable[[dict], None]


def describe_probe(probe: dict, budget_pt: float) -> str:
    """One line per probe of :func:`search_smallest`, as it is logged and as the CLI shows it: the
    rate, the measured drop (with its standard error where the metric has one), the verdict with
    how many examples decided it (fewer than the split's when it was decided early, or when it is
    only provisional), and how long the rest of the search should take at the pace measured so far.
    A probe verified later, as a candidate, gets a second line, its final verdict and what the
    verification took; one scored on past its screen before the bisection steered on it says so on
    its one line, and a probe of a bracket bisected again names the probe whose accept was overturned."""
    drop = _drop_text(probe)
    verdict = "accepted" if probe["accepted"] else "rejected"
    scored, total = probe.get("examples_scored"), probe.get("split_examples")
    if scored is not None and probe.get("provisional"):
        verdict += f" provisionally, on {scored:,} of {total:,} examples"
    elif scored is not None and probe.get("early_stop"):
        verdict += f" early, after {scored:,} of {total:,} examples"
    elif scored is not None:
        verdict += f" on all {scored:,} examples"
    if probe.get("verified_before_steering"):
        verdict += f" (its screen of {probe['screening_examples']:,} read a reject too close to the budget to steer on)"
    if probe.get("reprobe_of"):
        verdict += f" (bisecting above probe {probe['reprobe_of']}, whose accept the whole split overturned)"
    left = probe["probes"] - probe["probe"]
    if probe.get("verified_later"):
        kind, pace = "verification of probe", f"verified in {probe['verify_seconds']:.0f} s"
    else:
        kind = "probe"
        pace = (f"{probe['seconds']:.0f} s; about {_duration(probe['estimated_seconds_left'])} left for {left} more "
                f"probe{'s' * (left != 1)}" if left else f"{probe['seconds']:.0f} s; search done")
    return (f"rate search {kind} {probe['probe']}/{probe['probes']}: {probe['bits_per_weight']:.3f} bits/weight "
            f"({probe['bytes']:,} bytes), validation drop {drop} pt (budget {budget_pt} pt): {verdict}; {pace}")


def describe_refusal(probes: list[dict], allowed_pt: float, check: str) -> str:
    """Why a rate search chose nothing, in words a user can act on: the finest rate tried and what it
    measured on which check; where one changed prediction already costs more than the budget allows
    (an agreement check on few images: 1 of 128 is 0.78 pt), that only a rate changing none passes;
    and what to do next. The probes themselves were shown one line each as they finished."""
    finest = max(probes, key=lambda p: p["bits_per_weight"])
    se, examples = finest["validation_drop_se_pt"], finest.get("split_examples")
    text = (f"no rate tried kept the drop on {check} within {allowed_pt:g} pt: the finest of {len(probes)} probes, "
            f"{finest['bits_per_weight']:.3f} bits/weight ({finest['bytes']:,} bytes), measured {_drop_text(finest)} pt.")
    if se is not None and examples and 100 / examples > allowed_pt:
        text += (f" On {examples:,} examples one changed prediction is {100 / examples:.2f} pt, more than the "
                 f"{allowed_pt:g} pt allowed, so only a rate that changes none can pass.")
    if check == CHECK_SYNTHETIC:
        text += " Pass --dataset with images like those the model is used on (unlabelled images are enough), or"
    return text + " give --target-bpw to choose a rate yourself (its effect is then not checked)"


def _drop_text(probe: dict) -> str:
    """A probe's validation drop, with its standard error where the metric has one (mAP has none)."""
    se = probe["validation_drop_se_pt"]
    return f"{probe['validation_drop_pt']:.2f}" + ("" if se is None else f" ± {se:.2f}")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


@dataclass
class _Candidate:
    """A probe accepted (soundly or provisionally), kept until the search ends: its container
    (coded bytes; decoded again to be scored on, rather than holding a model per probe), its
    validation and per-example scores so far (empty on processes that do not score), its log
    entry, which a verification updates, and where the bisection left it: the upper end of the
    bracket it halved (log bits per weight) and how many probes the bracket had after it, all
    below it, which is what bisecting above it again costs where its accept is overturned."""

    compressed: CompressedModel
    validation: dict
    scores: np.ndarray | None
    entry: dict
    upper: float
    after: int
    above: "_Candidate | None"  # the candidate at ``upper`` (None: the search range's end)
    final: bool  # its verdict is sound (the same on every process)


@dataclass
class _Rejected:
    """A probe rejected at a bracket's lower end: its log entry, whose measured bits per weight
    :meth:`_Search.resolved` compares with the accept above."""

    entry: dict


@dataclass
class _Bracket:
    """A bracket to bisect (log bits per weight) with at most ``probes`` probes; ``above`` is the
    candidate at its upper end and ``below`` the probe rejected at its lower end (None: the search
    range's end), ``reprobe_of`` names the probe whose overturned accept it lies above (None: the
    search's own range)."""

    low: float
    high: float
    probes: int
    above: _Candidate | None = None
    below: _Rejected | _Candidate | None = None
    reprobe_of: int | None = None


def search_smallest(source: str | Source, out_dir: str | Path | None, max_drop_pt: float, dataset: str | None,
                    config: VAECompressionConfig, finetune_config: FinetuneConfig | None = None,
                    bpw_range: tuple[float, float] = SEARCH_RANGE_BPW, probes: int = SEARCH_PROBES,
                    accelerator=None, progress: bool = True, validation_split: str | None = None,
                    on_probe: ProbeReport | None = None,
                    resolution: float | None = SEARCH_RESOLUTION) -> SearchResult:
    """The smallest container whose task-metric drop (top-1 or mAP, in points) on the held-out
    split is at most ``max_drop_pt`` (times the check's ``budget_share``: less on synthetic images).

    Bisects the target bits per weight on a log scale: each probe halves the bracket, moving down
    after a probe that keeps the budget (its drop plus one standard error, see
    :meth:`~hf_vae_compress.pipeline.Source.validation_drop`) and up after one that does not. Each probe is a full
    compression (and fine-tuning, when configured) from one shared calibration pass, judged on
    the selection split (``validation_split``, or the automatic rule: see :mod:`hf_vae_compress.pipeline`).

    **Resolution.** A bracket is bisected with at most ``probes`` probes, and no further once it is
    *resolved*: a probe accepted at its upper end, one rejected at its lower end (a range end is no
    probe, so a bracket reaching one is never resolved), and the accept's measured bits per weight
    within ``resolution`` (relative) of the reject's. The default (None) is the search's own
    granularity, ``(bpw_range[1] / bpw_range[0]) ** (1 / 2 ** probes) - 1`` (6.7 % for the default
    range and probes): what ``probes`` halvings of the whole range promise, and no finer. Why not a
    finer or coarser number: a first bracket already stops there, so the default changes nothing
    on it; it stops the brackets that do not start from the whole range (above an overturned
    accept, bisected with as many probes as were spent below it) once they are as fine, and any
    bracket whose probes' measured rates land closer than their targets. A gap read from the
    split's standard error (stop once the two ends' paired scores differ by less than one) was
    measured and rejected: on fmnist-vit the drop is flat between 1.85 and 2.88 bits/weight
    (0.32 and 0.16 pt), so it stopped on a 56 % gap and returned a container 27 % larger
    (a probe between them keeps the budget). A larger ``resolution`` makes fewer probes; 0 makes
    every probe, as before there was a resolution. The answer is still a probe verified as below,
    so this changes how many probes are made, never the guarantee; the container returned is at
    most the resolved bracket's gap larger than one bisecting on could have found. An entry's
    ``probes`` is the plan when it was logged; a resolved bracket takes the probes it does not
    make out of the plan (logged, and counted in later entries).

    **Screen, steer, verify** (:mod:`hf_vae_compress.sequential`). On top-1 or agreement a probe
    is scored on a growing seeded subset and keeps a verdict decided soundly on part of the split
    (``early_stop``; at most :data:`~hf_vae_compress.sequential.STOPPING_ERROR` chance that the
    whole split would say otherwise), but is scored on at most ``screening_examples``
    (:func:`~hf_vae_compress.sequential.screening_size`: all probes together, one pass of the
    split). A probe undecided there is ``provisional``: its ``accepted`` is the whole split's rule
    predicted from the examples scored, a guess that steers the bisection and is never returned as
    it is.

    - A guessed **accept** steers down at once. Every later probe of its bracket is smaller, so it
      is scored on only where none of them holds, and then it is verified like any candidate.
    - A guessed **reject** steers up for good: a wrong one costs every rate below it (on
      fmnist-vit, 1.27x the bytes). So its looks resume at once, one at a time, from where its
      screen paused, while it is a reject that
      :func:`~hf_vae_compress.sequential.steering_verdict` is not sure of (exact bounds at
      :data:`~hf_vae_compress.sequential.STEERING_ERROR` per search), to a sure or sound verdict or
      until it guesses an accept (``verified_before_steering``; ``verified`` where the verdict is
      final). A sure reject is ruled out; it returns nothing, so it needs no sound verdict. But
      first, where the accept at the upper end of its bracket is provisional, that accept is
      verified (below a rate that fails, the sound bisection never probes, and a probe there is
      near the budget: scoring three such probes on cost fmnist-vit over two passes of its split).

    A provisional accept is verified (scored on from where its scoring paused, its scores kept and
    the container decoded again, to a sound verdict, the whole split's rule at the latest; the entry
    then has ``verified`` and ``verified_later``, and a final ``accepted``, ``examples_scored``,
    drop and ``early_stop``) when a guessed reject below it is to be scored on, and after the
    bisection, smallest candidate first, until one holds: the answer. Where a verdict overturns the
    accept, the bisection left the bracket above the probe for a wrong guess: that bracket is
    bisected with as many probes as it spent below (their entries name the probe as
    ``reprobe_of``; ``probes`` counts every probe planned so far), and the search goes on from
    there. So the container returned is a probe that passed the whole split's rule or a sound early
    accept, and the bisection's path is the one sound verdicts would have steered except where a
    sure reject is wrong (at most the steering error per search) or where a probe below an
    overturned guess holds (the answer is then smaller). The search's scoring is the base's pass,
    the screens, the scoring on of guessed rejects to a sure verdict, and one verification per
    provisional accept below a guessed reject or from the smallest up to the one that holds:
    accepts larger than the answer and above no guessed reject are not scored past their screens.
    An entry still ``provisional`` is a sure reject, a guessed reject below an overturned accept,
    or an accept larger than the probe returned.

    Each entry also has ``examples_scored`` of ``split_examples``, its ``compress_seconds`` and
    ``score_seconds`` (the screen; and the compressor's ``compress_stage_seconds`` where it records
    them), and one scored on past its screen ``verify_seconds`` (part of its ``seconds`` when scored
    on before steering, plus its verification later; ``stage_seconds["verify"]`` sums
    both kinds). The best container is saved to ``out_dir`` (when given), its
    drop in ``stats["validation"]``.

    A probe takes minutes on a busy machine, so the search is never silent: with ``progress`` a
    bar over the probes names the stage of the current one and shows the last verdict and the time
    left; every probe is logged (:func:`describe_probe`) and, on the main process, handed to
    ``on_probe`` as the entry of ``SearchResult.probes`` it adds (the CLI prints it), and again
    when it is verified. ``estimated_seconds_left`` is the probes left times the mean time of the
    probes so far.

    Where the base model looks memorised on the selection split, :class:`~hf_vae_compress.pipeline.UncheckedAccuracyError`
    is raised before the first probe rather than falling back to some rate: a budget is a promise
    about accuracy, no rate can be shown to keep it there, and a run that exits 0 with a model is
    read as having kept it. The error names the scores and what to do (held-out data, or a fixed
    rate, whose drop is then reported as not checked).
    """
    start = time.perf_counter()
    if isinstance(source, Source):
        src = source
        if validation_split is not None and src.task is not None and validation_split != src.task.validation_split:
            raise ValueError(f"validation_split {validation_split!r} differs from the one the source was opened with "
                             f"({src.task.validation_split!r}); give it to Source.open")
        before = dict(src.stage_seconds)
    else:
        src = Source.open(source, dataset, config.calibration_batches, progress, validation_split=validation_split)
        before = {}
    if src.task is None:
        raise ValueError("an accuracy budget needs a dataset to measure the drop on")
    selection = src.check_selection()
    stages = {name: seconds - before.get(name, 0.0) for name, seconds in src.stage_seconds.items()
              if seconds > before.get(name, 0.0)}  # what opening and checking cost inside this call
    if not selection["rate_checked"]:
        raise UncheckedAccuracyError(f"no rate search: {selection['warning']}")
    if resolution is None:
        resolution = (bpw_range[1] / bpw_range[0]) ** (1 / 2 ** probes) - 1
    if not resolution >= 0:
        raise ValueError(f"resolution must be None or a relative bits-per-weight gap >= 0, not {resolution!r}")
    search = _Search(src, config, finetune_config, max_drop_pt, probes, accelerator, progress, on_probe, stages,
                     resolution)
    brackets, best = [_Bracket(math.log(bpw_range[0]), math.log(bpw_range[1]), probes)], None
    while brackets:
        overturned = search.bisect(brackets.pop())
        if overturned is None:
            best, overturned = search.verified_smallest()
        if overturned is not None:  # the bracket above it, left for a wrong guess, with the probes spent below it
            above = overturned.above if overturned.above in search.candidates else None
            brackets.append(_Bracket(math.log(overturned.entry["target_bits_per_weight"]), overturned.upper,
                                     overturned.after, above, overturned, overturned.entry["probe"]))
    search.close()
    best_validation = best.validation if best is not None else None
    best = best.compressed if best is not None else None
    if best is not None and out_dir is not None and search.main_process:
        with timed(stages, "save"):
            src.save(best, out_dir)
    seconds = time.perf_counter() - start
    stages["other"] = max(seconds - sum(stages.values()), 0.0)
    return SearchResult(best, best_validation, search.log, seconds, {name: round(t, 3) for name, t in stages.items()})


class _Search:
    """The probes of one :func:`search_smallest`: the bisection of each bracket (:meth:`bisect`),
    each probe screened and steered on (:meth:`_screen`), and the verification of the candidates
    after it (:meth:`verified_smallest`). ``log`` holds every probe's entry, ``candidates`` the
    probes accepted and not yet overturned; ``stages`` gets the compress, score and verify seconds."""

    def __init__(self, src: Source, config: VAECompressionConfig, finetune_config: FinetuneConfig | None,
                 max_drop_pt: float, probes: int, accelerator, progress: bool, on_probe: ProbeReport | None,
                 stages: dict[str, float], resolution: float):
        self.src, self.config, self.finetune_config, self.accelerator = src, config, finetune_config, accelerator
        self.max_drop_pt, self.probes, self.on_probe, self.stages, self.progress = \
            max_drop_pt, probes, on_probe, stages, progress
        self.resolution = resolution
        self.allowed = max_drop_pt * src.task.budget_share  # what each probe's drop plus its standard error must fit
        self.screen = screening_size(src.split_examples, probes)
        self.main_process = is_main(accelerator)
        self.split = src.check_selection()["split"]
        self.log: list[dict] = []
        self.candidates: list[_Candidate] = []
        self.planned = 0  # probes of every bracket so far
        self.began = time.perf_counter()
        self.bar = tqdm(total=0, desc="rate search", unit="probe", disable=not (progress and self.main_process))

    def bisect(self, bracket: _Bracket) -> _Candidate | None:
        """At most ``bracket.probes`` probes, each at the middle of the bracket left (on a log
        scale), which moves down after a probe accepted (soundly or provisionally) and up after one
        rejected, until the bracket is :meth:`resolved`. Returns the provisional accept at the
        bracket's upper end where it is overturned before a guessed reject below it is scored on
        (:meth:`_probe`): the bracket is then abandoned, the rest of it lying below a rate that fails."""
        self.planned += bracket.probes
        self.bar.total = self.planned
        low, high, above, below = bracket.low, bracket.high, bracket.above, bracket.below
        made: list[_Candidate] = []  # this bracket's candidates, whose ``after`` counts the probes planned below them
        for after in range(bracket.probes - 1, -1, -1):
            if self.resolved(below, above):
                self._save(after + 1, made, below, above)
                break
            bpw = math.exp((low + high) / 2)
            candidate, overturned, rejected = self._probe(bpw, bracket.reprobe_of, high, after, above)
            if overturned is not None:
                return overturned
            if candidate is not None:
                high, above = math.log(bpw), candidate
                made.append(candidate)
            else:
                low, below = math.log(bpw), rejected
        return None

    def resolved(self, below: _Rejected | _Candidate | None, above: _Candidate | None) -> bool:
        """Whether a bracket whose ends are the probe rejected ``below`` and the candidate
        ``above`` needs no further probe (see ``resolution`` in :func:`search_smallest`); never
        where an end is the search range's."""
        if below is None or above is None or self.resolution == 0:  # 0: never, even where rates cross their targets
            return False
        return above.entry["bits_per_weight"] <= (1 + self.resolution) * below.entry["bits_per_weight"]

    def _save(self, saved: int, made: list[_Candidate], below: _Rejected | _Candidate, above: _Candidate) -> None:
        """Take the ``saved`` probes a resolved bracket does not make out of the plan (and out of
        the probes below each of its candidates), and say so."""
        self.planned -= saved
        self.bar.total = self.planned
        for candidate in made:
            candidate.after -= saved
        logger.info("rate search: the bracket %.3f-%.3f bits/weight is resolved (%s); %d probe%s saved",
                    below.entry["bits_per_weight"], above.entry["bits_per_weight"],
                    f"within {self.resolution:.1%}", saved, "s" * (saved != 1))

    def _probe(self, bpw: float, reprobe_of: int | None, upper: float, after: int,
               above: _Candidate | None) -> tuple[_Candidate | None, _Candidate | None, _Rejected | None]:
        """Compress at ``bpw``, screen and steer, log the entry: ``(candidate, None, None)`` when
        the probe is accepted (soundly or provisionally), ``(None, None, rejected)`` when it is
        rejected, and ``(None, above, None)`` when its guessed reject would be scored on but the
        provisional accept ``above`` it is verified first and fails (a guessed reject is scored on only below a sound
        accept: below a failing rate the sound bisection never probes, and scoring three such
        probes on, near the budget, cost fmnist-vit over two passes of its split)."""
        src, index = self.src, len(self.log) + 1
        probe_start = time.perf_counter()
        self.bar.set_description(f"rate search: compressing at {bpw:.3f} bits/weight")
        probe = src.compress(dataclasses.replace(self.config, target_bits_per_weight=bpw, beta=None),
                             self.finetune_config, self.accelerator, progress=self.progress)
        compressed_at = time.perf_counter()
        self.bar.set_description(f"rate search: scoring {bpw:.3f} bits/weight on {self.split!r}")
        validation, scores, unsure = self._screen(probe) if self.main_process else ({}, None, False)
        overturned, inline, verify_seconds, above_seconds = None, False, 0.0, 0.0
        if _agreed(self.accelerator, unsure):
            began = time.perf_counter()
            if above is not None and not self._verify(above):
                overturned, above_seconds = above, time.perf_counter() - began  # the above probe's verification
            else:
                above_seconds = time.perf_counter() - began
                began, inline = time.perf_counter(), True
                validation, scores = self._score_on(probe, validation, scores) if self.main_process else ({}, None)
                verify_seconds = time.perf_counter() - began
        accepted = _agreed(self.accelerator, validation.get("within_budget", False))
        report = probe.report()
        seconds = time.perf_counter() - probe_start - above_seconds
        compress_seconds = compressed_at - probe_start
        score_seconds = seconds - compress_seconds - verify_seconds
        self.stages["compress"] = self.stages.get("compress", 0.0) + compress_seconds
        self.stages["score"] = self.stages.get("score", 0.0) + score_seconds
        if inline:
            self.stages["verify"] = self.stages.get("verify", 0.0) + verify_seconds
        elapsed = time.perf_counter() - self.began
        entry = dict(probe=index, probes=self.planned, target_bits_per_weight=bpw,
                     bits_per_weight=report["bits_per_weight"], bytes=report["total_bytes"], accepted=accepted,
                     **_scoring_fields(validation, src.paired), screening_examples=self.screen,
                     verified=inline and not validation.get("provisional", False), verified_before_steering=inline,
                     verified_later=False, reprobe_of=reprobe_of, seconds=round(seconds, 2),
                     compress_seconds=round(compress_seconds, 2), score_seconds=round(score_seconds, 2),
                     compress_stage_seconds=probe.stats.get("stage_seconds"),
                     estimated_seconds_left=round((self.planned - index) * elapsed / index, 1))
        if inline:
            entry["verify_seconds"] = round(verify_seconds, 2)
        self.log.append(entry)
        if self.main_process:
            self._report(entry, self.bar)
        if overturned is not None:
            return None, overturned, None
        if not accepted:
            return None, None, _Rejected(entry)
        final = _agreed(self.accelerator, self.main_process and not validation["provisional"])
        candidate = _Candidate(probe, validation, scores, entry, upper, after, above, final)
        self.candidates.append(candidate)
        return candidate, None, None

    def _screen(self, probe: CompressedModel) -> tuple[dict, np.ndarray | None, bool]:
        """A probe's validation and scores after its screen, and whether it is to be scored on: a
        provisional guess of a reject that :func:`~hf_vae_compress.sequential.steering_verdict` is
        not sure of. Where the bounds are sure, the provisional ``within_budget`` is their verdict
        rather than the guess."""
        validation, scores = self.src.judge(probe, self.max_drop_pt, early_stop=True, screen=self.screen)
        validation, unsure = self._steering(validation, scores)
        return validation, scores, unsure

    def _steering(self, validation: dict, scores: np.ndarray | None) -> tuple[dict, bool]:
        """The verdict to steer on and whether it is an unsure guessed reject (see :meth:`_screen`)."""
        if not validation["provisional"]:
            return validation, False
        sure = steering_verdict(self.src.base_scores[:len(scores)], scores, self.src.split_examples, self.allowed,
                                self.probes, self.screen)
        if sure is not None:
            return dict(validation, within_budget=sure), False
        return validation, not validation["within_budget"]

    def _score_on(self, probe: CompressedModel, validation: dict, scores: np.ndarray) -> tuple[dict, np.ndarray]:
        """An unsure guessed reject's looks resumed from where they paused, one at a time, until it
        is sure (:meth:`_steering`), decided soundly, or guessed an accept: a reject steers the
        bisection up for good, so it must be sure; an accept steers down, and every later probe of
        its bracket is smaller (it is verified only where none of them holds)."""
        later = [size for size in look_sizes(self.src.split_examples) if size > len(scores)]
        unsure = True
        while unsure:
            validation, scores = self.src.judge(probe, self.max_drop_pt, early_stop=True, screen=later.pop(0),
                                                scored=scores)
            validation, unsure = self._steering(validation, scores)
        return validation, scores

    def _verify(self, candidate: _Candidate) -> bool:
        """Whether ``candidate``'s final verdict is an accept: a provisional one is scored on from
        where its scoring paused (:meth:`~hf_vae_compress.pipeline.Source.judge` with its ``scored``)
        to a sound verdict, its entry updated (``verified_later``) and reported again; one that
        fails is no candidate any more. Only the main process scores; every process takes its verdict."""
        src = self.src
        if not candidate.final:
            if self.main_process:
                began = time.perf_counter()
                with timed(self.stages, "verify"):
                    candidate.validation, candidate.scores = src.judge(candidate.compressed, self.max_drop_pt,
                                                                       scored=candidate.scores)
                entry = candidate.entry
                entry.update(accepted=candidate.validation["within_budget"],
                             **_scoring_fields(candidate.validation, src.paired), verified=True, verified_later=True,
                             verify_seconds=round(time.perf_counter() - began + entry.get("verify_seconds", 0.0), 2))
                self._report(entry, None)
            candidate.final = True
        accepted = _agreed(self.accelerator, candidate.validation.get("within_budget", False))
        if not accepted:
            self.candidates.remove(candidate)
            candidate.entry["accepted"] = False
        return accepted

    def verified_smallest(self) -> tuple[_Candidate | None, _Candidate | None]:
        """The smallest candidate whose final verdict is an accept (:meth:`_verify`, smallest
        first), or the first whose provisional accept its final verdict overturns while its bracket
        had probes after it, all below it (the bracket above it is then to be bisected again with as
        many): ``(answer, None)``, ``(None, overturned)``, or ``(None, None)`` when none holds."""
        for candidate in sorted(self.candidates, key=lambda c: c.entry["bytes"]):
            if self._verify(candidate):
                return candidate, None
            if candidate.after:
                return None, candidate
        return None, None

    def _report(self, probe: dict, bar: tqdm | None) -> None:
        """Log a finished (or verified) probe, show its verdict on the bar, and hand it to the caller's
        report."""
        logger.info(describe_probe(probe, self.allowed))
        if bar is not None:
            bar.set_description("rate search")
            bar.set_postfix_str(f"last {probe['bits_per_weight']:.3f} bits/weight: "
                                f"{'accepted' if probe['accepted'] else 'rejected'}", refresh=False)
            bar.update()
        if self.on_probe is not None:
            self.on_probe(probe)

    def close(self) -> None:
        self.bar.close()


def _scoring_fields(validation: dict, paired: bool) -> dict:
    """What a probe's log entry says about its scoring, from :meth:`~hf_vae_compress.pipeline.Source.judge`'s dict (empty on
    processes that do not score)."""
    return dict(validation_drop_pt=validation.get("drop_pt", 0.0),
                validation_drop_se_pt=validation.get("drop_se_pt") if paired else None,
                examples_scored=validation.get("examples"), split_examples=validation.get("split_examples"),
                early_stop=validation.get("early_stop"), full_split_bounds_pt=validation.get("full_split_bounds_pt"),
                provisional=validation.get("provisional", False))


def _agreed(accelerator, accepted: bool) -> bool:
    """The main process's verdict on every process: only it scores, the others hold False."""
    if accelerator is None:
        return bool(accepted)
    return float(accelerator.reduce(torch.tensor(float(accepted)), reduction="sum")) > 0.5


__all__ = ["SEARCH_PROBES", "SEARCH_RANGE_BPW", "SEARCH_RESOLUTION", "ProbeReport", "SearchResult", "describe_probe",
           "describe_refusal", "search_smallest"]
