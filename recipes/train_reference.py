"""Train a Fashion-MNIST reference model and save it in its library's native format.

Runs unchanged under ``accelerate launch`` with one CPU process, two CPU processes
(``--multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true``) or GPUs::

    accelerate launch --config_file recipes/accelerate/cpu_1proc.yaml \
        recipes/train_reference.py --model fmnist-resnet18 --epochs 4 --output reference_models/fmnist-resnet18

Trains on the 55k ``train`` split (never on ``validation`` or ``test``), then reloads the saved
folder and measures its test top-1, written to ``train_result.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from hf_vae_compress.data import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_arrays, fashion_mnist_pretrained_cfg,
    load_fashion_mnist,
)
from hf_vae_compress.evaluate import evaluate, logits_of
from hf_vae_compress.models import load_model, save_timm, weights_bytes
from native_format import save_transformers  # recipes/native_format.py: a script's folder is on sys.path

logger = logging.getLogger("train_reference")

# mobilenetv3_small_100 (1.5 M parameters): in 300-step probes it learned fastest of the MobileNetV3/V4 and
# MobileNetV2 variants at a quarter of their step time; its stride-32 stem still costs it against resnet18.
# Input side per model: the stride-32 MobileNet sees the images upsampled to 56x56, so that its last
# stages work on 2x2 maps rather than 1x1 (at 28x28 it plateaued at 87.5 % test top-1 whether it
# trained 4,400 or 8,100 steps). The size goes into the saved ``pretrained_cfg``, so every
# loader resizes the same way.
TIMM_MODELS = {"fmnist-resnet18": ("resnet18", 28), "fmnist-mobilenetv3": ("mobilenetv3_small_100", 56),
               # Not a reference model: an architecture family none of them has (grouped convolutions,
               # RegNet stages), trained only to check that defaults hold on a model they were never
               # chosen on (benchmarks/default_compress.py trains it into outputs/ when it is missing).
               "unseen-regnetx002": ("regnetx_002", 28),
               # Not a reference model either: MobileNetV2's inverted residuals put a depthwise 3x3
               # convolution in every block, the layers output-aware rounding reached last. At 28x28, like
               # the RegNet, so that it trains in the same 14-minute budget on two CPU cores.
               "unseen-mobilenetv2": ("mobilenetv2_050", 28)}
VIT = "fmnist-vit"


def image_size(name: str) -> int:
    return TIMM_MODELS[name][1] if name in TIMM_MODELS else 28


def build(name: str) -> torch.nn.Module:
    if name in TIMM_MODELS:
        import timm

        architecture, size = TIMM_MODELS[name]
        return timm.create_model(architecture, in_chans=1, num_classes=10,
                                 pretrained_cfg_overlay=fashion_mnist_pretrained_cfg(size))
    if name == VIT:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=28, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=192, num_labels=10,
            id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
            label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
        )
        return ViTForImageClassification(config)
    raise ValueError(f"unknown reference model {name!r}; choose from {[*TIMM_MODELS, VIT]}")


def save(name: str, model: torch.nn.Module, folder: Path) -> None:
    """fp16 weights in the native layout: timm's ``save_for_hf`` or transformers' ``save_pretrained``."""
    if name in TIMM_MODELS:
        save_timm(model, folder, dtype=torch.float16)
        return
    from transformers import ViTImageProcessor

    save_transformers(model, folder, dtype=torch.float16)
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[FASHION_MNIST_MEAN],
                      image_std=[FASHION_MNIST_STD], do_resize=True).save_pretrained(folder)


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling to the model's input size, as its ``pretrained_cfg`` asks of loaders."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and random 28x28 crop of the 2-pixel zero-padded image."""
    b = x.shape[0]
    flip = torch.rand(b, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2))
    oy, ox = torch.randint(0, 5, (2, b), device=x.device)
    rows = (oy[:, None] + torch.arange(28, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(28, device=x.device))[:, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


TIMED_STEPS = 30  # steps timed before a --max-minutes run first fits its schedule
WARMUP = 0.15


def one_cycle(step: int, total: int) -> float:
    """LR factor: linear warm-up over the first 15 % of ``total`` steps, then cosine to zero."""
    warmup = max(1, int(WARMUP * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def fit_to_budget(planned: int, done: int, seconds: float, max_minutes: float, accelerator) -> int:
    """The steps that fit the budget at the pace measured so far (5 % kept for the tail), agreed by
    every process (they must stop at the same step), and never more than planned."""
    pace = accelerator.reduce(torch.tensor(seconds / done), reduction="sum") / accelerator.num_processes
    fits = int(0.95 * 60 * max_minutes / float(pace))
    logger.info("%.3f s/step: %d of %d planned steps fit %.0f minutes", float(pace), fits, planned, max_minutes)
    return max(done, min(planned, fits))


def to_batches(split: str) -> torch.utils.data.TensorDataset:
    images, labels = fashion_mnist_arrays(split)
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return torch.utils.data.TensorDataset(x, torch.from_numpy(labels).long())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=[*TIMM_MODELS, VIT])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float,
                        help="fit the run to this wall-clock budget: after a few timed steps the LR schedule is "
                             "set to the steps that fit (never more than --epochs)")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(args.seed)
    model, size = build(args.model), image_size(args.model)
    loader = torch.utils.data.DataLoader(to_batches("train"), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    planned = args.epochs * len(loader)
    plan = {"steps": planned}  # shrinks to the budget; the scheduler reads it at every step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: one_cycle(step, plan["steps"]))
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(logits_of(model(resized(augment(x), size))), y, label_smoothing=0.1)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if args.max_minutes and step in (TIMED_STEPS, 10 * TIMED_STEPS):  # re-fit once the pace has settled
                plan["steps"] = fit_to_budget(planned, step, time.perf_counter() - start, args.max_minutes,
                                              accelerator)
            if step % 100 == 0:
                logger.info("epoch %d step %d/%d loss %.4f", epoch, step, plan["steps"], loss.item())
            if step >= plan["steps"]:
                break
        if step >= plan["steps"]:
            break
    train_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    args.output.mkdir(parents=True, exist_ok=True)
    save(args.model, accelerator.unwrap_model(model).eval(), args.output)
    result = evaluate(load_model(args.output), load_fashion_mnist("test"))
    result.update(
        model=args.model, split="test", weights_bytes=weights_bytes(args.output), storage_dtype="float16",
        train_seconds=round(train_seconds, 1), steps=step, num_processes=accelerator.num_processes,
        command="accelerate launch recipes/train_reference.py " + shlex.join(sys.argv[1:]),
    )
    (args.output / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    logger.info("saved %s: %s", args.output, result)


if __name__ == "__main__":
    main()
