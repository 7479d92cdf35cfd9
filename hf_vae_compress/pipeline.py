"""Folder-level jobs shared by the CLI, the recipes and the benchmarks.

A compressed folder holds the source's ``config.json`` and preprocessing files unchanged, plus
``model.vaec.safetensors`` in place of the weights. These functions glue the codec core to the
model formats of :mod:`hf_vae_compress.models` and the data of :mod:`hf_vae_compress.data`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from .codec import CONTAINER_NAME, CompressedModel, Shard, VAECompressionConfig, compress
from .finetune import FinetuneConfig, finetune
from .models import build_empty, copy_side_files, load_model, resolve_folder
from .tasks import task_for

logger = logging.getLogger(__name__)


def is_compressed(folder: str | Path) -> bool:
    return (Path(folder) / CONTAINER_NAME).exists()


def accelerate_shard(accelerator) -> Shard | None:
    """A codec :class:`Shard` over accelerate's processes (None for a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return None

    def average(tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            t.copy_(accelerator.reduce(t, reduction="mean"))

    return Shard(accelerator.process_index, accelerator.num_processes, average)


def compress_folder(source: str, out_dir: str | Path, config: VAECompressionConfig,
                    dataset: str | None = None, progress: bool = True,
                    finetune_config: FinetuneConfig | None = None, accelerator=None,
                    checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                    **hub_kwargs) -> CompressedModel:
    """Compress a local or Hub model folder into ``out_dir``, optionally fine-tuning on ``dataset``.

    Under ``accelerate launch`` pass the ``accelerator``: the VAE fit is sharded and fine-tuning
    is data-parallel; every process computes the result and the main process writes it.
    """
    src = resolve_folder(source, **hub_kwargs)
    model = load_model(src)
    calibration, loss_fn = None, None
    if dataset:
        task = task_for(model, dataset)
        calibration, loss_fn = task.calibration(model, config.calibration_batches)
    compressed = compress(model, config, calibration_data=calibration, loss_fn=loss_fn, progress=progress,
                          shard=accelerate_shard(accelerator))
    if finetune_config is not None and finetune_config.steps > 0:
        if not dataset:
            raise ValueError("fine-tuning needs a dataset")
        compressed = finetune(compressed, model, task.train_data(model), finetune_config, accelerator, checkpoint_dir,
                              resume_from, progress, task)
    if accelerator is None or accelerator.is_main_process:
        _write_folder(src, out_dir, compressed)
    return compressed


def _write_folder(src: Path, out_dir: str | Path, compressed: CompressedModel) -> None:
    """Configs and preprocessing travel from the source; its weights are replaced by the container."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_side_files(src, out_dir)
    compressed.save(out_dir)


SELECTION_SPLIT = "validation"  # rate search judges accuracy here, never on test


def search_smallest(source: str, out_dir: str | Path, max_drop_pt: float, dataset: str,
                    config: VAECompressionConfig, finetune_config: FinetuneConfig | None = None,
                    bpw_range: tuple[float, float] = (0.15, 4.0), probes: int = 6, accelerator=None,
                    progress: bool = True) -> tuple[CompressedModel | None, list[dict]]:
    """The smallest container whose task-metric drop (top-1 or mAP, in points) on the held-out
    split is at most ``max_drop_pt``.

    Bisects the target bits per weight on a log scale; each probe is a full compression (and
    fine-tuning, when configured) judged on ``validation``. The best container is saved to
    ``out_dir``; returns it (None if no probe fits) and the probe log.
    """
    base_model = load_model(resolve_folder(source))
    task = task_for(base_model, dataset)
    held_out = task.prepare(base_model, task.load(SELECTION_SPLIT))
    base = task.score(base_model, held_out)[task.metric]
    lo, hi = math.log(bpw_range[0]), math.log(bpw_range[1])
    best, log = None, []
    for _ in range(probes):
        bpw = math.exp((lo + hi) / 2)
        with tempfile.TemporaryDirectory() as tmp:
            probe = compress_folder(source, tmp, dataclasses.replace(config, target_bits_per_weight=bpw, beta=None),
                                    dataset, progress, finetune_config, accelerator)
            model = load_compressed(tmp) if accelerator is None or accelerator.is_main_process else None
        drop = 100 * (base - task.score(model, held_out)[task.metric]) if model is not None else 0.0
        if accelerator is not None:
            drop = float(accelerator.reduce(torch.tensor(drop), reduction="sum"))  # main process decides
        size = probe.report()["total_bytes"]
        log.append(dict(target_bits_per_weight=bpw, bytes=size, validation_drop_pt=drop))
        logger.info("rate search: %.3f bpw -> %d bytes, validation drop %.2f pt", bpw, size, drop)
        if drop <= max_drop_pt:
            hi = math.log(bpw)
            if best is None or size < best.report()["total_bytes"]:
                best = probe
        else:
            lo = math.log(bpw)
    if best is not None and (accelerator is None or accelerator.is_main_process):
        _write_folder(resolve_folder(source), out_dir, best)
    return best, log


def load_compressed(folder: str | Path, progress: bool = False) -> torch.nn.Module:
    """Build the architecture from the folder's config and load the decoded weights, strictly."""
    folder = Path(folder)
    state_dict = CompressedModel.load(folder).decode(progress=progress)
    model = build_empty(folder)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"decoded weights do not fit {folder}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def load_any(source: str | Path, **hub_kwargs) -> tuple[torch.nn.Module, Path, float]:
    """Load a compressed or plain folder (or Hub id); returns the model, its folder and load seconds."""
    folder = resolve_folder(str(source), **hub_kwargs)
    start = time.perf_counter()
    model = load_compressed(folder) if is_compressed(folder) else load_model(folder)
    return model, folder, time.perf_counter() - start
