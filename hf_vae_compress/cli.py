"""``hf-vae-compress``: compress, evaluate and inspect model folders.

Results go to stdout (JSON with ``--json``, else a short table); progress bars and logs go to
stderr, so ``--json`` output can be piped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from .codec import CompressedModel, ContainerError, FitConfig, VAECompressionConfig
from .codec.config import LATENT_QUANTIZERS, LINEAR_DECODERS, ROUNDINGS, TRANSFORMS, check_target_rate
from .data import DataNotFoundError, is_unlabelled
from .finetune import SCHEDULES, FinetuneConfig, check_resume, run_identity
from .hub import CardInfo, check_output, push_to_hub, save_pretrained
from .loading import find_container
from .models import check_model_folder, load_model, resolve_folder, weights_bytes
from .pipeline import UNCHECKED_BPW, Source, load_any
from .search import describe_probe, describe_refusal, search_smallest
from .synthetic import SyntheticConfig
from .tasks import CHECK_LABELLED, CHECK_NONE, DEFAULT_DATASET, task_for

logger = logging.getLogger("hf_vae_compress")


def _cmd_evaluate(args: argparse.Namespace) -> dict:
    model, folder, load_seconds = load_any(args.model, local_files_only=args.local_files_only)
    task = task_for(model, args.dataset)  # top-1 for classifiers, COCO mAP for detectors
    result = task.score(model, task.load(args.split), batch_size=args.batch_size, progress=True)
    result.update(model=str(args.model), dataset=task.dataset, split=args.split,
                  weights_bytes=weights_bytes(folder), load_seconds=round(load_seconds, 3))
    return result


def _check_compress_args(args: argparse.Namespace, fixed_rate: bool) -> None:
    """Refuse combinations of flags that cannot work, before anything is loaded."""
    synthetic = not args.dataset and args.synthetic_images > 0
    if not args.dataset and not synthetic and args.max_accuracy_drop is not None:
        raise ValueError("--max-accuracy-drop needs images to check on: pass --dataset, or synthetic images "
                         "(--synthetic-images above 0)")
    if not args.dataset or is_unlabelled(args.dataset):
        what = "--dataset none gives none" if not args.dataset else f"{args.dataset} has no labels"
        for flag, given in (("--finetune-steps", args.finetune_steps > 0),
                            ("--validation-split", bool(args.validation_split))):
            if given:
                raise ValueError(f"{flag} needs a dataset with labels ({what}): pass one or drop {flag}")
    if args.latent_quantizer != "scalar" and args.transform not in LINEAR_DECODERS:
        raise ValueError(f"--latent-quantizer {args.latent_quantizer} quantizes the latents of a learned linear "
                         f"decoder, and --transform {args.transform} has none: pass --transform "
                         f"{' or '.join(LINEAR_DECODERS)}, or drop --latent-quantizer")
    if args.rate_resolution is not None and fixed_rate:
        raise ValueError("--rate-resolution sets how finely the rate search bisects, and a fixed rate (--target-bpw "
                         "or --beta) runs no search: drop one of them")
    if (args.checkpoint_dir or args.resume_from) and not fixed_rate:
        raise ValueError("--checkpoint-dir and --resume-from need a fixed rate (--target-bpw or --beta): "
                         "a rate search fine-tunes many candidates")
    if args.resume_from and not args.finetune_steps:
        raise ValueError("--resume-from resumes fine-tuning: give --finetune-steps as in the run that wrote it")


def _over_budget(validation: dict | None, rate: str) -> str | None:
    """A warning when a fixed rate's measured validation drop does not fit the task's budget."""
    if validation is None or validation.get("within_budget", True) or not validation.get("rate_checked", True):
        return None  # nothing measured, or measured on data that cannot show a drop (its own warning says so)
    budget, allowed = validation["budget_pt"], validation.get("allowed_pt", validation["budget_pt"])
    held = f"the task's budget of {budget} pt" if allowed == budget else \
        f"the {allowed:g} pt that {validation['check']} may use of the task's budget of {budget} pt"
    return (f"{rate} loses {validation['drop_pt']:.2f} ± {validation.get('drop_se_pt', 0.0):.2f} pt of "
            f"{validation['metric']} on the {validation['split']} split, over {held}: drop the rate argument to "
            "search the smallest container within budget")


def _cmd_compress(args: argparse.Namespace) -> dict | None:
    """Fixed rate with ``--target-bpw`` / ``--beta``; otherwise the smallest container within an
    accuracy budget (``--max-accuracy-drop``, or the task's own budget when data is available).
    Without data (``--dataset none``) the model makes its own images (``--synthetic-images``): they
    calibrate, and agreement with the original on others decides the rate, held to a share of the
    budget and reported as not an accuracy check; with ``--synthetic-images 0`` nothing can be
    checked: a conservative rate, and a warning that says so.

    Every input is checked before the long work (loading data, calibrating, searching): the source
    folder, the output folder (never the source, never another model's weights without
    ``--overwrite``, writable) and a checkpoint to resume from. A rate search shows each probe on
    stderr as it ends (:func:`_show_probe`)."""
    start = time.perf_counter()
    budget = args.max_accuracy_drop
    fixed_rate = args.beta is not None or args.target_bpw is not None
    _check_compress_args(args, fixed_rate)
    folder = resolve_folder(args.source, local_files_only=args.local_files_only)
    check_model_folder(folder)
    check_output(args.out_dir, folder, args.overwrite)
    fields = dict(transform=args.transform, chunk_size=args.chunk_size, hidden_size=args.hidden_size,
                  fit=FitConfig(train_steps=args.train_steps), seed=args.seed, calibration_batches=args.calibration_batches,
                  rounding=args.rounding, correct_biases=args.correct_biases, correct_norms=args.correct_norms,
                  latent_quantizer=args.latent_quantizer, fold_batchnorm=args.fold_batchnorm)
    if args.beta is not None:
        fields.update(beta=args.beta, target_bits_per_weight=None)
    else:
        fields.update(target_bits_per_weight=UNCHECKED_BPW if args.target_bpw is None else args.target_bpw)
    config = VAECompressionConfig(**fields)
    tuning = FinetuneConfig(steps=args.finetune_steps, rate_weight=args.rate_weight, schedule=args.finetune_schedule,
                            seed=args.seed, checkpoint_every=args.checkpoint_every)
    if args.resume_from:
        check_resume(args.resume_from, run_identity(load_model(folder), config.to_dict(), tuning))
    accelerator = None
    if args.finetune_steps or os.environ.get("WORLD_SIZE", "1") != "1":  # under accelerate launch / torchrun
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator is None or accelerator.is_main_process
    split = {"validation_split": args.validation_split} if args.validation_split else {}
    synthetic = SyntheticConfig(calibration_images=args.synthetic_calibration_images,
                                check_images=args.synthetic_images, steps=args.synthetic_steps, seed=args.seed) \
        if not args.dataset and args.synthetic_images > 0 else None
    stages = {"checks": time.perf_counter() - start}
    src = Source.open(folder, args.dataset, config.calibration_batches, synthetic=synthetic, **split)
    stages.update(src.stage_seconds)
    probes, warnings = None, []
    if not fixed_rate and src.task is not None:
        budget = src.task.budget_pt if budget is None else budget
        allowed = budget * src.task.budget_share
        result = search_smallest(src, None, budget, args.dataset, config, tuning, accelerator=accelerator,
                                 on_probe=lambda probe: _show_probe(probe, allowed), resolution=args.rate_resolution,
                                 **split)
        if result.compressed is None:
            raise ValueError(describe_refusal(result.probes, allowed, src.task.check))
        compressed, validation, probes = result.compressed, result.validation, result.probes
        stages.update(result.stage_seconds)
    else:
        began = time.perf_counter()
        compressed = src.compress(config, tuning, accelerator, args.checkpoint_dir, args.resume_from, last=True)
        stages["compress"] = time.perf_counter() - began
        validation = src.validation_drop(compressed) if src.task is not None and main_process else None
        stages["score"] = time.perf_counter() - began - stages["compress"]
        rate = f"--beta {args.beta}" if args.beta is not None else f"{config.target_bits_per_weight} bits/weight"
        warnings.append(_over_budget(validation, f"the fixed rate {rate}"))
    if validation is not None:
        warnings.append(validation.get("warning"))
    if validation is None:
        warnings.append(f"accuracy was not checked: no dataset was given, so {config.target_bits_per_weight} "
                        "bits/weight was used without measuring its effect. Pass --dataset to get the smallest "
                        "container within the task's accuracy budget.")
    if not main_process:
        return None
    began = time.perf_counter()
    save_pretrained(compressed, folder, args.out_dir, overwrite=args.overwrite)
    stages["save"] = time.perf_counter() - began
    report = compressed.report()
    report.pop("layers")
    warning = " ".join(w for w in warnings if w) or None
    return {**compressed.stats, **report,
            **dict(out_dir=str(args.out_dir), validation=validation,
                   accuracy_checked=validation is not None and validation.get("accuracy_checked", True),
                   check=validation.get("check", CHECK_LABELLED) if validation is not None else CHECK_NONE,
                   over_budget=_over_budget(validation, "") is not None,
                   warning=warning, rate_search=probes, compress_seconds=round(time.perf_counter() - start, 2),
                   stage_seconds={name: round(t, 2) for name, t in stages.items()},
                   finetune=compressed.header.get("finetune"))}


def _show_probe(probe: dict, budget_pt: float) -> None:
    """One line on stderr per finished probe of a rate search, between the progress bars."""
    tqdm.write(f"hf-vae-compress compress: {describe_probe(probe, budget_pt)}", file=sys.stderr)


def _open_container(path: str) -> CompressedModel:
    """A container file, or the container of any compressed folder this library writes."""
    if not os.path.isdir(path):
        return CompressedModel.load(path)
    container = find_container(path)
    if container is None:
        raise FileNotFoundError(f"{path} is not a compressed model folder: it holds no container")
    return CompressedModel.load(container)


def _cmd_inspect(args: argparse.Namespace) -> dict:
    compressed = _open_container(args.out_dir)
    report = compressed.report()
    report["config"] = compressed.header["config"]
    return report


def _cmd_push(args: argparse.Namespace) -> dict:
    compressed = _open_container(args.out_dir)
    info = CardInfo(base_model=args.base_model, license=args.license, dataset=args.dataset, split=args.split,
                    plot=args.plot, tags=args.tag or [], batch_size=args.batch_size)
    try:
        commit = push_to_hub(compressed, args.repo_id, args.base or args.out_dir, info, endpoint=args.endpoint,
                             token=args.token, private=args.private or None, commit_message=args.commit_message)
    except OSError as err:  # Hub HTTP errors: report them like the other commands' errors
        raise ValueError(f"push to {args.repo_id} failed: {err}") from err
    return dict(repo_id=args.repo_id, commit=commit.oid, commit_url=commit.commit_url,
                url=f"{commit.commit_url.split('/commit/')[0]}")


def _print_human(command: str, result: dict) -> None:
    if command == "inspect":
        print(f"{'part':<12}{'bytes':>12}")
        for part, n in result["parts"].items():
            print(f"{part:<12}{n:>12,}")
        print(f"{'total':<12}{result['total_bytes']:>12,}   {result['bits_per_weight']:.3f} bits/weight, "
              f"{result['ratio_vs_fp32']:.1f}x smaller than fp32")
        print(f"\n{'tensor':<48}{'bytes':>10}{'bits/w':>8}{'step':>9}  transform")
        for layer in result["layers"]:
            print(f"{layer['name'][:47]:<48}{layer['bytes']:>10,}{layer['bits_per_weight']:>8.3f}{layer['step']:>9.4f}"
                  f"  {layer.get('transform', '')}")
        return
    if command == "compress":
        result = dict(result, validation=_describe_validation(result))
    for key, value in result.items():
        if value is not None:
            print(f"{key}: {value}")


def _describe_validation(result: dict) -> str:
    v = result["validation"]
    if v is None:
        return "not measured (no dataset): accuracy was not checked"
    where = f"{v.get('check', CHECK_LABELLED)}, {v['examples']:,} {v['split']} examples"
    if v.get("holdout"):
        where += f", held out from {v['holdout']['carved_from']} (seed {v['holdout']['seed']})"
    if v.get("report_split"):
        where += f"; report the final model on {v['report_split']}"
    if not v.get("accuracy_checked", True):
        where += "; NOT an accuracy check: the model may have trained on these examples"
    return (f"{v['metric']} {100 * v['compressed']:.2f} vs {100 * v['base']:.2f}: drop {v['drop_pt']:.2f} "
            f"± {v['drop_se_pt']:.2f} pt (allowed {v.get('allowed_pt', v['budget_pt']):g} of a {v['budget_pt']} pt "
            f"budget; {where})")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _bits_per_weight(text: str) -> float:
    try:
        return check_target_rate(_finite(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _gap(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a relative gap must be at least 0, got {text}")
    return value


def _budget_pt(text: str) -> float:
    value = _finite(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"an accuracy drop in points must be at least 0 and below 100, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vae-compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="top-1 (classifiers) or COCO mAP (detectors) of a plain or compressed "
                                         "model folder (or Hub id)")
    ev.add_argument("model")
    ev.add_argument("--dataset", default=DEFAULT_DATASET,
                    help="'default': fashion_mnist, or fashion_mnist_scenes for a detector")
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=256)

    co = sub.add_parser("compress", help="compress a timm or transformers folder (or Hub id) into OUT_DIR")
    co.add_argument("source")
    co.add_argument("out_dir")
    rate = co.add_mutually_exclusive_group()
    rate.add_argument("--target-bpw", type=_bits_per_weight,
                      help="a fixed rate: bits per weight, all side information included (accuracy is still "
                           "measured on the validation split when there is data)")
    rate.add_argument("--beta", type=_positive, help="fixed rate-distortion trade-off instead of a target rate")
    rate.add_argument("--max-accuracy-drop", type=_budget_pt, metavar="PT",
                      help="the smallest container whose metric drop on the validation split is at most PT "
                           "(default when no rate is given: the task's budget, 0.5 pt top-1 or 1 pt mAP)")
    co.add_argument("--rate-resolution", type=_gap, metavar="GAP",
                    help="the rate search stops bisecting between an accepted and a rejected rate once their bits "
                         "per weight are within this relative gap (0.1: 10 %%): larger makes fewer probes for a "
                         "container up to that much larger; 0 makes every probe (default: the gap the search's "
                         "own halvings reach)")
    co.add_argument("--dataset", default=DEFAULT_DATASET,
                    help="data for Fisher bit allocation and the accuracy check: a Hub id, a save_to_disk folder or "
                         "an imagefolder directory; 'default' is the task's own (fashion_mnist, or "
                         "fashion_mnist_scenes for a detector); a folder of images without class folders (or a "
                         "save_to_disk dataset without a label column) checks agreement with the original instead; "
                         "'none' makes synthetic images from the model (see --synthetic-images)")
    co.add_argument("--synthetic-images", type=int, default=SyntheticConfig.check_images, metavar="N",
                    help="with --dataset none: synthetic images that check agreement with the original (not "
                         "accuracy: held to half the budget); 0 makes none, uses a fixed conservative rate and "
                         "checks nothing")
    co.add_argument("--synthetic-calibration-images", type=int, default=SyntheticConfig.calibration_images,
                    metavar="N", help="with --dataset none: synthetic images to calibrate on (never checked on)")
    co.add_argument("--synthetic-steps", type=int, default=SyntheticConfig.steps,
                    help="optimisation steps per batch of synthetic images (more: closer statistics, slower)")
    co.add_argument("--transform", choices=TRANSFORMS, default=VAECompressionConfig.transform,
                    help="identity: scalar quantization, decodes bit-identically everywhere (default); vae-int: the "
                         "learned transform with an integer decoder, also bit-identical everywhere; vae: the learned "
                         "transform with a float decoder network, verified only where the float kernels match the "
                         "writer's")
    co.add_argument("--latent-quantizer", choices=LATENT_QUANTIZERS, default=VAECompressionConfig.latent_quantizer,
                    help="how the learned linear decoder's latents are quantized (--transform vae-int or auto): "
                         "scalar rounds each to an integer (default); d4 and e8 quantize them on that lattice (not "
                         "the default: the container codes the lattice's coordinates one by one, which has cost more "
                         "bytes than the lattice gains; benchmarks/results/vae_gptq.json)")
    co.add_argument("--chunk-size", type=int, default=VAECompressionConfig.chunk_size)
    co.add_argument("--hidden-size", type=int, default=VAECompressionConfig.hidden_size)
    co.add_argument("--train-steps", type=int, default=FitConfig.train_steps)
    co.add_argument("--calibration-batches", type=int, default=VAECompressionConfig.calibration_batches)
    co.add_argument("--rounding", choices=ROUNDINGS, default=VAECompressionConfig.rounding,
                    help="output_aware: GPTQ error compensation against each layer's calibration inputs (default; "
                         "identity transform, needs data); rate_aware: the same, each level chosen against what its "
                         "symbol costs (CERWU's ridge; smaller within the accuracy budget on resnet18 and MobileNetV3, "
                         "not on the ViT or RT-DETR, and slower); nearest: round each weight to its nearest level")
    co.add_argument("--correct-biases", action=argparse.BooleanOptionalAction, default=VAECompressionConfig.correct_biases,
                    help="shift stored biases by the output-mean change quantization causes (needs data)")
    co.add_argument("--correct-norms", action=argparse.BooleanOptionalAction, default=VAECompressionConfig.correct_norms,
                    help="shift norm layers' running means to their inputs' mean in the quantized model (needs data)")
    co.add_argument("--fold-batchnorm", action=argparse.BooleanOptionalAction, default=VAECompressionConfig.fold_batchnorm,
                    help="store each BatchNorm with its running statistics folded into its weight and bias: the same "
                         "eval-mode output in fewer bytes (--no-fold-batchnorm keeps them, e.g. to train the decoded model)")
    co.add_argument("--validation-split", metavar="SPLIT",
                    help="the split (or slice) the accuracy check selects on; default: validation/valid/dev, else "
                         "half of test; it must hold examples the model did not train on")
    co.add_argument("--overwrite", action="store_true",
                    help="replace an output folder that already holds model weights (its stale weights are removed)")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--finetune-steps", type=int, default=0,
                    help="task fine-tuning steps on the dataset's train split (0: post-hoc only)")
    co.add_argument("--rate-weight", type=float, default=FinetuneConfig.rate_weight,
                    help="fine-tuning loss per bit per weight")
    co.add_argument("--finetune-schedule", choices=SCHEDULES, default=FinetuneConfig.schedule,
                    help="fine-tuning learning rates: cosine decays them to 0 at the last step (default), constant "
                         "keeps them")
    co.add_argument("--checkpoint-dir", help="save accelerate state here during fine-tuning")
    co.add_argument("--checkpoint-every", type=int, default=FinetuneConfig.checkpoint_every)
    co.add_argument("--resume-from", help="an accelerate checkpoint folder (checkpoint-dir/step_N) to resume")

    ins = sub.add_parser("inspect", help="size breakdown of a compressed folder")
    ins.add_argument("out_dir")

    pu = sub.add_parser("push", help="push a compressed folder to the Hub with loading code and a measured model card")
    pu.add_argument("out_dir", help="a compressed folder (from `compress`)")
    pu.add_argument("repo_id")
    pu.add_argument("--base", help="the uncompressed source folder or Hub id: config, size and accuracy of the base")
    pu.add_argument("--base-model", help="Hub id recorded as the card's base_model (default: --base when a Hub id)")
    pu.add_argument("--endpoint", help="Hub endpoint URL (default: HF_ENDPOINT or huggingface.co)")
    pu.add_argument("--token", help="Hub token (default: the logged-in one)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--dataset", default=DEFAULT_DATASET,
                    help="evaluate base and compressed on it: 'default' is the task's own, 'none' skips it")
    pu.add_argument("--split", default="test")
    pu.add_argument("--batch-size", type=int, default=256)
    pu.add_argument("--license", help="card license (default: the base model's, when known)")
    pu.add_argument("--plot", help="a rate-accuracy PNG to put in the repository and the card")
    pu.add_argument("--tag", action="append", help="extra card tag (repeatable)")
    pu.add_argument("--commit-message")
    pu.add_argument("--json", action="store_true", help="print one JSON object")

    for p in (ev, co, ins):
        p.add_argument("--json", action="store_true", help="print one JSON object")
    for p in (ev, co):
        p.add_argument("--local-files-only", action="store_true", help="never touch the network")
    return parser


COMMANDS = {"evaluate": _cmd_evaluate, "compress": _cmd_compress, "inspect": _cmd_inspect, "push": _cmd_push}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "dataset", None) == "none":
        args.dataset = None
    try:
        result = COMMANDS[args.command](args)
    except (ContainerError, DataNotFoundError, OSError, ValueError) as err:
        print(f"hf-vae-compress {args.command}: error: {err}", file=sys.stderr)
        return 2
    if result is None:  # a non-main process of a distributed run
        return 0
    if result.get("warning"):
        print(f"hf-vae-compress {args.command}: warning: {result['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
