"""Folder-level jobs shared by the CLI, the recipes and the benchmarks.

``compress`` writes the same folder that :func:`hf_vae_compress.hub.save_pretrained` writes: the
source's configs and preprocessing files, ``config.json`` with a ``quantization_config``, the
container in place of the weights, the remote-code shim and a model card. Every loader of
:mod:`hf_vae_compress.loading` (transformers, timm, remote code, the CLI) reads it.

Accuracy is measured, not assumed: :func:`search_smallest` returns the smallest container whose
drop on the held-out split stays within a budget, and :meth:`Source.validation_drop` measures the
drop of any container. Both score the model on ``validation`` (carved from ``train`` when a
dataset has none), never on ``test``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .codec import CompressedModel, Shard, VAECompressionConfig, compress
from .codec.calibration import Calibration, calibrate
from .finetune import FinetuneConfig, finetune
from .loading import load_compressed, load_folder
from .models import load_model, resolve_folder
from .tasks import Task, task_for

logger = logging.getLogger(__name__)

SELECTION_SPLIT = "validation"  # rate search judges accuracy here, never on test
# Bits per weight when no data can check accuracy. Without data every tensor gets the same
# relative precision (no Fisher allocation), which costs compact models most: at 4.0 the
# data-free MobileNet reference lost 0.79 pt of test top-1 (benchmarks/results/default_compress.json).
# 6.0 quarters the error power again; the CLI still warns that nothing was checked.
UNCHECKED_BPW = 6.0
SEARCH_RANGE_BPW = (0.125, 8.0)
SEARCH_PROBES = 6


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
    _held_out: object = field(default=None, repr=False)
    _base: tuple | None = field(default=None, repr=False)
    _scorer: torch.nn.Module | None = field(default=None, repr=False)

    @classmethod
    def open(cls, source: str | Path, dataset: str | None, calibration_batches: int, progress: bool = True,
             calibration_seed: int = 0, **hub_kwargs) -> "Source":
        """Load the model and, with a dataset, calibrate on ``calibration_batches`` batches drawn
        from its train split with ``calibration_seed``."""
        folder = resolve_folder(str(source), **hub_kwargs)
        model = load_model(folder)
        if not dataset:
            return cls(folder, model)
        task = task_for(model, dataset)
        batches, loss_fn = task.calibration(model, calibration_batches, calibration_seed)
        return cls(folder, model, task, calibrate(model, batches, calibration_batches, None, loss_fn, progress))

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

    def validation_drop(self, compressed: CompressedModel, budget_pt: float | None = None) -> dict:
        """The task metric of the base and of the decoded container on the held-out split, the drop
        in points, and the budget it is held to (the task's unless given).

        Where the metric is a mean over examples (top-1), ``drop_se_pt`` is the standard error of
        the paired drop (the same examples scored by both models), and ``within_budget`` asks that
        the drop *plus* one standard error fit: a search that keeps the smallest of many noisy
        probes otherwise picks one whose drop was measured low (on 5,000 examples the noise is
        about 0.2 pt, as large as the budget's margin).
        """
        task = self.task
        if self._held_out is None:
            self._held_out = task.prepare(self.model, task.load(SELECTION_SPLIT))
            self._base = self._measure(self.model)
            self._scorer = copy.deepcopy(self.model)
        self._scorer.load_state_dict(compressed.decode(), strict=True)  # exactly the weights a loader gets
        (base, base_examples), (score, examples) = self._base, self._measure(self._scorer)
        drop = 100 * (base - score)
        se = 0.0
        if examples is not None and len(examples) > 1:
            se = float(100 * np.std(base_examples - examples, ddof=1) / np.sqrt(len(examples)))
        budget = task.budget_pt if budget_pt is None else budget_pt
        return dict(metric=task.metric, split=SELECTION_SPLIT, examples=task.num_examples(self._held_out),
                    base=base, compressed=score, drop_pt=drop, drop_se_pt=se, budget_pt=budget,
                    within_budget=drop + se <= budget, holdout=task.holdout())

    def _measure(self, model: torch.nn.Module) -> tuple[float, np.ndarray | None]:
        """The metric on the held-out split, and the per-example scores where the metric has them."""
        examples = self.task.per_example(model, self._held_out)
        if examples is not None:
            return float(examples.mean()), examples
        return self.task.score(model, self._held_out)[self.task.metric], None

    def save(self, compressed: CompressedModel, out_dir: str | Path) -> Path:
        from .hub import save_pretrained  # hub imports this module's loaders

        return save_pretrained(compressed, self.folder, out_dir)


def compress_folder(source: str, out_dir: str | Path, config: VAECompressionConfig,
                    dataset: str | None = None, progress: bool = True,
                    finetune_config: FinetuneConfig | None = None, accelerator=None,
                    checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                    **hub_kwargs) -> CompressedModel:
    """Compress a local or Hub model folder into ``out_dir`` at ``config``'s rate, optionally
    fine-tuning on ``dataset``.

    Under ``accelerate launch`` pass the ``accelerator``: the VAE fit is sharded and fine-tuning
    is data-parallel; every process computes the result and the main process writes it.
    """
    src = Source.open(source, dataset, config.calibration_batches, progress, **hub_kwargs)
    compressed = src.compress(config, finetune_config, accelerator, checkpoint_dir, resume_from, progress)
    if _is_main(accelerator):
        src.save(compressed, out_dir)
    return compressed


@dataclass
class SearchResult:
    """The outcome of :func:`search_smallest`: the chosen container (None if no probe fit), its
    measured drop, every probe, and the wall-clock seconds of the whole search."""

    compressed: CompressedModel | None
    validation: dict | None
    probes: list[dict]
    seconds: float


def search_smallest(source: str | Source, out_dir: str | Path | None, max_drop_pt: float, dataset: str | None,
                    config: VAECompressionConfig, finetune_config: FinetuneConfig | None = None,
                    bpw_range: tuple[float, float] = SEARCH_RANGE_BPW, probes: int = SEARCH_PROBES,
                    accelerator=None, progress: bool = True) -> SearchResult:
    """The smallest container whose task-metric drop (top-1 or mAP, in points) on the held-out
    split is at most ``max_drop_pt``.

    Bisects the target bits per weight on a log scale: each probe halves the bracket, moving down
    after a probe that keeps the budget (its drop plus one standard error, see
    :meth:`Source.validation_drop`) and up after one that does not. Each probe is a full
    compression (and fine-tuning, when configured) from one shared calibration pass, judged on
    ``validation``. The best container is saved to ``out_dir`` (when given).
    """
    start = time.perf_counter()
    src = source if isinstance(source, Source) else Source.open(source, dataset, config.calibration_batches, progress)
    if src.task is None:
        raise ValueError("an accuracy budget needs a dataset to measure the drop on")
    lo, hi = math.log(bpw_range[0]), math.log(bpw_range[1])
    best, best_validation, log = None, None, []
    for _ in range(probes):
        bpw = math.exp((lo + hi) / 2)
        probe_start = time.perf_counter()
        probe = src.compress(dataclasses.replace(config, target_bits_per_weight=bpw, beta=None), finetune_config,
                             accelerator, progress=progress)
        validation = src.validation_drop(probe, max_drop_pt) if _is_main(accelerator) else dict(drop_pt=0.0)
        drop = validation["drop_pt"] + validation.get("drop_se_pt", 0.0)  # what must fit the budget
        if accelerator is not None:
            drop = float(accelerator.reduce(torch.tensor(drop), reduction="sum"))  # the main process decides
        size = len(probe.to_bytes())
        log.append(dict(target_bits_per_weight=bpw, bytes=size, validation_drop_pt=validation["drop_pt"],
                        validation_drop_se_pt=validation.get("drop_se_pt", 0.0), accepted=drop <= max_drop_pt,
                        seconds=round(time.perf_counter() - probe_start, 2)))
        logger.info("rate search: %.3f bpw -> %d bytes, validation drop %.2f pt (+ 1 SE: %.2f)", bpw, size,
                    validation["drop_pt"], drop)
        if drop <= max_drop_pt:
            hi = math.log(bpw)
            if best is None or size < len(best.to_bytes()):
                best, best_validation = probe, validation
        else:
            lo = math.log(bpw)
    if best is not None and out_dir is not None and _is_main(accelerator):
        src.save(best, out_dir)
    return SearchResult(best, best_validation, log, time.perf_counter() - start)


def load_any(source: str | Path, **hub_kwargs) -> tuple[torch.nn.Module, Path, float]:
    """Load a compressed or plain folder (or Hub id); returns the model, its folder and load seconds."""
    folder = resolve_folder(str(source), **hub_kwargs)
    start = time.perf_counter()
    model = load_folder(folder)
    return model, folder, time.perf_counter() - start


__all__ = ["SELECTION_SPLIT", "UNCHECKED_BPW", "SearchResult", "Source", "compress_folder", "load_any",
           "load_compressed", "search_smallest"]
