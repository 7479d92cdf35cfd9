"""The rate search: the smallest container whose drop on the held-out split keeps a budget.

:func:`search_smallest` bisects the target bits per weight; each probe is a compression of one
opened :class:`~hf_vae_compress.pipeline.Source` (one shared calibration), judged by
:meth:`~hf_vae_compress.pipeline.Source.judge` on the selection split the source chose (see
:mod:`hf_vae_compress.pipeline` for which split and why).

A probe is scored on a growing seeded subset of the split and stops as soon as the whole split's
verdict is decided (:mod:`hf_vae_compress.sequential`: a probe far from the budget costs a
fraction of a pass). A probe still undecided after its share of one screening pass gets a
provisional verdict, which steers the bisection only when it is far from the budget; a probe nearer
is scored on to a sound verdict first. At the end the smallest candidate still provisional is
scored on to a sound verdict (the whole split, judged by the same rule as before, at the latest),
the next larger while it fails.
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
from .sequential import guess_is_decisive, screening_size

logger = logging.getLogger(__name__)

SEARCH_RANGE_BPW = (0.125, 8.0)
SEARCH_PROBES = 6


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
    A probe verified after the search gets a second line, its final verdict and what the
    verification took; one verified before the bisection steered on it says so on its one line."""
    se = probe["validation_drop_se_pt"]
    drop = f"{probe['validation_drop_pt']:.2f}" + ("" if se is None else f" ± {se:.2f}")
    verdict = "accepted" if probe["accepted"] else "rejected"
    scored, total = probe.get("examples_scored"), probe.get("split_examples")
    if scored is not None and probe.get("provisional"):
        verdict += f" provisionally, on {scored:,} of {total:,} examples"
    elif scored is not None and probe.get("early_stop"):
        verdict += f" early, after {scored:,} of {total:,} examples"
    elif scored is not None:
        verdict += f" on all {scored:,} examples"
    if probe.get("verified_before_steering"):
        verdict += f" (its screen of {probe['screening_examples']:,} was too close to the budget to steer on)"
    left = probe["probes"] - probe["probe"]
    if probe.get("verified") and not probe.get("verified_before_steering"):
        kind, pace = "verification of probe", f"verified in {probe['verify_seconds']:.0f} s"
    else:
        kind = "probe"
        pace = (f"{probe['seconds']:.0f} s; about {_duration(probe['estimated_seconds_left'])} left for {left} more "
                f"probe{'s' * (left != 1)}" if left else f"{probe['seconds']:.0f} s; search done")
    return (f"rate search {kind} {probe['probe']}/{probe['probes']}: {probe['bits_per_weight']:.3f} bits/weight "
            f"({probe['bytes']:,} bytes), validation drop {drop} pt (budget {budget_pt} pt): {verdict}; {pace}")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


@dataclass
class _Candidate:
    """A probe accepted, or not yet soundly rejected, kept until the search ends: its container
    (coded bytes; decoded again to be scored on, rather than holding a model per probe), its
    validation and per-example scores so far (empty on processes that do not score), and its log
    entry, which a verification updates."""

    compressed: CompressedModel
    validation: dict
    scores: np.ndarray | None
    entry: dict


def search_smallest(source: str | Source, out_dir: str | Path | None, max_drop_pt: float, dataset: str | None,
                    config: VAECompressionConfig, finetune_config: FinetuneConfig | None = None,
                    bpw_range: tuple[float, float] = SEARCH_RANGE_BPW, probes: int = SEARCH_PROBES,
                    accelerator=None, progress: bool = True, validation_split: str | None = None,
                    on_probe: ProbeReport | None = None) -> SearchResult:
    """The smallest container whose task-metric drop (top-1 or mAP, in points) on the held-out
    split is at most ``max_drop_pt`` (times the check's ``budget_share``: less on synthetic images).

    Bisects the target bits per weight on a log scale: each probe halves the bracket, moving down
    after a probe that keeps the budget (its drop plus one standard error, see
    :meth:`~hf_vae_compress.pipeline.Source.validation_drop`) and up after one that does not. Each probe is a full
    compression (and fine-tuning, when configured) from one shared calibration pass, judged on
    the selection split (``validation_split``, or the automatic rule: see :mod:`hf_vae_compress.pipeline`).

    **Screen, then verify** (:mod:`hf_vae_compress.sequential`). On top-1 or agreement a probe is
    scored on a growing seeded subset and keeps a verdict decided soundly on part of the split
    (``early_stop``; at most :data:`~hf_vae_compress.sequential.STOPPING_ERROR` chance that the
    whole split would say otherwise), but is scored on at most ``screening_examples``
    (:func:`~hf_vae_compress.sequential.screening_size`: all probes together, one pass of the
    split). A probe undecided there is ``provisional``: its ``accepted`` is the rule applied to
    the examples scored, a guess that steers the bisection and is never returned as it is. The
    search steers on a guess only when it lies far from the budget
    (:func:`~hf_vae_compress.sequential.guess_is_decisive`: more than its own error allows, at
    :data:`~hf_vae_compress.sequential.STEERING_ERROR` per search); a probe nearer is scored on at
    once, from where its screen paused, to a sound verdict (``verified`` and
    ``verified_before_steering``), and the bisection steers on that. A wrong guess near the budget
    is the likely one, and it would cost every rate on the other side of the probe. After
    the last probe, the smallest accepted probe is the answer if its verdict is final; if it is
    provisional its scoring resumes where it paused (its scores are kept, the container decoded
    again) to a sound verdict, the whole split's rule at the latest, and the entry is updated
    (``verified``, and ``accepted``, ``examples_scored``, the drop and ``early_stop`` are then
    final); while that rejects, the next larger candidate is taken the same way. A provisionally
    *rejected* probe is a candidate too (only a sound early reject or the whole split's rule rules
    a probe out): near the budget a screen of a few hundred examples errs either way, and a wrong
    reject would otherwise cost the search the smaller rate for good. So the container returned is
    the smallest probe that passed the whole split's rule or an early accept, as if every probe
    had been scored whole, and the search's scoring is the base's pass, the screening, and one
    verification per candidate smaller than the answer (stopped early where the bounds decide)
    plus the one that holds. An unverified entry that is still ``provisional`` belongs to a larger
    probe than the one returned.

    Each entry also has ``examples_scored`` of ``split_examples``, its ``compress_seconds`` and
    ``score_seconds`` (the screen; and the compressor's ``compress_stage_seconds`` where it records
    them), and a verified one ``verify_seconds`` (part of its ``seconds`` when verified before
    steering; ``stage_seconds["verify"]`` sums both kinds). The best container is saved to ``out_dir`` (when given), its
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
    allowed = max_drop_pt * src.task.budget_share  # what each probe's drop plus its standard error must fit
    screen = screening_size(src.split_examples, probes)
    main_process = is_main(accelerator)
    lo, hi = math.log(bpw_range[0]), math.log(bpw_range[1])
    log, candidates = [], []
    probes_start = time.perf_counter()
    bar = tqdm(total=probes, desc="rate search", unit="probe", disable=not (progress and main_process))
    for index in range(1, probes + 1):
        bpw = math.exp((lo + hi) / 2)
        probe_start = time.perf_counter()
        bar.set_description(f"rate search: compressing at {bpw:.3f} bits/weight")
        probe = src.compress(dataclasses.replace(config, target_bits_per_weight=bpw, beta=None), finetune_config,
                             accelerator, progress=progress)
        compressed_at = time.perf_counter()
        bar.set_description(f"rate search: scoring {bpw:.3f} bits/weight on {selection['split']!r}")
        validation, scores, verify_seconds = _screen(src, probe, max_drop_pt, screen, allowed, probes) \
            if main_process else ({}, None, 0.0)
        inline = _agreed(accelerator, validation.get("verified", False))
        accepted = _agreed(accelerator, validation.get("within_budget", False))
        provisional = _agreed(accelerator, validation.get("provisional", False))
        report = probe.report()
        seconds = time.perf_counter() - probe_start
        compress_seconds = compressed_at - probe_start
        score_seconds = seconds - compress_seconds - verify_seconds
        stages["compress"] = stages.get("compress", 0.0) + compress_seconds
        stages["score"] = stages.get("score", 0.0) + score_seconds
        if inline:
            stages["verify"] = stages.get("verify", 0.0) + verify_seconds
        log.append(dict(probe=index, probes=probes, target_bits_per_weight=bpw,
                        bits_per_weight=report["bits_per_weight"], bytes=report["total_bytes"],
                        accepted=accepted, **_scoring_fields(validation, src.paired),
                        screening_examples=screen, verified=inline, verified_before_steering=inline,
                        seconds=round(seconds, 2), compress_seconds=round(compress_seconds, 2),
                        score_seconds=round(score_seconds, 2),
                        compress_stage_seconds=probe.stats.get("stage_seconds"),
                        estimated_seconds_left=round((probes - index) * (time.perf_counter() - probes_start) / index, 1)))
        if inline:
            log[-1]["verify_seconds"] = round(verify_seconds, 2)
        if main_process:
            _report_probe(log[-1], allowed, bar, on_probe)
        if accepted or provisional:  # a provisional reject is a guess too: verified if it is the smallest left
            candidates.append(_Candidate(probe, validation, scores, log[-1]))
        if accepted:
            hi = math.log(bpw)
        else:
            lo = math.log(bpw)
    bar.close()
    best, best_validation = _verified_smallest(src, candidates, max_drop_pt, allowed, accelerator, stages, on_probe)
    if best is not None and out_dir is not None and main_process:
        with timed(stages, "save"):
            src.save(best, out_dir)
    seconds = time.perf_counter() - start
    stages["other"] = max(seconds - sum(stages.values()), 0.0)
    return SearchResult(best, best_validation, log, seconds, {name: round(t, 3) for name, t in stages.items()})


def _screen(src: Source, probe: CompressedModel, max_drop_pt: float, screen: int, allowed: float,
            probes: int) -> tuple[dict, np.ndarray | None, float]:
    """A probe's validation and scores after its screen, and the seconds spent scoring it on: a
    provisional guess too close to the budget to steer on
    (:func:`~hf_vae_compress.sequential.guess_is_decisive`) is scored on at once, from where the
    screen paused, to a sound verdict (its validation is then ``verified``)."""
    validation, scores = src.judge(probe, max_drop_pt, early_stop=True, screen=screen)
    if not validation["provisional"] or guess_is_decisive(src.base_scores[:len(scores)], scores,
                                                          src.split_examples, allowed, probes):
        return validation, scores, 0.0
    began = time.perf_counter()
    validation, scores = src.judge(probe, max_drop_pt, scored=scores)
    return validation, scores, time.perf_counter() - began


def _scoring_fields(validation: dict, paired: bool) -> dict:
    """What a probe's log entry says about its scoring, from :meth:`~hf_vae_compress.pipeline.Source.judge`'s dict (empty on
    processes that do not score)."""
    return dict(validation_drop_pt=validation.get("drop_pt", 0.0),
                validation_drop_se_pt=validation.get("drop_se_pt") if paired else None,
                examples_scored=validation.get("examples"), split_examples=validation.get("split_examples"),
                early_stop=validation.get("early_stop"), full_split_bounds_pt=validation.get("full_split_bounds_pt"),
                provisional=validation.get("provisional", False))


def _verified_smallest(src: Source, candidates: list[_Candidate], max_drop_pt: float, allowed: float, accelerator,
                       stages: dict[str, float], on_probe: ProbeReport | None) -> tuple[CompressedModel | None,
                                                                                         dict | None]:
    """The smallest candidate whose final verdict is an accept, and its validation: a provisional
    one (accepted or rejected on its screen) is scored on from where its screening paused
    (:meth:`~hf_vae_compress.pipeline.Source.judge` with its ``scored``), smallest first, until one holds; a final accept is
    taken as it is. Only the main process scores;
    every process takes the main process's verdicts in the same order."""
    main_process = is_main(accelerator)
    for candidate in sorted(candidates, key=lambda c: c.entry["bytes"]):
        validation = candidate.validation
        if main_process and validation["provisional"]:
            began = time.perf_counter()
            with timed(stages, "verify"):
                validation, candidate.scores = src.judge(candidate.compressed, max_drop_pt, scored=candidate.scores)
            entry = candidate.entry
            entry.update(accepted=validation["within_budget"], **_scoring_fields(validation, src.paired),
                         verified=True, verify_seconds=round(time.perf_counter() - began, 2))
            _report_probe(entry, allowed, None, on_probe)
        if _agreed(accelerator, validation.get("within_budget", False)):
            return candidate.compressed, validation
    return None, None


def _agreed(accelerator, accepted: bool) -> bool:
    """The main process's verdict on every process: only it scores, the others hold False."""
    if accelerator is None:
        return bool(accepted)
    return float(accelerator.reduce(torch.tensor(float(accepted)), reduction="sum")) > 0.5


def _report_probe(probe: dict, budget_pt: float, bar: tqdm | None, on_probe: ProbeReport | None) -> None:
    """Log a finished (or verified) probe, show its verdict on the bar, and hand it to the caller's
    report."""
    logger.info(describe_probe(probe, budget_pt))
    if bar is not None:
        bar.set_description("rate search")
        bar.set_postfix_str(f"last {probe['bits_per_weight']:.3f} bits/weight: "
                            f"{'accepted' if probe['accepted'] else 'rejected'}", refresh=False)
        bar.update()
    if on_probe is not None:
        on_probe(probe)


__all__ = ["SEARCH_PROBES", "SEARCH_RANGE_BPW", "ProbeReport", "SearchResult", "describe_probe", "search_smallest"]
