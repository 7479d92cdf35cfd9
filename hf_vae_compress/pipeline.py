"""Folder-level jobs shared by the CLI, the recipes and the benchmarks.

``compress`` writes the same folder that :func:`hf_vae_compress.hub.save_pretrained` writes: the
source's configs and preprocessing files, ``config.json`` with a ``quantization_config``, the
container in place of the weights, the remote-code shim and a model card. Every loader of
:mod:`hf_vae_compress.loading` (transformers, timm, remote code, the CLI) reads it.

Accuracy is measured, not assumed: :func:`search_smallest` returns the smallest container whose
drop on the held-out split stays within a budget, and :meth:`Source.validation_drop` measures the
drop of any container. Both select only on data the model did not train on, by the rule of
:func:`hf_vae_compress.data.dataset_split`: the dataset's own validation split, else a half of
``test`` (the other half is left to report on), a hold-out of ``train`` only when there is
nothing else (flagged as possibly trained on), or the split the user names (``validation_split``).
Before any long work :meth:`Source.check_selection` scores the base model there: if it looks
memorised (see :func:`memorisation_check`), nothing measured there is called an accuracy check,
and a rate search refuses to start (:class:`UncheckedAccuracyError`). The measured drop, with how
its split was chosen, goes into ``CompressedModel.stats["validation"]`` for the JSON and the card.

The base model is scored there once. A rate search's probes are scored on a growing seeded subset
of the split and stop as soon as the whole split's verdict is decided
(:mod:`hf_vae_compress.sequential`: a probe far from the budget costs a fraction of a pass). A probe
still undecided after its share of one screening pass gets a provisional verdict that only steers
the bisection; at the end the smallest provisionally accepted probe is scored on to a sound verdict
(the whole split, judged by the same rule as before, at the latest), the next larger while it fails.

Without labels the same search runs on agreement with the original model
(:class:`~hf_vae_compress.tasks.Agreement`): on the user's unlabelled images (a dataset with no
labels), or, with no data at all and a :class:`~hf_vae_compress.synthetic.SyntheticConfig`, on
images made from the model, whose agreement is not accuracy and may use only a share of the budget
(``check`` and ``allowed_pt`` in ``stats["validation"]`` say which check decided the rate and what it
was held to).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import CompressedModel, Shard, VAECompressionConfig, compress
from .codec.calibration import Calibration, calibrate
from .data import HOLDOUT_MAX, is_unlabelled, stratified_sample
from .detection import OWN_BOX_SCORE
from .finetune import FinetuneConfig, finetune
from .hub import save_pretrained
from .loading import load_compressed, load_folder
from .models import load_model, resolve_folder
from .sequential import (SCORING_SEED, STOPPING_ERROR, Verdict, early_verdict, look_sizes, provisional_accept,
                         screening_size)
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
SEARCH_RANGE_BPW = (0.125, 8.0)
SEARCH_PROBES = 6
# Examples per model call when scoring per example (fewer up to a look): the progress bar's step.
# Not larger: at 224 px on 2 loaded cores 256 scored resnet50 about 1.35x faster per image but ViT-B
# no faster, and raised resnet50's peak RSS from 1.7 to 3.6 GB, past the fixed-rate path's 3 GB.
SCORE_BATCH = 64


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
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


def _is_main(accelerator) -> bool:
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
        with _timed(stages, "model_load"):
            folder = resolve_folder(str(source), **hub_kwargs)
            model = load_model(folder)
        with _timed(stages, "data_prep"):
            task = _open_task(model, dataset, calibration_batches, calibration_seed, validation_split, synthetic,
                              progress)
        src = cls(folder, model, task, progress=progress, stage_seconds=stages)
        if task is None:
            return src
        src.check_selection()
        with _timed(stages, "calibration"):
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
        with _timed(self.stage_seconds, "data_prep"):
            chosen = task.selection()
            self._held_out = task.prepare(self.model, task.load(chosen.split))
            self._order = np.random.default_rng(SCORING_SEED).permutation(task.num_examples(self._held_out))
        with _timed(self.stage_seconds, "base_scoring"):
            own = task.own_scores(self._held_out)
            self._base = (float(own.mean()), own) if own is not None else self._measure(self.model)
            self._scorer = copy.deepcopy(self.model)
        if task.check != CHECK_LABELLED:
            return self._agreement_selection(chosen)
        base, base_examples = self._base
        comparison = None
        if base_examples is not None and chosen.comparison_split is not None:
            with _timed(self.stage_seconds, "memorisation_comparison"):
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
            warning = (f"the original detector finds no box it scores at least {OWN_BOX_SCORE} on the "
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
                 progress: bool = True) -> CompressedModel:
        """Post-hoc compression at ``config``'s rate, then fine-tuning when ``finetune_config`` asks."""
        compressed = compress(self.model, config, progress=progress, shard=accelerate_shard(accelerator),
                              calibration=self.calibration)
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
    compressed = src.compress(config, finetune_config, accelerator, checkpoint_dir, resume_from, progress)
    if _is_main(accelerator):
        if src.task is not None:
            src.validation_drop(compressed)
        src.save(compressed, out_dir)
    return compressed


@dataclass
class SearchResult:
    """The outcome of :func:`search_smallest`: the chosen container (None if no probe fit), its
    measured drop, every probe, and the wall-clock seconds of the whole search.

    ``stage_seconds`` splits ``seconds`` by stage and adds up to it: the stages of
    :meth:`Source.open` run inside the search (none when it is handed an opened source, whose own
    ``stage_seconds`` has them), ``compress`` and ``score`` summed over the probes, ``verify`` for
    scoring provisionally accepted probes on after the last one (absent when none was), ``save``,
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
    A verified probe gets a second line, its final verdict and what the verification took."""
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
    left = probe["probes"] - probe["probe"]
    if probe.get("verified"):
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
    :meth:`Source.validation_drop`) and up after one that does not. Each probe is a full
    compression (and fine-tuning, when configured) from one shared calibration pass, judged on
    the selection split (``validation_split``, or the automatic rule: see the module docstring).

    **Screen, then verify** (:mod:`hf_vae_compress.sequential`). On top-1 or agreement a probe is
    scored on a growing seeded subset and keeps a verdict decided soundly on part of the split
    (``early_stop``; at most :data:`~hf_vae_compress.sequential.STOPPING_ERROR` chance that the
    whole split would say otherwise), but is scored on at most ``screening_examples``
    (:func:`~hf_vae_compress.sequential.screening_size`: all probes together, one pass of the
    split). A probe undecided there is ``provisional``: its ``accepted`` is the rule applied to
    the examples scored, a guess that steers the bisection and is never returned as it is. After
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
    ``score_seconds`` (and the compressor's ``compress_stage_seconds`` where it records them), and
    a verified one ``verify_seconds``. The best container is saved to ``out_dir`` (when given), its
    drop in ``stats["validation"]``.

    A probe takes minutes on a busy machine, so the search is never silent: with ``progress`` a
    bar over the probes names the stage of the current one and shows the last verdict and the time
    left; every probe is logged (:func:`describe_probe`) and, on the main process, handed to
    ``on_probe`` as the entry of ``SearchResult.probes`` it adds (the CLI prints it), and again
    when it is verified. ``estimated_seconds_left`` is the probes left times the mean time of the
    probes so far.

    Where the base model looks memorised on the selection split, :class:`UncheckedAccuracyError`
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
    main_process = _is_main(accelerator)
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
        validation, scores = src.judge(probe, max_drop_pt, early_stop=True, screen=screen) if main_process \
            else ({}, None)
        accepted = _agreed(accelerator, validation.get("within_budget", False))
        provisional = _agreed(accelerator, validation.get("provisional", False))
        report = probe.report()
        seconds = time.perf_counter() - probe_start
        compress_seconds, score_seconds = compressed_at - probe_start, seconds - (compressed_at - probe_start)
        stages["compress"] = stages.get("compress", 0.0) + compress_seconds
        stages["score"] = stages.get("score", 0.0) + score_seconds
        log.append(dict(probe=index, probes=probes, target_bits_per_weight=bpw,
                        bits_per_weight=report["bits_per_weight"], bytes=report["total_bytes"],
                        accepted=accepted, **_scoring_fields(validation, src.paired),
                        screening_examples=screen, verified=False,
                        seconds=round(seconds, 2), compress_seconds=round(compress_seconds, 2),
                        score_seconds=round(score_seconds, 2),
                        compress_stage_seconds=probe.stats.get("stage_seconds"),
                        estimated_seconds_left=round((probes - index) * (time.perf_counter() - probes_start) / index, 1)))
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
        with _timed(stages, "save"):
            src.save(best, out_dir)
    seconds = time.perf_counter() - start
    stages["other"] = max(seconds - sum(stages.values()), 0.0)
    return SearchResult(best, best_validation, log, seconds, {name: round(t, 3) for name, t in stages.items()})


def _scoring_fields(validation: dict, paired: bool) -> dict:
    """What a probe's log entry says about its scoring, from :meth:`Source.judge`'s dict (empty on
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
    (:meth:`Source.judge` with its ``scored``), smallest first, until one holds; a final accept is
    taken as it is. Only the main process scores;
    every process takes the main process's verdicts in the same order."""
    main_process = _is_main(accelerator)
    for candidate in sorted(candidates, key=lambda c: c.entry["bytes"]):
        validation = candidate.validation
        if main_process and validation["provisional"]:
            began = time.perf_counter()
            with _timed(stages, "verify"):
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


def load_any(source: str | Path, **hub_kwargs) -> tuple[torch.nn.Module, Path, float]:
    """Load a compressed or plain folder (or Hub id); returns the model, its folder and load seconds."""
    folder = resolve_folder(str(source), **hub_kwargs)
    start = time.perf_counter()
    model = load_folder(folder)
    return model, folder, time.perf_counter() - start


__all__ = ["MEMORISATION_Z", "UNCHECKED_BPW", "ProbeReport", "SearchResult", "Source", "UncheckedAccuracyError",
           "compress_folder", "describe_probe", "load_any", "load_compressed", "memorisation_check", "search_smallest"]
