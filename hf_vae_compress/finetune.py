"""Task-aware fine-tuning of a compressed model, data-parallel under ``accelerate launch``.

Post-hoc codecs stop where weight error starts to cost accuracy. Fine-tuning optimises the
latents (straight-through rounding), the decoder, the prior and the stored parameters jointly
on the task loss plus ``rate_weight`` times the estimated bits per weight, then re-quantizes and
entropy-codes into the same container format. The task (:mod:`hf_vae_compress.tasks`) says what
the loss is: cross-entropy + distillation from the original model's logits for a classifier, the
detector's own matching loss (classes and boxes) for a detector.

Batches are drawn per step from a generator seeded by (seed, step, process), so a run resumed
from an ``accelerator.save_state`` checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .codec import CompressedModel, JsonConfig, ModelHash
from .codec.folding import BATCHNORM_FOLDED
from .codec.reparam import LatentParametrization
from .tasks import Classification, Task

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(JsonConfig):
    steps: int = 300
    batch_size: int = 64  # per process
    latent_learning_rate: float = 1e-2  # latents are in units of their step
    learning_rate: float = 1e-3  # decoder, prior and stored parameters
    rate_weight: float = 0.05  # loss per (bit per coded weight: the rate term counts only the coded tensors)
    distill_weight: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    schedule: str = "cosine"  # how both learning rates move over the run: one of SCHEDULES

    def __post_init__(self):
        if self.schedule not in SCHEDULES:  # refused here, before calibration, not after it
            raise ValueError(f"unknown fine-tuning schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")


SCHEDULES = ("cosine", "constant")  # cosine: both learning rates fall to 0 at the last step


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step (for ``LambdaLR``). Why a decay by default: a
    converged model fine-tuned at a constant rate ends wherever its last noisy small-batch steps
    left it. At a constant rate, RT-DETR at 2.80 bits/weight lost 1.25 pt mAP after 300 steps,
    where the post-hoc container at 2.86 lost 0.22 (``rate_accuracy.json``, issue 23); annealing to
    zero lets the last steps settle."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


class _Student(nn.Module):
    """The model's forward pass with weights decoded from trainable latents."""

    def __init__(self, param: LatentParametrization, model: nn.Module, fixed: dict[str, torch.Tensor]):
        super().__init__()
        self.param = param
        self.__dict__["model"] = model  # not a submodule: its own weights are never used or trained
        self.fixed = fixed

    def forward(self, *args, **kwargs):
        """The model's output with the decoded weights, and the latents' estimated bits."""
        weights = {**self.fixed, **self.param()}
        return torch.func.functional_call(self.model, weights, args, kwargs), self.param.rate_bits()


class _Progress:
    """The step counter, saved and restored with the accelerate checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


RUN_FILE = "run.json"  # in every checkpoint: what a run resuming from it must match
# The compression settings that shape the latents a checkpoint holds (rounding and corrections are
# left out: the header records what was applied, which can differ from what was asked).
_LATENT_FIELDS = ("target_bits_per_weight", "beta", "transform", "chunk_size", "hidden_size", "normalization",
                  "min_numel", "raw_dtype", "fit", "calibration_batches", "seed", "modules_to_not_convert",
                  "fold_batchnorm")


def run_identity(model: nn.Module, compression: dict, config: FinetuneConfig) -> dict:
    """What a checkpoint must match to be resumed: the model's weights (a SHA-256 over names,
    shapes and bytes), the settings that shape its latents, and the fine-tuning settings other than
    the number of steps and the checkpoint interval. Computable before calibration, so ``compress``
    refuses a foreign checkpoint before any long work."""
    digest = ModelHash()
    for name, tensor in model.state_dict().items():
        digest.update(name, tensor.detach().cpu())
    tuning = {k: v for k, v in config.to_dict().items() if k not in ("steps", "checkpoint_every")}
    return dict(model_sha256=digest.digest().hex(), compression={k: compression.get(k) for k in _LATENT_FIELDS},
                finetune=tuning)


def check_resume(folder: str | Path, identity: dict) -> None:
    """Raise unless ``folder`` is a checkpoint of a run with this ``identity`` (see :func:`run_identity`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot resume from {folder}: no such checkpoint folder (checkpoints are "
                                "CHECKPOINT_DIR/step_N)")
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise ValueError(f"cannot resume from {folder}: it holds no {RUN_FILE}, so it is not a checkpoint of "
                         "hf-vae-compress fine-tuning (or one written before checkpoints recorded their run); "
                         "start again without --resume-from")
    recorded = json.loads(run_file.read_text())
    if recorded.get("model_sha256") != identity["model_sha256"]:
        raise ValueError(f"cannot resume from {folder}: it was written while fine-tuning another model (its weights "
                         "differ from this source's); resume with the same source model, or start without --resume-from")
    for part in ("compression", "finetune"):
        theirs, ours = recorded.get(part) or {}, identity[part]
        changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in sorted(changed.items()))
            raise ValueError(f"cannot resume from {folder}: it was written with other settings ({detail}); resume with "
                             "the same settings, or start without --resume-from")


def _save_checkpoint(accelerator, folder: Path, identity: dict) -> None:
    """``accelerator.save_state`` under a temporary name, renamed once every process has written:
    a run killed mid-write leaves no half-written ``step_N`` for ``--resume-from`` to trip over."""
    partial = folder.with_name(folder.name + ".partial")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    accelerator.wait_for_everyone()


def finetune(compressed: CompressedModel, model: nn.Module, train_data, config: FinetuneConfig | None = None,
             accelerator=None, checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
             progress: bool = True, task: Task | None = None) -> CompressedModel:
    """Fine-tune ``compressed`` (a compression of ``model``) on ``train_data``, from ``task.train_data``
    (for the default classification task: ``(pixel_values, labels)`` tensors).

    ``model`` supplies the architecture and, for a classifier, the teacher's logits. Every process
    returns the same result; only the caller decides who writes it.
    """
    config = config or FinetuneConfig()
    task = task or Classification()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    start = time.perf_counter()
    identity = run_identity(model, compressed.header["config"], config) if checkpoint_dir or resume_from else None
    if resume_from:
        check_resume(resume_from, identity)
    latents = compressed.unpack()
    model.eval().requires_grad_(False)
    trainable = {n for n, _ in model.named_parameters()}
    param = LatentParametrization(latents, trainable)
    fixed = {n: v.to(latents.reference[n].dtype) for n, v in latents.stored.items() if n not in trainable}
    missing = set(model.state_dict()) - set(fixed) - {c.name for c in latents.coded} - set(param.stored_names)
    if missing:
        raise ValueError(f"the container does not cover the model: {sorted(missing)[:5]}")
    student = _Student(param, model, fixed)
    groups = [{"params": list(param.latent), "lr": config.latent_learning_rate},
              {"params": [p for n, p in param.named_parameters() if not n.startswith("latent.")],
               "lr": config.learning_rate}]
    optimizer = torch.optim.Adam(groups)
    student, optimizer = accelerator.prepare(student, optimizer)
    # not prepared: accelerate's wrapper steps a scheduler once per process, and every process here
    # takes config.steps steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.steps))
    state = _Progress()
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(scheduler)
    if resume_from:
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at step %d", resume_from, state.step)
    num_examples = task.num_examples(train_data)
    # the weights the latents code (the rate term's denominator), not the report's num_weights,
    # which counts every floating-point value, stored ones too
    num_coded_weights = sum(c.layout.rows * c.layout.row_len for c in latents.coded)
    bar = tqdm(total=config.steps, initial=state.step, desc="fine-tune", unit="step",
               disable=not (progress and accelerator.is_main_process), leave=False)
    while state.step < config.steps:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state.step * 7919
                                                  + accelerator.process_index)
        idx = torch.randint(num_examples, (config.batch_size,), generator=generator)
        batch = send_to_device(task.sample(train_data, idx), accelerator.device)
        args, kwargs = task.model_inputs(batch)
        output, bits = student(*args, **kwargs)
        loss = (task.finetune_loss(output, batch, model, config.distill_weight)
                + config.rate_weight * bits / num_coded_weights)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", coded_bpw=f"{bits.item() / num_coded_weights:.3f}")
        if checkpoint_dir and state.step % config.checkpoint_every == 0 and state.step < config.steps:
            _save_checkpoint(accelerator, Path(checkpoint_dir) / f"step_{state.step}", identity)
    bar.close()
    accelerator.wait_for_everyone()
    tuned = CompressedModel.from_latents(accelerator.unwrap_model(student).param.to_latents())
    tuned.header["finetune"] = dict(config.to_dict(), processes=accelerator.num_processes)
    tuned.header[BATCHNORM_FOLDED] = compressed.batchnorm_folded  # the stored vectors it starts from are kept
    seconds = round(time.perf_counter() - start, 1)
    tuned.stats = dict(finetune_seconds=seconds, resumed_from=str(resume_from or ""),
                       encode_seconds=compressed.stats.get("encode_seconds", 0) + seconds)
    return tuned
