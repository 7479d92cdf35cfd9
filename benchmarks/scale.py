"""Real sizes (issue 25): the CLI's default and a fixed rate on ImageNet-size checkpoints, and their load.

No pretrained weights are reachable here, so each model is built from its config with random weights
(seeded): what is measured is time and memory, which do not depend on training. The models:

* timm ``resnet50``, ``convnext_tiny`` and ``vit_base_patch16_224`` (25.6 M, 28.6 M, 86.6 M weights);
* transformers ``DetrForObjectDetection`` with a ResNet-50 backbone (41.5 M weights), its processor
  set to 224 px like the classifiers (DETR's own 800 px would measure the resize, not the codec).

Data, as a user would bring it: an ``imagefolder`` of synthetic 224 px images (smooth random
colour fields, seeded) with a ``train`` split for calibration and a 1,000-image ``validation`` split
for the accuracy check. Labels on random images mean nothing, so each classifier's validation
images are filed under the class *its own* base model predicts, but for a seeded 10 % filed under
another: the base model scores 90 %, and a compressed model loses top-1 where it stops agreeing with
the original, which happens more as the rate falls. That
keeps the rate search's decisions as hard as on real data (a random label would make every probe
pass at once); the accuracy numbers themselves are not a result. The detector checks on
Fashion-MNIST scenes saved as a COCO-style dataset (:func:`scenes_folder`).

Per model, each in a fresh ``hf-vae-compress compress ... --json`` process (its wall-clock seconds
and its own peak RSS from ``wait4``):

* ``default``: no rate argument (the accuracy-checked rate search);
* ``fixed_rate``: ``--target-bpw 2`` (output-aware rounding; the drop is still reported, and that
  report's two scoring passes are listed apart: the fixed-rate target is judged without them);

each run recording the commit it ran at (``--runs`` remeasures some and keeps the others), with the
seconds of every stage the CLI reports (``stage_seconds``), which add up to its total
(``other``: interpreter start, imports and saving). Then the load of the fixed-rate container
against the fp32 safetensors of the same weights, into a built model and onto the meta device
(``benchmarks/load_speed.py``'s ``compare_loads``), and decode weights/s.

Writes ``benchmarks/results/scale.json`` after every run, so a long run keeps its work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict
from PIL import Image
from safetensors.torch import save_file
from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

from hf_vae_compress.data import FASHION_MNIST_CLASSES
from hf_vae_compress.detection import load_fashion_mnist_scenes
from hf_vae_compress.evaluate import predict
from hf_vae_compress.loading import find_container
from hf_vae_compress.models import save_timm
from hf_vae_compress.pipeline import load_any
from hf_vae_compress.tasks import task_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_compress import _commit  # noqa: E402
from load_speed import build_model, compare_loads  # noqa: E402

logger = logging.getLogger("scale")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "outputs" / "scale"
MODELS = ("resnet50", "convnext_tiny", "vit_base_patch16_224", "detr_resnet50")
DETECTOR = "detr_resnet50"
RUNS = {"default": [], "fixed_rate": ["--target-bpw", "2"]}
IMAGE_SIZE = 224
VALIDATION_IMAGES = 1000  # the realistic selection split
TRAIN_PER_CLASS = 1  # the train split only calibrates (8 batches of 32 by default); one image per class covers all
NUM_CLASSES = 1000
BASE_TOP1 = 0.9  # the base model's top-1 on the validation labels (validation_labels)
SCENES = {"train": 256, "validation": 200}  # the detector's calibration and check scenes
SEED = 0
TARGETS = {  # the issue's, in seconds, for the rows it names
    "default": {"resnet50": 6 * 60, "vit_base_patch16_224": 15 * 60},
    "fixed_rate": {"resnet50": 60, "vit_base_patch16_224": 120},
}
FIXED_RATE_PEAK_RSS_GB = 3.0
# With data, a fixed rate still reports its drop: the base model and the result each scored on the whole
# validation split. Those stages are listed, and the fixed-rate target is judged without them (the issue's
# fixed-rate times are of compressing at a rate the user chose, measured with an 80-image folder).
ACCURACY_REPORT_STAGES = ("base_scoring", "score")
LOAD_RATIO_MAX = 1.5
LOAD_RSS_RATIO_MAX = 1.3
DECODE_WEIGHTS_PER_S_MIN = 250e6


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``): runs kept from earlier commits may come from another
    machine, and timings only compare on one."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else None


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field: a coarse random grid upsampled, so that it is image-like
    (neighbouring pixels correlate) rather than white noise."""
    coarse = rng.integers(0, 256, size=(int(rng.integers(4, 29)),) * 2 + (3,), dtype=np.uint8)
    return Image.fromarray(coarse).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


def image_pool(count: int) -> list[Path]:
    """``count`` synthetic PNG images, written once under ``WORK/pool``."""
    pool = WORK / "pool"
    done = pool / f".complete-{count}"
    files = [pool / f"{i:05d}.png" for i in range(count)]
    if done.exists():
        return files
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for file in files:
        synthetic_image(rng).save(file)
    done.touch()
    return files


def model_folder(name: str) -> Path:
    """The model saved as a user's checkpoint folder (random weights, seeded), written once."""
    folder = WORK / "models" / name
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(SEED)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if name == DETECTOR:
        detr().save_pretrained(staging)
        DetrImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(staging)
    else:
        save_timm(build_model(f"timm:{name}"), staging)
    staging.rename(folder)
    return folder


def detr() -> DetrForObjectDetection:
    """DETR with a ResNet-50 backbone (timm's, not downloaded) and the task's own classes: the
    Fashion-MNIST scenes it is checked on."""
    config = DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                        num_labels=len(FASHION_MNIST_CLASSES), id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                        label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)})
    return DetrForObjectDetection(config)


def spec(name: str, folder: Path) -> str:
    """How ``load_speed.build_model`` builds the architecture."""
    return f"transformers:{folder}" if name == DETECTOR else f"timm:{name}"


def labelled_folder(name: str, folder: Path) -> Path:
    """The model's imagefolder: ``train/<class>/`` (one pool image per class) and
    ``validation/<class>/`` (1,000 pool images, labelled by :func:`validation_labels`). Files are
    hard links into the pool; written once per model."""
    root = WORK / "data" / name
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    pool = image_pool(NUM_CLASSES * TRAIN_PER_CLASS + VALIDATION_IMAGES)
    train, validation = pool[:NUM_CLASSES * TRAIN_PER_CLASS], pool[NUM_CLASSES * TRAIN_PER_CLASS:]
    for i, file in enumerate(train):
        _link(file, root / "train" / f"{i % NUM_CLASSES:04d}")
    for file, label in zip(validation, validation_labels(name, folder, validation)):
        _link(file, root / "validation" / f"{label:04d}")
    done.touch()
    return root


def validation_labels(name: str, folder: Path, files: list[Path]) -> list[int]:
    """What the base model predicts for each image, except on a seeded ``1 - BASE_TOP1`` of them,
    which get another class: the base model then scores ``BASE_TOP1`` like a trained one, and a
    compressed model loses where it stops agreeing with it. (At 100 % the memorisation check
    would rightly refuse to call the split a check.) Predictions are cached beside the data."""
    cache = WORK / "data" / f"{name}.predictions.json"
    if cache.exists():
        predictions = json.loads(cache.read_text())
    else:
        model = load_any(folder)[0]
        images = [Image.open(f).convert("RGB") for f in files]
        pixels, _ = task_for(model).prepare(model, _as_dataset(images))  # the model's own preprocessing
        predictions = predict(model, (pixels, torch.zeros(len(images), dtype=torch.long)), progress=True)[0].tolist()
        cache.write_text(json.dumps(predictions))
    rng = np.random.default_rng(SEED)
    wrong = rng.choice(len(predictions), round((1 - BASE_TOP1) * len(predictions)), replace=False)
    labels = [int(p) for p in predictions]
    for i in wrong:
        labels[i] = (labels[i] + 1 + int(rng.integers(NUM_CLASSES - 1))) % NUM_CLASSES
    return labels


def scenes_folder() -> Path:
    """The detector's data as a user's COCO-style ``save_to_disk`` dataset: Fashion-MNIST scenes
    (the task's own kind of data), ``SCENES["train"]`` to calibrate on and ``SCENES["validation"]``
    to check. mAP is a whole-set metric, so every probe scores the whole validation split; its size
    keeps a default search of DETR-R50 within an hour on 2 cores. Written once."""
    root = WORK / "data" / "scenes"
    if (root / "dataset_dict.json").exists():
        return root
    staging = root.with_name("scenes.partial")
    shutil.rmtree(staging, ignore_errors=True)
    DatasetDict({split: load_fashion_mnist_scenes(split, count) for split, count in SCENES.items()}).save_to_disk(
        str(staging))
    staging.rename(root)
    return root


def _as_dataset(images: list[Image.Image]):
    """Images with placeholder labels over every class, as ``Classification.prepare`` takes them."""
    import datasets

    labels = datasets.ClassLabel(names=[f"{i:04d}" for i in range(NUM_CLASSES)])
    features = datasets.Features(image=datasets.Image(), label=labels)
    return datasets.Dataset.from_dict(dict(image=images, label=[0] * len(images)), features=features)


def _link(file: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.link(file, folder / file.name)


def cli_compress(folder: Path, out: Path, *extra: str) -> dict:
    """One ``hf-vae-compress compress --json`` in a fresh process: its JSON, wall-clock seconds and
    the process's own peak RSS (``wait4``: the child's, not this script's)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "hf_vae_compress", "compress", str(folder), str(out), *extra, "--json"]
    start = time.perf_counter()
    with open(out.with_suffix(".stdout"), "w") as stdout, open(out.with_suffix(".stderr"), "w") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    measured = dict(wall_seconds=round(seconds, 2), peak_rss_gb=round(usage.ru_maxrss / 2**20, 3))
    if os.waitstatus_to_exitcode(status) != 0:  # e.g. no rate kept the budget: the time it took is still a result
        error = out.with_suffix(".stderr").read_text().strip().splitlines()[-1]
        logger.warning("compress %s %s failed: %s", folder.name, extra, error[:500])
        return dict(measured, error=error[:300])
    return dict(json.loads(out.with_suffix(".stdout").read_text()), **measured)


def stage_split(run: dict) -> dict:
    """The CLI's stage seconds, plus ``other`` (interpreter start, imports, saving): they add up to
    the wall-clock total by construction, and ``other`` says how much the stages leave out."""
    stages = dict(run.get("stage_seconds") or {})
    stages["other"] = round(run["wall_seconds"] - sum(stages.values()), 2)
    return stages


def measure(name: str, runs: list[str], previous: dict | None, repeats: int) -> dict:
    folder = model_folder(name)
    data = scenes_folder() if name == DETECTOR else labelled_folder(name, folder)
    dataset = ["--dataset", str(data)]
    row = dict(previous or {}, model=name, spec=spec(name, folder))
    for kind in (k for k in runs if k in RUNS):  # "load" is not a compress: it reads the fixed rate's container
        out = WORK / "out" / f"{name}-{kind}"
        out.parent.mkdir(parents=True, exist_ok=True)
        run = cli_compress(folder, out, *dataset, *RUNS[kind])
        if "error" in run:  # no JSON, no stages: the command's own total and its error
            row[kind] = dict(seconds=run["wall_seconds"], peak_rss_gb=run["peak_rss_gb"], error=run["error"],
                             stage_seconds=None, target_seconds=TARGETS.get(kind, {}).get(name), meets_target=False,
                             commit=_commit(), cpu=cpu_model())
            continue
        validation = run.get("validation") or {}
        row[kind] = dict(
            seconds=run["wall_seconds"], stage_seconds=stage_split(run), peak_rss_gb=run["peak_rss_gb"],
            bytes=run["total_bytes"], bits_per_weight=run["bits_per_weight"], ratio_vs_fp32=run["ratio_vs_fp32"],
            num_weights=run["num_weights"], rate_search=run.get("rate_search"),
            validation={k: validation.get(k) for k in ("metric", "examples", "examples_scored", "drop_pt",
                                                       "drop_se_pt", "within_budget")},
            target_seconds=TARGETS.get(kind, {}).get(name), commit=_commit(), cpu=cpu_model(),
        )
        judged = row[kind]["seconds"]
        if kind == "fixed_rate":  # the rate is given: what the target times is compressing, not the report
            report = sum(row[kind]["stage_seconds"].get(k, 0.0) for k in ACCURACY_REPORT_STAGES)
            row[kind]["accuracy_report_seconds"] = round(report, 2)
            judged = row[kind]["seconds_without_accuracy_report"] = round(judged - report, 2)
        row[kind]["meets_target"] = (row[kind]["target_seconds"] is None or judged <= row[kind]["target_seconds"]) \
            and (kind != "fixed_rate" or row[kind]["peak_rss_gb"] <= FIXED_RATE_PEAK_RSS_GB)
        logger.info("%s %s: %.0f s, %.2f GB peak, %s", name, kind, run["wall_seconds"], run["peak_rss_gb"],
                    row[kind]["stage_seconds"])
    if ("load" in runs or "fixed_rate" in runs) and "error" not in row.get("fixed_rate", {}):
        row["load"] = dict(load_row(name, folder, WORK / "out" / f"{name}-fixed_rate", repeats), commit=_commit())
    return row


def load_row(name: str, folder: Path, compressed: Path, repeats: int) -> dict:
    """fp32 safetensors of the same weights against the fixed-rate container, in one run."""
    fp32 = WORK / "fp32" / f"{name}.safetensors"
    if not fp32.exists():
        fp32.parent.mkdir(parents=True, exist_ok=True)
        model = load_any(folder)[0]
        save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, str(fp32))
    result = compare_loads(spec(name, folder), fp32, find_container(compressed), repeats)
    for build in result["builds"].values():
        build["meets_target"] = build["ratio"] <= LOAD_RATIO_MAX and build["rss_ratio"] <= LOAD_RSS_RATIO_MAX
        if "ratio_vs_read" in build:  # meta: fp32's load_file maps the file and reads nothing (see load_speed)
            build["meets_target_vs_read"] = build["ratio_vs_read"] <= LOAD_RATIO_MAX and \
                build["rss_ratio"] <= LOAD_RSS_RATIO_MAX
    result["decode_meets_target"] = max(b["decode_weights_per_s"] for b in result["builds"].values()) >= \
        DECODE_WEIGHTS_PER_S_MIN
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--runs", nargs="+", choices=[*RUNS, "load"], default=[*RUNS],
                        help="which runs to (re)measure; the others keep their results in --output")
    parser.add_argument("--repeats", type=int, default=5, help="timed loads per path (medians compared)")
    parser.add_argument("--output", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    rows = {r["model"]: r for r in previous.get("rows", [])}
    for name in args.models:
        rows[name] = measure(name, args.runs, rows.get(name), args.repeats)
        result = dict(commit=_commit(), machine=platform.processor() or platform.machine(),
                      cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                      load_average_at_end=os.getloadavg(), device="CPU only (no device machine was lent)",
                      validation_images=VALIDATION_IMAGES, image_size=IMAGE_SIZE,
                      rows=[rows[m] for m in MODELS if m in rows])
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
