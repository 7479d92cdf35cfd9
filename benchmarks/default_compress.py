"""What a user gets from ``hf-vae-compress compress MODEL OUT`` with no rate argument (``make bench``).

For every reference model, and for two architectures none of them shares (``unseen-regnetx002``,
grouped convolutions, and ``unseen-mobilenetv2``, a depthwise convolution in every block; each
trained into ``outputs/`` by ``recipes/train_reference.py`` when it is missing: the defaults were
never chosen on them), this runs the CLI exactly as a user would, in a fresh process:

1. ``compress MODEL OUT --json``: the accuracy-checked default (smallest container within the
   task's budget on the validation split);
2. ``compress MODEL OUT --target-bpw R --json`` at the rate the default chose: the fixed-rate
   compress it is timed against;
3. ``compress MODEL OUT --dataset none --json``: the data-free default, checked by agreement with
   the original on synthetic images; where no rate keeps that check's budget the CLI refuses, and
   the row keeps its error (``failed``).

Each output folder is then loaded through the package's loader and scored on the **test** split,
against the base model on the same split. Writes ``benchmarks/results/default_compress.json``.
The committed headline artifacts are written by ``benchmarks/rate_accuracy.py`` alone (one writer,
through ``save_pretrained``).
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

import torch

from hf_vae_compress.pipeline import load_any
from hf_vae_compress.tasks import task_for

logger = logging.getLogger("default_compress")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "outputs" / "default_compress"
REFERENCES = ["fmnist-resnet18", "fmnist-mobilenetv3", "fmnist-vit", "fmnist-rtdetr"]
UNSEEN = "unseen-regnetx002"
UNSEEN_DEPTHWISE = "unseen-mobilenetv2"
UNSEEN_MODELS = (UNSEEN, UNSEEN_DEPTHWISE)  # not reference models; one training protocol for both
# every step of 4 epochs: a wall-clock cap fits the steps to the machine's load at the time, and on a
# shared machine it once trained unseen-mobilenetv2 154 of 1716 steps (top-1 0.32), which no rate can keep
UNSEEN_TRAINING = ["--epochs", "4", "--lr", "4e-3"]


def model_folder(name: str) -> Path:
    if name not in UNSEEN_MODELS:
        return ROOT / "reference_models" / name
    folder = ROOT / "outputs" / name
    if not (folder / "train_result.json").exists():
        logger.info("training %s (not a reference model) into %s", name, folder)
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "recipes" / "accelerate" / "cpu_1proc.yaml"),
                        str(ROOT / "recipes" / "train_reference.py"), "--model", name, *UNSEEN_TRAINING,
                        "--output", str(folder)], check=True, cwd=ROOT)
    return folder


def cli_compress(folder: Path, out: Path, *extra: str) -> dict:
    """One ``hf-vae-compress compress`` in a fresh process, into an emptied ``out`` (the benchmark's
    own folder: the CLI rightly refuses to write over a previous run's weights): its JSON and its
    wall-clock seconds."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hf_vae_compress", "compress", str(folder), str(out), *extra,
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"compress {folder.name} {extra} failed: {cli_error(done.stderr)}")
    result = json.loads(done.stdout)
    result.pop("finetune", None)
    return dict(result, wall_seconds=round(seconds, 1), stderr_warning="warning:" in done.stderr)


def cli_error(stderr: str) -> str:
    """The CLI's own error line, which names the problem; the progress bars share stderr and would
    otherwise fill a kept tail. The tail when there is no such line (a crash, not a refusal)."""
    prefix = "hf-vae-compress compress: error: "
    errors = [line[line.find(prefix):] for line in stderr.split("\n") if prefix in line]
    return errors[-1] if errors else stderr[-3000:]


RUNS = ("default", "fixed_rate", "data_free")
FOLDERS = {"default": "default", "fixed_rate": "fixed", "data_free": "data-free"}


def measure(name: str, runs: tuple[str, ...], previous: dict | None) -> dict:
    """Run ``runs`` on one model; a run not asked for keeps its ``previous`` result."""
    folder = model_folder(name)
    base_model = load_any(folder)[0]
    task = task_for(base_model)
    test = task.prepare(base_model, task.load("test"))
    base = task.score(base_model, test)[task.metric]
    work = WORK / name
    row = dict(previous or {}, model=name, reference=name not in UNSEEN_MODELS, metric=task.metric,
               budget_pt=task.budget_pt, base_test=base, threads=torch.get_num_threads())
    for kind in runs:
        if kind == "default":
            run = cli_compress(folder, work / FOLDERS[kind])
        elif kind == "fixed_rate":
            chosen = row["default"]["rate_search"]
            best = min((p for p in chosen if p["accepted"]), key=lambda p: p["bytes"])
            run = cli_compress(folder, work / FOLDERS[kind], "--target-bpw", str(best["target_bits_per_weight"]))
        else:
            try:
                run = cli_compress(folder, work / FOLDERS[kind], "--dataset", "none")
            except RuntimeError as err:  # no rate kept the agreement check's budget: the CLI's error is the result
                logger.warning("%s data_free refused: %s", name, str(err)[-300:])
                row[kind] = dict(failed=str(err)[-1500:], commit=_commit())
                continue
        score = task.score(load_any(work / FOLDERS[kind])[0], test)[task.metric]
        row.update(num_weights=run["num_weights"], fp32_bytes=run["fp32_safetensors_bytes"])
        row[kind] = dict(bytes=run["total_bytes"], ratio_vs_fp32=run["ratio_vs_fp32"],
                         bits_per_weight=run["bits_per_weight"], test=score, test_drop_pt=100 * (base - score),
                         validation=run["validation"], accuracy_checked=run["accuracy_checked"],
                         warned=run["stderr_warning"], compress_seconds=run["wall_seconds"],
                         probes=len(run["rate_search"] or []), rate_search=run["rate_search"], commit=_commit())
        logger.info("%s %s: %d B (%.1fx), test drop %.2f pt, %.0f s", name, kind, run["total_bytes"],
                    run["ratio_vs_fp32"], row[kind]["test_drop_pt"], run["wall_seconds"])
    row["default_time_vs_fixed_rate"] = row["default"]["compress_seconds"] / row["fixed_rate"]["compress_seconds"]
    if name in UNSEEN_MODELS:
        row["training"] = json.loads((folder / "train_result.json").read_text())
    return row


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def machine_loaded(*loads: float) -> bool:
    """Whether other jobs competed for the cores during a run (a 1-minute load average above their
    number at any of ``loads``): its seconds are then a development figure, not a result."""
    return max(loads) > (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[*REFERENCES, *UNSEEN_MODELS])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="which runs to (re)measure; the others keep their results in --output")
    parser.add_argument("--output", type=Path, default=RESULTS / "default_compress.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    previous = json.loads(args.output.read_text()) if args.output.exists() else {"rows": []}
    rows = {r["model"]: r for r in previous["rows"]}
    for name in args.models:
        rows[name] = measure(name, tuple(args.runs), rows.get(name))
        result = dict(platform=dict(python=platform.python_version(), torch=torch.__version__,
                                    machine=platform.machine(), threads=torch.get_num_threads()),
                      rows=[rows[n] for n in [*REFERENCES, *UNSEEN_MODELS] if n in rows])
        args.output.write_text(json.dumps(result, indent=1) + "\n")  # after each model: a long run keeps its work


if __name__ == "__main__":
    main()
