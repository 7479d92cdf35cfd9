"""Train the Fashion-MNIST reference detector and save it with transformers' ``save_pretrained``.

Runs unchanged under ``accelerate launch`` with one CPU process, two CPU processes or GPUs::

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \
        recipes/train_detector.py --epochs 8 --max-minutes 56 --output reference_models/fmnist-rtdetr

The detector is a small RT-DETR, chosen for a CPU budget because its denoising queries and
encoder-side query selection give the decoder a useful start from the first steps, where plain
DETR needs hundreds of epochs. It trains on scenes built from the 55k ``train`` items only (fresh layouts every
epoch), then the saved folder is reloaded and its COCO mAP measured on the test scenes, written
to ``train_result.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hf_vae_compress.data import FASHION_MNIST_CLASSES
from hf_vae_compress.detection import (
    default_num_scenes, detection_collate, evaluate_detection, load_fashion_mnist_scenes,
)
from hf_vae_compress.models import load_model, weights_bytes
from native_format import save_transformers  # recipes/native_format.py: a script's folder is on sys.path

logger = logging.getLogger("train_detector")

IMAGE_SIZE = 128


def build() -> torch.nn.Module:
    """RT-DETR shrunk for 128x128 grayscale scenes of at most 4 objects.

    A 4-stage basic-block ResNet (one block a stage) feeds strides 8/16/32, i.e. 16x16, 8x8 and
    4x4 maps for 22-56 px items; the hybrid encoder runs at width 64 with half-width CSP blocks
    (at width 128 its convs dominated the step time); 3 decoder layers refine 30 queries. With
    ``num_denoising=20`` and 4 objects a scene, 5 groups of noised ground-truth boxes (40 extra
    queries) keep the matching stable early, at a cost the CPU can carry. The backbone's batch
    norms train (``freeze_backbone_batch_norms=False``): frozen ones suit only a pretrained backbone.
    """
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                  depths=[1, 1, 1, 1], layer_type="basic", out_indices=[2, 3, 4])
    config = RTDetrConfig(
        backbone_config=backbone, freeze_backbone_batch_norms=False, encoder_in_channels=[32, 64, 128],
        encoder_hidden_dim=64, hidden_expansion=0.5, encoder_ffn_dim=256, encoder_attention_heads=4,
        d_model=128, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=256, decoder_attention_heads=4,
        decoder_layers=3, num_queries=30, num_denoising=20, num_labels=len(FASHION_MNIST_CLASSES),
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
    )
    return RTDetrForObjectDetection(config)


def image_processor():
    """Resize to the training size and rescale to [0, 1]; boxes become normalised (cx, cy, w, h)."""
    from transformers import RTDetrImageProcessor

    return RTDetrImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save(model: torch.nn.Module, folder: Path) -> None:
    """fp16 weights, computed in fp32, plus the processor."""
    save_transformers(model, folder, dtype=torch.float16)
    image_processor().save_pretrained(folder)


def train_loader(epoch: int, args: argparse.Namespace, collate) -> torch.utils.data.DataLoader:
    """Fresh scenes every epoch (same items, new positions, scales and neighbours): free augmentation."""
    scenes = load_fashion_mnist_scenes("train", num_scenes=args.train_scenes, image_size=IMAGE_SIZE,
                                       seed=args.seed + epoch)
    return torch.utils.data.DataLoader(scenes, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                       collate_fn=collate)


def train(model: torch.nn.Module, args: argparse.Namespace,
          accelerator: Accelerator) -> tuple[torch.nn.Module, int, int]:
    """AdamW with a one-cycle schedule over the planned steps; returns the unwrapped model, steps done, planned.

    The running loss and, after each epoch, the validation mAP are logged: the curve a budget
    needs to be sized from.
    """
    processor = image_processor()
    collate = detection_collate(processor, mode="L")
    steps_per_epoch = args.train_scenes // (args.batch_size * accelerator.num_processes)
    planned = args.steps or args.epochs * steps_per_epoch
    validation = None
    if args.val_scenes and accelerator.is_main_process:
        validation = load_fashion_mnist_scenes("validation", num_scenes=args.val_scenes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=planned, pct_start=0.05)
    logger.info("%d parameters, %d planned steps of %d x %d scenes", sum(p.numel() for p in model.parameters()),
                planned, args.batch_size, accelerator.num_processes)
    start = time.perf_counter()
    step, epoch, out_of_time, running = 0, 0, False, 0.0
    while step < planned and not out_of_time:
        model.train()
        for batch in accelerator.prepare(train_loader(epoch, args, collate)):
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), args.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            running += loss.item()
            if step % args.log_every == 0:
                logger.info("epoch %d step %d/%d loss %.3f (%.2f s/step)", epoch, step, planned,
                            running / args.log_every, (time.perf_counter() - start) / step)
                running = 0.0
            if args.max_minutes is not None:  # every process must stop at the same step, or the all-reduce hangs
                if time.perf_counter() - start > 60 * args.max_minutes:
                    accelerator.set_trigger()
                out_of_time = accelerator.check_trigger()
            if step == planned or out_of_time:
                break
        if validation is not None:
            scores = evaluate_detection(accelerator.unwrap_model(model), validation, processor, progress=False)
            logger.info("epoch %d validation map %.4f map_50 %.4f", epoch, scores["map"], scores["map_50"])
        epoch += 1
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), step, planned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=8, help="passes over freshly built train scenes")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop training at this wall-clock budget (the LR schedule still spans the planned steps)")
    parser.add_argument("--train-scenes", type=int, default=default_num_scenes("train"), help="scenes per epoch")
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--clip-norm", type=float, default=0.1, help="RT-DETR's gradient clipping")
    parser.add_argument("--val-scenes", type=int, default=500, help="validation scenes scored each epoch (0: none)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    set_seed(args.seed)
    start = time.perf_counter()
    model, steps, planned = train(build(), args, accelerator)
    train_seconds = time.perf_counter() - start
    if not accelerator.is_main_process:
        return
    args.output.mkdir(parents=True, exist_ok=True)
    save(model.eval(), args.output)
    result = evaluate_detection(load_model(args.output), load_fashion_mnist_scenes("test"))
    result.update(
        model="fmnist-rtdetr", dataset="fashion_mnist_scenes", split="test", weights_bytes=weights_bytes(args.output),
        storage_dtype="float16", steps=steps, planned_steps=planned, train_seconds=round(train_seconds, 1),
        num_processes=accelerator.num_processes,
        command="accelerate launch recipes/train_detector.py " + shlex.join(sys.argv[1:]),
    )
    (args.output / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    logger.info("saved %s: %s", args.output, result)


if __name__ == "__main__":
    main()
