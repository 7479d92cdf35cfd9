"""Compressing without labelled data (issue 26): what ``--dataset none`` and a folder of unlabelled
images give, against the labelled default (``benchmarks/results/default_compress.json``).

For every reference model and the unseen RegNetX (``benchmarks/default_compress.py`` trains it into
``outputs/`` when missing; the defaults were never chosen on it) this runs the CLI as a user would,
in a fresh process, and scores each output folder on the **test** split. Test labels are used only
for that report: nothing the CLI decides sees them.

Runs:

* ``data_free``: ``compress MODEL OUT --dataset none`` (synthetic images, agreement-checked rate);
* ``data_free_nearest``: the same with ``--rounding nearest`` (no output-aware rounding: faster);
* ``unlabelled``: ``compress MODEL OUT --dataset FOLDER`` where FOLDER holds the Fashion-MNIST
  validation images (validation scenes for the detector) as PNG files, labels removed: the images the
  labelled default selects on, so the two ratios compare like for like.

Writes ``benchmarks/results/datafree.json`` after every run, so a long run keeps its work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from hf_vae_compress.codec import CompressedModel
from hf_vae_compress.data import load_fashion_mnist
from hf_vae_compress.detection import load_fashion_mnist_scenes
from hf_vae_compress.loading import find_container
from hf_vae_compress.pipeline import load_any
from hf_vae_compress.tasks import Detection, task_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_compress import REFERENCES, UNSEEN, _commit, cli_compress, machine_loaded, model_folder  # noqa: E402

logger = logging.getLogger("datafree")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "outputs" / "datafree"
RUNS = {"data_free": ["--dataset", "none"], "data_free_nearest": ["--dataset", "none", "--rounding", "nearest"],
        "unlabelled": None}
DATA_FREE_TIMES_TODAY = 3  # the ratio target: at least 3x today's data-free ratio
UNLABELLED_SHARE_OF_DEFAULT = 0.8  # the target for unlabelled images against the labelled default


def unlabelled_folder(detector: bool) -> Path:
    """The validation images (or scenes) as PNG files in one folder, no labels: written once."""
    folder = WORK / ("unlabelled-scenes" if detector else "unlabelled-images")
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = load_fashion_mnist_scenes("validation") if detector else load_fashion_mnist("validation")
    for i, image in enumerate(rows["image"]):
        image.save(folder / f"{i:05d}.png")
    done.write_text(str(len(rows)))
    return folder


def measure(name: str, kind: str, row: dict, default_rows: dict) -> dict:
    folder = model_folder(name)
    base_model = load_any(folder)[0]
    task = task_for(base_model)
    test = task.prepare(base_model, task.load("test"))
    if "base_test" not in row:
        row.update(model=name, reference=name != UNSEEN, metric=task.metric, budget_pt=task.budget_pt,
                   base_test=task.score(base_model, test)[task.metric])
    out = WORK / name / kind
    args = RUNS[kind] or ["--dataset", str(unlabelled_folder(isinstance(task, Detection)))]
    load = os.getloadavg()[0]  # other jobs on the machine stretch compress_seconds: say how busy it was
    try:
        run = cli_compress(folder, out, *args, "--overwrite")
    except RuntimeError as err:  # e.g. no rate kept the check's budget: the CLI's own error, kept as the result
        logger.warning("%s %s failed: %s", name, kind, str(err)[-300:])
        return dict(args=args, failed=str(err)[-1500:], commit=_commit())
    load_end = os.getloadavg()[0]
    score = task.score(load_any(out)[0], test)[task.metric]
    validation = run["validation"] or {}
    result = dict(args=args, bytes=run["total_bytes"], ratio_vs_fp32=run["ratio_vs_fp32"],
                  bits_per_weight=run["bits_per_weight"], test=score, test_drop_pt=100 * (row["base_test"] - score),
                  check=run["check"], accuracy_checked=run["accuracy_checked"],
                  check_drop_pt=validation.get("drop_pt"), check_drop_se_pt=validation.get("drop_se_pt"),
                  allowed_pt=validation.get("allowed_pt"), check_examples=validation.get("examples"),
                  synthetic=validation.get("synthetic"), rounding=_rounding(out),
                  compress_seconds=run["wall_seconds"], load_average_1min_at_start=load,
                  load_average_1min_at_end=load_end, machine_loaded=machine_loaded(load, load_end),
                  probes=run["rate_search"], commit=_commit())
    default = default_rows.get(name, {}).get("default")
    if default is not None:
        result["labelled_default_ratio"] = default["ratio_vs_fp32"]
        result["ratio_vs_labelled_default"] = run["ratio_vs_fp32"] / default["ratio_vs_fp32"]
        data_free_today = default_rows[name]["data_free"].get("ratio_vs_fp32")  # None: the CLI refused there
        if data_free_today is not None:
            result["data_free_today_ratio"] = data_free_today
            result["ratio_vs_data_free_today"] = run["ratio_vs_fp32"] / data_free_today
    logger.info("%s %s: %.1fx, test drop %.2f pt, %.0f s (%s)", name, kind, run["ratio_vs_fp32"],
                result["test_drop_pt"], run["wall_seconds"], run["check"])
    return result


def _rounding(out: Path) -> str:
    """The rounding the container records (output-aware falls back to nearest without calibration)."""
    return CompressedModel.load(find_container(out)).header["config"]["rounding"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[*REFERENCES, UNSEEN])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--output", type=Path, default=RESULTS / "datafree.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    default_rows = {r["model"]: r for r in json.loads((RESULTS / "default_compress.json").read_text())["rows"]}
    previous = json.loads(args.output.read_text()) if args.output.exists() else {"rows": []}
    rows = {r["model"]: r for r in previous["rows"]}
    for name in args.models:
        for kind in args.runs:
            row = rows.setdefault(name, {})
            row[kind] = measure(name, kind, row, default_rows)
            result = dict(platform=dict(python=platform.python_version(), torch=torch.__version__,
                                        machine=platform.machine(), threads=torch.get_num_threads()),
                          targets=dict(data_free_test_drop_pt={"top1": 0.5, "map": 1.0},
                                       data_free_ratio_vs_today=DATA_FREE_TIMES_TODAY, data_free_resnet18_seconds=180,
                                       unlabelled_ratio_vs_labelled_default=UNLABELLED_SHARE_OF_DEFAULT),
                          rows=[rows[n] for n in [*REFERENCES, UNSEEN] if n in rows])
            args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
