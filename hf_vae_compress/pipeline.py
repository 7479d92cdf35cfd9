"""Folder-level jobs shared by the CLI, the recipes and the benchmarks.

``compress`` writes the same folder that :func:`hf_vae_compress.hub.save_pretrained` writes: the
source's configs and preprocessing files, ``config.json`` with a ``quantization_config``, the
container in place of the weights, the remote-code shim and a model card. Every loader of
:mod:`hf_vae_compress.loading` (transformers, timm, remote code, the CLI) reads it.

Accuracy is measured, not assumed: :meth:`Source.validation_drop` measures the drop of any
container on the held-out split, and :func:`hf_vae_compress.search.search_smallest` searches for
the smallest container whose drop there stays within a budget. Both select only on data the model did not train on, by the rule of
:func:`hf_vae_compress.data.dataset_split`: the dataset's own validation split, else a half of
``test`` (the other half is left to report on), a hold-out of ``train`` only when there is
nothing else (flagged as possibly trained on), or the split the user names (``validation_split``).
Before any long work :meth:`Source.check_selection` scores the base model there: if it looks
memorised (see :func:`memorisation_check`), nothing measured there is called an accuracy check,
and a rate search refuses to start (:class:`UncheckedAccuracyError`). The measured drop, with how
its split was chosen, goes into ``CompressedModel.stats["validation"]`` for the JSON and the card.

The base model is scored there once. :meth:`Source.judge` scores a probe on a growing seeded
subset of the split and stops as soon as the whole split's verdict is decided
(:mod:`hf_vae_compress.sequential`), pauses it after a screen and resumes it later: the rate
search (:mod:`hf_vae_compress.search`) steers and verifies with it.

Without labels the same search runs on agreement with the original model
(:class:`~hf_vae_compress.tasks.Agreement`): on the user's unlabelled images (a dataset with no
labels), or, with no data at all and a :class:`~hf_vae_compress.synthetic.SyntheticConfig`, on
images made from the model, whose agreement is not accuracy and may use only a share of the budget
(``check`` and ``allowed_pt`` in ``stats["validation"]`` say which check decided the rate and what it
was held to).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import CompressedModel, Shard, VAECompressionConfig, compress
from .codec.calibration import Calibration, calibrate, release_freed_memory
from .data import HOLDOUT_MAX, is_unlabelled, stratified_sample
from .detection import OWN_BOX_SCORE
from .finetune import FinetuneConfig, finetune
from .hub import save_pretrained
from .loading import load_compressed, load_folder
from .models import load_model, resolve_folder
from .sequential import SCORING_SEED, STOPPING_ERROR, Verdict, early_verdict, look_sizes, provisional_accept
from .synthetic import SyntheticConfig
from .tasks import CHECK_LABELLED, CHECK_SYNTHETIC, Task, synthetic_task, task_for, unlabelled_task

logger = logging.getLogger(__name__)

# Standard errors by which the base model's accuracy on the selection split may exceed its accuracy
# on held-out comparison data before the split counts as memorised: a one-sided normal tail of
# 0.13 % under "it scores both alike" (see memorisation_check).
MEMORISATION_Z = 3.0
# Bits per weight when no data can check accuracy. Without data every tensor gets the same
# relative precision (no Fisher allocation), which costs compact models most: at 4.0 the
# data-free MobileNet reference lost 0.79 pt of test top-1 (benchmarks/results/default_compress.json).
# 6.0 quarters the error power again; the CLI still warns that nothing was checked.
UNCHECKED_BPW = 6.0
# Examples per model call when scoring per example (fewer up to a look): the progress bar's step.
# Not larger: at 224 px on 2 loaded cores 256 scored resnet50 about 1.35x faster per image but ViT-B
# no faster, and raised resnet50's peak RSS from 1.7 to 3.6 GB, past the fixed-rate path's 3 GB.
SCORE_BATCH = 64


@contextmanager
def timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``stages[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def _scored(task: Task, model: torch.nn.Module, data, order: np.ndarray, looks: list[int], progress: bool,
            desc: str, scored: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """``model``'s per-example scores on ``data`` in ``order``, yielded at each look size (every
    score so far), at most ``SCORE_BATCH`` examples per call, with a progress bar over the whole
    ``order`` whose estimate is the time left to score all of it. Stopping the iteration stops the
    scoring. ``scored`` are scores of the first examples already known (a paused probe's): they are
    not scored again, and looks they already cover are not yielded again."""
    scores, done = ([], 0) if scored is None else ([scored], len(scored))
    with tqdm(total=len(order), initial=done, desc=desc, unit="example", leave=False,
              disable=not progress) as bar:
        for size in (size for size in looks if size > done):
            for start in range(done, size, SCORE_BATCH):
                index = torch.as_tensor(order[start:min(start + SCORE_BATCH, size)])
                scores.append(task.per_example(model, task.subset(data, index)))
                bar.update(len(index))
            done = size
            yield np.concatenate(scores)


def accelerate_shard(accelerator) -> Shard | None:
    """A codec :class:`Shard` over accelerate's processes (None for a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return None

    def average(tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            t.copy_(accelerator.reduce(t, reduction="mean"))

    return Shard(accelerator.process_index, accelerator.num_processes, average)


def is_main(accelerator) -> bool:
    """Whether this process writes and scores (the only one without accelerate)."""
    return accelerator is None or accelerator.is_main_process


class UncheckedAccuracyError(ValueError):
    """An accuracy budget was asked for, but the selection split cannot check accuracy: the base
    model looks memorised there. Raised before the rate search's first probe."""


def memorisation_check(base: float, examples: int, comparison: tuple[float, int] | None,
                       known_held_out: bool) -> dict:
    """Whether the base model's score on the selection split (``base`` over ``examples``) says it
    trained on those examples.

    A model memorises what it trained on: it scores (near) 100 % there, and so do compressed
    copies of it that have lost accuracy everywhere else, so the drop measured there is too small
    (a 240x container measured at "0.0 pt" on memorised examples lost 3.3 pt of test top-1).

    * With ``comparison`` (score and size of held-out data of the same task, e.g. ``test`` when
      selecting on ``validation``): memorised when the selection score exceeds it by more than
      ``MEMORISATION_Z`` standard errors of a difference of two independent binomial proportions,
      ``sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)``. A split the model merely finds a little easier
      is not flagged (0.13 % false alarms when both score alike); a split it trained on, which it
      scores far higher than new data, is.
    * At 100 % on a split not ``known_held_out`` (carved from ``train``, or with nothing to compare
      with): there is no error left, so a model that trained on the split and one that is perfect
      on it look alike; the run cannot tell, so it claims no check.
    """
    result = dict(base=base, examples=examples, saturated=base >= 1.0, comparison=None, comparison_examples=None,
                  gap_pt=None, gap_se_pt=None, z_threshold=MEMORISATION_Z)
    above = False
    if comparison is not None:
        other, count = comparison
        se = math.sqrt(base * (1 - base) / examples + other * (1 - other) / count)
        gap = base - other
        above = gap > MEMORISATION_Z * se
        result.update(comparison=other, comparison_examples=count, gap_pt=100 * gap, gap_se_pt=100 * se)
    result["detected"] = above or (result["saturated"] and not known_held_out)
    return result


@dataclass
class Source:
    """A model to compress, with what every compression of it shares.

    The calibration statistics (Fisher, layer input moments, norm statistics) and the preprocessed
    held-out split are computed once, so a rate search's probes cost one compression and one
    scoring pass each.
    """

    folder: Path
    model: torch.nn.Module
    task: Task | None = None
    calibration: Calibration | None = None
    selection: dict | None = None  # from check_selection: where accuracy is checked and whether it can be
    progress: bool = True  # progress bars while scoring
    # seconds per stage of open and check_selection: model_load, data_prep, base_scoring,
    # memorisation_comparison, calibration (together, the time open took)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    _held_out: object = field(default=None, repr=False)
    _order: np.ndarray | None = field(default=None, repr=False)  # the order examples are scored in
    _base: tuple | None = field(default=None, repr=False)  # base metric, per-example scores in _order
    _scorer: torch.nn.Module | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)  # compress(last=True) dropped the calibration

    @classmethod
    def open(cls, source: str | Path, dataset: str | None, calibration_batches: int, progress: bool = True,
             calibration_seed: int = 0, validation_split: str | None = None, synthetic: SyntheticConfig | None = None,
             **hub_kwargs) -> "Source":
        """Load the model and, with a dataset, check its selection split (:meth:`check_selection`),
        then calibrate on ``calibration_batches`` batches drawn from its train split with
        ``calibration_seed``. ``validation_split`` names the split or slice the accuracy check
        selects on (``"test"``, ``"train[:10%]"``); None: the automatic rule (module docstring).

        A dataset without labels (:func:`~hf_vae_compress.data.is_unlabelled`) is split into
        calibration and check images; without a dataset, ``synthetic`` makes both from the model
        (None: no data at all, nothing calibrated or checked).

        ``stage_seconds`` says where the time went (see the field); making synthetic images and
        preprocessing the check's data count as ``data_prep``."""
        stages: dict[str, float] = {}
        with timed(stages, "model_load"):
            folder = resolve_folder(str(source), **hub_kwargs)
            model = load_model(folder)
        with timed(stages, "data_prep"):
            task = _open_task(model, dataset, calibration_batches, calibration_seed, validation_split, synthetic,
                              progress)
        src = cls(folder, model, task, progress=progress, stage_seconds=stages)
        if task is None:
            return src
        src.check_selection()
        with timed(stages, "calibration"):
            batches, loss_fn = task.calibration(model, calibration_batches, calibration_seed)
            src.calibration = calibrate(model, batches, len(batches), loss_fn, progress=progress)
        return src

    def check_selection(self) -> dict:
        """Where the accuracy check selects and whether it can call itself one, computed once.

        Scores the base model on the task's selection split once (its per-example scores are
        what every probe is paired with; an :class:`~hf_vae_compress.tasks.Agreement` classifier's
        are known without scoring) and, where the task has per-example scores and the dataset a
        comparison split, on a stratified sample of it (:meth:`_comparison`), then runs
        :func:`memorisation_check`. The dict is the task's :class:`~hf_vae_compress.data.Selection`
        plus ``memorisation``, ``accuracy_checked`` and ``warning`` (None when there is nothing to
        warn about); warnings are also logged. Times its stages into ``stage_seconds``.
        """
        if self.selection is not None:
            return self.selection
        task = self.task
        with timed(self.stage_seconds, "data_prep"):
            chosen = task.selection()
            self._held_out = task.prepare(self.model, task.load(chosen.split))
            self._order = np.random.default_rng(SCORING_SEED).permutation(task.num_examples(self._held_out))
        with timed(self.stage_seconds, "base_scoring"):
            own = task.own_scores(self._held_out)  # in the data's order: probes are scored in _order
            self._base = (float(own.mean()), own[self._order]) if own is not None else self._measure(self.model)
            self._scorer = copy.deepcopy(self.model)
        if task.check != CHECK_LABELLED:
            return self._agreement_selection(chosen)
        base, base_examples = self._base
        comparison = None
        if base_examples is not None and chosen.comparison_split is not None:
            with timed(self.stage_seconds, "memorisation_comparison"):
                comparison = self._comparison(chosen.comparison_split, len(base_examples))
        memorisation = memorisation_check(base, task.num_examples(self._held_out), comparison,
                                          known_held_out=comparison is not None and not chosen.trained_on_risk)
        warning = None
        if memorisation["detected"]:
            versus = "" if comparison is None else \
                f" against {100 * comparison[0]:.2f} % on {chosen.comparison_split!r}"
            warning = (f"the base model scores {100 * base:.2f} % on the selection split {chosen.split!r}{versus}: "
                       "it has likely trained on these examples, so the drop measured there is not an accuracy check "
                       f"({chosen.description}) Name held-out data with validation_split (--validation-split)"
                       f"{f', e.g. {chosen.comparison_split!r}' if comparison else ''}, or give a fixed rate.")
        elif chosen.trained_on_risk:
            warning = (f"the accuracy check selects on {chosen.split!r} ({chosen.description}) If the model trained "
                       "on them, the measured drop is too small: name held-out data with validation_split "
                       "(--validation-split).")
        logger.info("accuracy check on %s: %s", chosen.split, chosen.description)
        if warning:
            logger.warning(warning)
        self.selection = dict(chosen.as_dict(), check=task.check, memorisation=memorisation,
                              accuracy_checked=not memorisation["detected"], rate_checked=not memorisation["detected"],
                              warning=warning)
        return self.selection

    def _comparison(self, split: str, examples: int) -> tuple[float, int]:
        """The base model's score on a stratified sample of the comparison ``split`` as large as the
        selection split (``examples``, at most ``HOLDOUT_MAX``), and the sample's size.

        Why that size: :func:`memorisation_check` flags a gap over ``MEMORISATION_Z`` standard errors
        of the difference, ``sqrt(v1 / n1 + v2 / n2)``. With ``n2 = n1`` the comparison adds no more
        noise than the selection split already has, so the smallest gap it flags is at most
        ``sqrt(2)`` times (1.3 times at 1,000 against the 5,000 scored before) what a comparison of
        any size could flag; memorisation, which the check exists for, opens gaps of many standard
        errors (100 % on what the model trained on against its accuracy elsewhere) and is flagged
        either way. A larger sample would cost more base-model passes than the whole selection
        split, for a threshold at most that factor lower.
        """
        task = self.task
        held = task.prepare(self.model, stratified_sample(task.load(split), min(examples, HOLDOUT_MAX)))
        count = task.num_examples(held)
        *_, scores = _scored(task, self.model, held, np.arange(count), [count], self.progress,
                             f"memorisation check: base model on {split!r}")
        return float(scores.mean()), count

    def _agreement_selection(self, chosen) -> dict:
        """The selection of an :class:`~hf_vae_compress.tasks.Agreement` check: no memorisation test
        (the original agrees with itself by construction), a rate it can decide, and an accuracy
        check only where disagreement bounds the drop on the user's own images (a classifier's).
        Synthetic images are never called an accuracy check."""
        task = self.task
        warning = None
        decidable = not task.detector or any(len(o["category"]) for o in self._held_out[1])
        if not decidable:
            bar = task.unsure_scores[1] if task.unsure_scores else OWN_BOX_SCORE  # synthetic images: sure boxes only
            warning = (f"the original detector finds no box it scores at least {bar:.2f} on the "
                       f"{task.num_examples(self._held_out):,} {chosen.split} images: there is nothing to agree on, so "
                       "no rate can be checked there. Give --dataset with images of what it detects, or a fixed rate.")
            logger.warning(warning)
        elif task.check == CHECK_SYNTHETIC:
            warning = (f"accuracy was not checked: no dataset was given, so the rate was chosen by {task.check} "
                       f"({task.num_examples(self._held_out):,} images made from the model), held to "
                       f"{task.budget_share:.0%} of the budget. Agreement on synthetic images is not accuracy: "
                       "check the model on your data before relying on it, or pass --dataset (unlabelled images "
                       "are enough).")
            logger.warning(warning)
        logger.info("rate check: %s", chosen.description)
        self.selection = dict(chosen.as_dict(), check=task.check, memorisation=None,
                              accuracy_checked=task.check != CHECK_SYNTHETIC and not task.detector,
                              rate_checked=decidable, warning=warning)
        return self.selection

    def compress(self, config: VAECompressionConfig, finetune_config: FinetuneConfig | None = None,
                 accelerator=None, checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 progress: bool = True, last: bool = False) -> CompressedModel:
        """Post-hoc compression at ``config``'s rate, then fine-tuning when ``finetune_config`` asks.

        ``last``: no compression of this source follows (a fixed rate compresses once). Each
        layer's input moments then make way for its GPTQ factor (:attr:`Calibration.single_use`),
        and the calibration is released before fine-tuning and the accuracy report: a fixed-rate
        resnet50 at 224 px otherwise held 0.9 GB of statistics through its report's scoring, where
        its RSS peaked. A later call is refused."""
        if self._released:
            raise RuntimeError("this source's calibration was released by its last compression: open it again")
        if last and self.calibration is not None:
            self.calibration.single_use = True
        try:
            compressed = compress(self.model, config, progress=progress, shard=accelerate_shard(accelerator),
                                  calibration=self.calibration)
        finally:  # a failed last compression has dropped moments too: a retry is refused, not run on them
            if last:
                self.calibration, self._released = None, True
                release_freed_memory()
        if finetune_config is not None and finetune_config.steps > 0:
            if self.task is None:
                raise ValueError("fine-tuning needs a dataset")
            teacher = copy.deepcopy(self.model)  # fine-tuning freezes the model it is given
            compressed = finetune(compressed, teacher, self.task.train_data(teacher), finetune_config, accelerator,
                                  checkpoint_dir, resume_from, progress, self.task)
        return compressed

    def validation_drop(self, compressed: CompressedModel, budget_pt: float | None = None,
                        early_stop: bool = False) -> dict:
        """The task metric of the base and of the decoded container on the selection split, the
        drop in points, and the budget it is held to (the task's unless given); also stored as
        ``compressed.stats["validation"]``, for the JSON and the model card.

        Where the metric is a mean over examples (top-1), ``drop_se_pt`` is the standard error of
        the paired drop (the same examples scored by both models), and ``within_budget`` asks that
        the drop *plus* one standard error fit: a search that keeps the smallest of many noisy
        probes otherwise picks one whose drop was measured low (on 5,000 examples the noise is
        about 0.2 pt, as large as the budget's margin). On a split where the base model looks
        memorised, ``accuracy_checked`` is False and nothing is ``within_budget``. ``selection``
        says in words which split was scored and how it was chosen, ``report_split`` where the
        final model should be reported, ``trained_on_risk`` whether the model may have trained on
        the split, ``warning`` what to tell the user (None: nothing). ``check`` names the kind of check
        (:data:`~hf_vae_compress.tasks.CHECKS`); the drop plus its standard error must fit
        ``allowed_pt``, the budget times the check's ``budget_share``; ``synthetic`` says how
        synthetic images were made and what they cost (None: real images).

        With ``early_stop`` (the rate search's probes) a per-example metric is scored on a growing
        seeded subset and stops once the full split's verdict is decided
        (:mod:`hf_vae_compress.sequential`): ``examples`` is then how many were scored (of
        ``split_examples``), ``base``, ``compressed``, the drop and its standard error are measured
        on those, ``early_stop`` says ``"accepted"`` or ``"rejected"`` (None: the whole split was
        scored and the rule above decided), and ``full_split_bounds_pt`` bounds the whole split's
        drop plus standard error (wrong with probability at most ``stopping_error``). The search
        screens and verifies its probes through :meth:`judge`, which adds ``provisional`` and
        ``verified``.
        """
        return self.judge(compressed, budget_pt, early_stop)[0]

    def judge(self, compressed: CompressedModel, budget_pt: float | None = None, early_stop: bool = False,
              screen: int | None = None, scored: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
        """:meth:`validation_drop`'s dict, and the container's per-example scores in the scoring
        order (None for a whole-set metric), for a search to pause and resume a probe's scoring.

        ``screen`` (with ``early_stop``, a look size) pauses the looks there: a probe not decided by
        then is ``provisional``, its ``within_budget`` the rule of :meth:`validation_drop` predicted
        for the whole split from the ``examples`` scored (their drop plus the standard error the
        whole split would have), which is a guess to steer a search, not a verdict. ``scored`` (a paused probe's scores) resumes its looks after those
        examples, to a sound verdict or the whole split (``verified``); they are not scored again.
        """
        task = self.task
        selection = self.check_selection()
        self._scorer.load_state_dict(compressed.decode(), strict=True)  # exactly the weights a loader gets
        budget = task.budget_pt if budget_pt is None else budget_pt
        allowed = budget * task.budget_share
        base, base_examples = self._base
        total = task.num_examples(self._held_out)
        verdict = None
        if (early_stop or scored is not None) and self.paired:
            examples, verdict = self._sequential(self._scorer, allowed, screen, scored)
            score = float(examples.mean())
        else:
            score, examples = self._measure(self._scorer)
        se = 0.0
        if examples is not None:
            paired = base_examples[:len(examples)]  # the base on the same examples
            base = float(paired.mean())
            if len(examples) > 1:
                se = float(100 * np.std(paired - examples, ddof=1) / np.sqrt(len(examples)))
        drop = 100 * (base - score)
        scored_examples = total if examples is None else len(examples)
        within = provisional_accept(drop, se, scored_examples, total, allowed) if verdict is None \
            else verdict.accepted
        result = dict(metric=task.metric, check=selection["check"], split=selection["split"],
                      examples=scored_examples, split_examples=total,
                      base=base, compressed=score, drop_pt=drop, drop_se_pt=se, budget_pt=budget,
                      budget_share=task.budget_share, allowed_pt=allowed,
                      within_budget=selection["rate_checked"] and within,
                      early_stop=None if verdict is None else "accepted" if verdict.accepted else "rejected",
                      full_split_bounds_pt=None if verdict is None else [verdict.low_pt, verdict.high_pt],
                      stopping_error=None if verdict is None else STOPPING_ERROR,
                      provisional=verdict is None and scored_examples < total, verified=scored is not None,
                      holdout=selection["holdout"],
                      selection=selection["description"], report_split=selection["report_split"],
                      trained_on_risk=selection["trained_on_risk"], accuracy_checked=selection["accuracy_checked"],
                      rate_checked=selection["rate_checked"], memorisation=selection["memorisation"],
                      warning=selection["warning"], synthetic=getattr(task, "synthetic", None))
        compressed.stats["validation"] = result
        return result, examples

    def _sequential(self, model: torch.nn.Module, allowed_pt: float, screen: int | None = None,
                    scored: np.ndarray | None = None) -> tuple[np.ndarray, Verdict | None]:
        """``model``'s per-example scores on the selection split, in the scoring order, up to the
        first look that decides the full split's verdict (None: none did, and all examples, or the
        ``screen`` first, were scored), resuming after ``scored`` when given. The bounds count every
        look of the whole split whether or not a screen pauses them (:func:`look_sizes`)."""
        base = self._base[1]
        looks = look_sizes(len(base))
        stop = len(base) if screen is None else screen
        scores = scored
        for scores in _scored(self.task, model, self._held_out, self._order, [s for s in looks if s <= stop],
                              self.progress, "scoring probe" if scored is None else "verifying probe", scored):
            verdict = early_verdict(base[:len(scores)], scores, len(base), allowed_pt, len(looks) - 1)
            if verdict is not None and verdict.accepted is not None:
                return scores, verdict
        return scores, None

    def _measure(self, model: torch.nn.Module) -> tuple[float, np.ndarray | None]:
        """The metric on the held-out split, and the per-example scores (in the scoring order)
        where the metric has them."""
        if not self.task.per_example_metric:
            return self.task.score(model, self._held_out)[self.task.metric], None
        total = len(self._order)
        *_, examples = _scored(self.task, model, self._held_out, self._order, [total], self.progress, "scoring")
        return float(examples.mean()), examples

    @property
    def split_examples(self) -> int:
        """How many examples the selection split has (it is prepared by :meth:`check_selection`)."""
        self.check_selection()
        return self.task.num_examples(self._held_out)

    @property
    def base_scores(self) -> np.ndarray | None:
        """The base model's per-example scores on the selection split in the scoring order, what
        every probe's are paired with (None for a whole-set metric)."""
        self.check_selection()
        return self._base[1]

    @property
    def paired(self) -> bool:
        """Whether the metric is scored per example (top-1), so that a drop has a standard error;
        a whole-set metric (mAP) has none."""
        return self._base is not None and self._base[1] is not None

    def save(self, compressed: CompressedModel, out_dir: str | Path) -> Path:
        return save_pretrained(compressed, self.folder, out_dir)


def _open_task(model: torch.nn.Module, dataset: str | None, calibration_batches: int, seed: int,
               validation_split: str | None, synthetic: SyntheticConfig | None, progress: bool) -> Task | None:
    """The task that checks compressions of ``model``: labelled data, the user's unlabelled images,
    synthetic images (no dataset, ``synthetic`` given), or none. Unlabelled and synthetic images are
    the check themselves, so a ``validation_split`` is refused for them."""
    if validation_split is not None and (not dataset or is_unlabelled(dataset)):
        raise ValueError(f"validation_split {validation_split!r} needs a labelled dataset to take it from")
    if not dataset:
        return synthetic_task(model, synthetic, progress) if synthetic is not None else None
    if is_unlabelled(dataset):
        return unlabelled_task(model, dataset, calibration_batches, seed)
    return task_for(model, dataset, validation_split)


def compress_folder(source: str, out_dir: str | Path, config: VAECompressionConfig,
                    dataset: str | None = None, progress: bool = True,
                    finetune_config: FinetuneConfig | None = None, accelerator=None,
                    checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                    validation_split: str | None = None, **hub_kwargs) -> CompressedModel:
    """Compress a local or Hub model folder into ``out_dir`` at ``config``'s rate, optionally
    fine-tuning on ``dataset``. With a dataset, the drop on the selection split (``validation_split``,
    or the automatic rule) is measured and saved with the container (``stats["validation"]``).

    Under ``accelerate launch`` pass the ``accelerator``: the VAE fit is sharded and fine-tuning
    is data-parallel; every process computes the result and the main process writes it.
    """
    src = Source.open(source, dataset, config.calibration_batches, progress, validation_split=validation_split,
                      **hub_kwargs)
    compressed = src.compress(config, finetune_config, accelerator, checkpoint_dir, resume_from, progress, last=True)
    if is_main(accelerator):
        if src.task is not None:
            src.validation_drop(compressed)
        src.save(compressed, out_dir)
    return compressed


def load_any(source: str | Path, **hub_kwargs) -> tuple[torch.nn.Module, Path, float]:
    """Load a compressed or plain folder (or Hub id); returns the model, its folder and load seconds."""
    folder = resolve_folder(str(source), **hub_kwargs)
    start = time.perf_counter()
    model = load_folder(folder)
    return model, folder, time.perf_counter() - start


__all__ = ["MEMORISATION_Z", "UNCHECKED_BPW", "Source", "UncheckedAccuracyError", "compress_folder", "is_main",
           "load_any", "load_compressed", "memorisation_check", "timed"]
