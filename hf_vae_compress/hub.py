"""Hugging Face Hub round trip: ``save_pretrained`` / ``push_to_hub`` a compressed model, ``create_model`` it back.

A saved folder (and a pushed repository) holds::

    config.json                  the base model's config + quantization_config (+ auto_map)
    weights.vaec.safetensors     the container (a name no stock loader, nor any ``variant``, asks for)
    modeling_hf_vae_compress.py  the remote-code shim for trust_remote_code=True
    README.md                    the model card, rendered from model_cards/model_card.md
    preprocessor_config.json ... the base folder's known side files (:data:`SIDE_FILES`), unchanged
    rate_accuracy_<model>.png    the rate-accuracy plot, when one is given

Loading it back:

* transformers: ``import hf_vae_compress`` registers the quantizer of
  :mod:`hf_vae_compress.integrations.transformers_quantizer`, then
  ``AutoModelForImageClassification.from_pretrained(repo)`` decodes (also a timm-format repo, through
  ``TimmWrapper``; ``AutoModelForObjectDetection`` for a detector); ``trust_remote_code=True`` does
  the import through the shim;
* timm: :func:`hf_vae_compress.create_model` (``"hf-hub:org/name"`` or ``"local-dir:/path"``),
  in :mod:`hf_vae_compress.integrations.timm`.

:func:`save_pretrained` and :func:`push_to_hub` take the :class:`~hf_vae_compress.CompressedModel`
as their first argument: the codec core knows nothing of the Hub, and no Hub code is attached to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .codec import CONTAINER_NAME, CompressedModel
from .codec.folding import BATCHNORM_FOLDED
from .codec.transform import transform_class
from .integrations import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_DIR, REMOTE_CODE_MODULE
from .integrations.quantization_config import QuantizationConfig
from .loading import find_container, load_compressed
from .models import (
    WEIGHT_SUFFIXES, drop_timm_num_classes, load_model, model_format, nearest_existing, read_config, resolve_folder,
    weights_bytes,
)
from .tasks import Task, task_for

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "model_card.md"
CARD_TAGS = ["hf-vae-compress", "vae-codec", "compressed"]  # + the task's pipeline tag
_DATASET_IDS = {"fashion_mnist": "zalando-datasets/fashion_mnist"}


@dataclass
class CardInfo:
    """What the model card says that the files cannot: provenance, license, and what to evaluate on.

    Accuracy is never given here: with ``dataset`` set, :func:`save_pretrained` measures it, for the
    base model and the compressed one, with :func:`hf_vae_compress.evaluate`.
    """

    base_model: str | None = None  # Hub id of the uncompressed model (card `base_model`); inferred when possible
    license: str | None = None  # inferred from the base folder's card or timm pretrained_cfg when not set
    dataset: str | None = None  # "default" (the task's own), a save_to_disk folder or a Hub dataset: evaluate on it
    split: str = "test"
    dataset_id: str | None = None  # Hub id to record in the card; default: derived from `dataset`
    plot: str | Path | None = None  # a rate-accuracy PNG, copied into the repo
    tags: list[str] = field(default_factory=list)
    model_name: str | None = None  # card title and model-index name; push_to_hub uses the repo id
    batch_size: int = 256


def _as_card_info(card_info: CardInfo | dict | None) -> CardInfo:
    if card_info is None:
        return CardInfo()
    if isinstance(card_info, dict):
        return CardInfo(**card_info)
    return card_info


def _config_with_quantization(config: dict, quantization: QuantizationConfig, task: Task) -> dict:
    """The base model's config, plus the quantization config and the remote-code shim's ``auto_map`` entry."""
    config = json.loads(json.dumps(config))  # deep copy
    config["quantization_config"] = quantization.to_dict()
    auto_map = dict(config.get("auto_map") or {})
    shim = {task.auto_class: REMOTE_CODE_AUTO_MAP[task.auto_class]}
    clash = {k: v for k, v in auto_map.items() if k in shim and v != shim[k]}
    if clash:
        logger.warning("the base model uses its own remote code %s; trust_remote_code loading of the compressed "
                       "model is left to it (import hf_vae_compress before from_pretrained)", clash)
    else:
        auto_map.update(shim)
        config["auto_map"] = auto_map
    return drop_timm_num_classes(config)


def _base_card_metadata(src: Path) -> dict:
    card = src / "README.md"
    if not card.exists():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.to_dict()
    except Exception as err:  # noqa: BLE001 - a broken base card only loses metadata we can do without
        logger.warning("could not read the base model card %s: %s", card, err)
        return {}


def _infer_base_model(source: str, src: Path, config: dict) -> str | None:
    if not Path(source).is_dir():
        return source.split("@")[0]  # a Hub id
    hub_id = config.get("pretrained_cfg", {}).get("hf_hub_id")
    return hub_id or None


def _measure(src: Path, out: Path, info: CardInfo, task: Task, has_base_weights: bool) -> dict:
    """The task metric (top-1, or a detector's mAP) of the base and the compressed model on one
    dataset split, measured now."""
    data = task.load(info.split)
    result = {"compressed": task.score(load_compressed(out), data, batch_size=info.batch_size)}
    if has_base_weights:
        result["base"] = task.score(load_model(src), data, batch_size=info.batch_size)
    return result


def _describe(task: Task, metrics: dict | None) -> str:
    return task.describe(metrics) if metrics else "not measured"


def _settings_table(compressed: CompressedModel) -> str:
    config = compressed.config.to_dict()
    if not transform_class(config["transform"]).has_weight_grid:  # only a learned transform is trained
        config["train_steps"] = config["fit"]["train_steps"]
    # the setting as it was applied: a container written before folding records no count, and stored BatchNorm as it was
    config["fold_batchnorm"] = config.get("fold_batchnorm", True) and BATCHNORM_FOLDED in compressed.header
    keys = ["target_bits_per_weight", "beta", "transform", "rounding", "correct_biases", "correct_norms",
            "fold_batchnorm", "chunk_size",
            "hidden_size", "normalization", "min_numel", "raw_dtype", "train_steps", "calibration_batches", "seed"]
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | `{config[k]}` |" for k in keys if k in config and config[k] is not None]
    return "\n".join(lines)


def _coding_summary(compressed: CompressedModel) -> str:
    """One phrase for the card: how this container's weights were coded, and whether they were then
    fine-tuned (a reader comparing it with a post-hoc container of the same model must know that
    it trained on the task's data)."""
    config = compressed.config
    if not transform_class(config.transform).has_weight_grid:
        decoder = "an integer decoder" if transform_class(config.transform).portable else "a float decoder network"
        coding = f"a learned variational (VAE) transform with {decoder}, whose latents are quantized and entropy-coded"
    else:
        rounding = {"output_aware": "output-aware GPTQ rounding against calibration data",
                    "rate_aware": "rate-aware output-aware rounding against calibration data"}.get(config.rounding,
                                                                                               "nearest rounding")
        coding = f"entropy-coded scalar quantization on a Fisher-allocated grid, with {rounding}"
    tuned = compressed.header.get("finetune")
    if tuned:
        coding += (f", then fine-tuned for {tuned['steps']:,} steps on the task's training data (task loss, "
                   f"distillation from the base model and {tuned['rate_weight']:g} x the estimated bits per weight)")
    return coding


def _examples_scored(validation: dict) -> tuple[str, str]:
    """How many of the split's examples decided the verdict ("all 1,000", "875 of the 1,000"), and
    how, in parentheses (empty when there is nothing to add): stopped early on a sound verdict, wrong
    with at most ``stopping_error`` chance, and "verified" when the rate search screened the
    container on part of the split, then scored it on to that verdict. Containers from before
    early stopping record only ``examples``, all of the split."""
    scored, total = validation["examples"], validation.get("split_examples") or validation["examples"]
    notes = []
    if scored < total:
        error = validation.get("stopping_error")
        notes.append(f"{validation.get('early_stop') or 'decided'} early"
                     + (f", wrong with at most {100 * error:g} % chance" if error is not None else ""))
    if validation.get("verified"):
        notes.append("screened on part of the split, then verified")
    count = f"all {scored:,}" if scored >= total else f"{scored:,} of the {total:,}"
    return count, f" ({'; '.join(notes)})" if notes else ""


def _validation_summary(validation: dict | None) -> str:
    """The card's "How accuracy was checked" paragraph, from the pipeline's ``stats["validation"]``
    (:meth:`~hf_vae_compress.pipeline.Source.validation_drop`): which check decided the rate
    (labelled accuracy, agreement with the original on the user's unlabelled images or on synthetic
    images, or none), the measured figure against what it was allowed, and the pipeline's own words
    on which examples were used and whether the model may have trained on them."""
    if validation is None:
        return ("Which check decided the rate: **none**. No validation was recorded with this container: its "
                "effect on accuracy was not measured.")
    check = validation.get("check", "labelled accuracy")
    count, how = _examples_scored(validation)
    if check == "labelled accuracy":
        text = (f"Which check decided the rate: **{check}**. The rate was chosen on {count} examples of the "
                f"`{validation['split']}` split{how}: {validation['metric']} "
                f"{100 * validation['base']:.2f} % for the base model, {100 * validation['compressed']:.2f} % "
                f"compressed, a drop of {validation['drop_pt']:.2f} pt (budget {validation['budget_pt']} pt). "
                f"{validation['selection']}")
    else:
        allowed = validation.get("allowed_pt", validation["budget_pt"])
        text = (f"Which check decided the rate: **{check}**. On {count} {validation['split']} images{how} "
                f"the compressed model scores {validation['metric']} {100 * validation['compressed']:.2f} % "
                f"against the original's {100 * validation['base']:.2f} %, a drop of {validation['drop_pt']:.2f} pt "
                f"(allowed {allowed:g} pt of a {validation['budget_pt']} pt budget). {validation['selection']}")
    if not validation["accuracy_checked"]:
        text += f" **This is not an accuracy check:** {validation['warning']}"
    return text


def render_card(compressed: CompressedModel, config: dict, info: CardInfo, task: Task, *, base_bytes: int | None,
                base_files: list[str], container_bytes: int, metrics: dict | None, repo_id: str, plot: str | None):
    """The model card (a ``huggingface_hub.ModelCard``) from the template in ``model_cards/``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if not CARD_TEMPLATE.exists():
        raise FileNotFoundError(f"the model card template {CARD_TEMPLATE} is missing")
    fmt = model_format(config)
    quantization = QuantizationConfig.from_dict(config["quantization_config"])
    report = compressed.report()
    num_weights = report["num_weights"]
    dataset_id = info.dataset_id
    if dataset_id is None and info.dataset:
        dataset_id = _DATASET_IDS.get(task.dataset) or Path(task.dataset).name
    model_name = info.model_name or repo_id
    eval_results = None
    if metrics:
        eval_results = [EvalResult(
            task_type=task.pipeline_tag, task_name=task.pipeline_tag.replace("-", " ").title(),
            dataset_type=dataset_id, dataset_name=dataset_id,
            dataset_split=info.split, metric_type=task.metric_type, metric_name=task.metric_title,
            metric_value=round(metrics["compressed"][task.metric], 6))]
    extra = {"base_model_relation": "quantized"} if info.base_model else {}
    card_data = ModelCardData(
        base_model=info.base_model, library_name=fmt, pipeline_tag=task.pipeline_tag, license=info.license,
        tags=list(dict.fromkeys([*CARD_TAGS, task.pipeline_tag, *info.tags])), datasets=[dataset_id] if metrics else None,
        model_name=model_name, eval_results=eval_results, **extra)
    rows = []
    if base_bytes:
        rows.append(dict(label=f"base{f' ({info.base_model})' if info.base_model else ''}",
                         file=", ".join(base_files), bytes=f"{base_bytes:,}",
                         bits_per_weight=f"{8 * base_bytes / num_weights:.2f}", size="1x",
                         score=_describe(task, (metrics or {}).get("base"))))
    rows.append(dict(label="hf-vae-compress", file=CONTAINER_NAME, bytes=f"{container_bytes:,}",
                     bits_per_weight=f"{8 * container_bytes / num_weights:.2f}",
                     size=f"{base_bytes / container_bytes:.1f}x smaller" if base_bytes else "",
                     score=_describe(task, (metrics or {}).get("compressed"))))
    compressed_metrics = (metrics or {}).get("compressed") or {}
    architecture = config.get("architecture") or ", ".join(config.get("architectures") or [])
    return ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE),
        title=model_name.split("/")[-1], base_model=info.base_model, library_name=fmt, repo_id=repo_id,
        bits_per_weight=f"{8 * container_bytes / num_weights:.2f}",
        ratio_vs_fp32=f"{report['fp32_safetensors_bytes'] / container_bytes:.1f}",
        dtype=quantization.dtype, architecture=architecture, rows=rows,
        evaluated=bool(metrics), split=info.split, dataset=dataset_id,
        num_examples=compressed_metrics.get("num_examples"), plot=plot, container=CONTAINER_NAME,
        remote_code_file=f"{REMOTE_CODE_MODULE}.py", settings=_settings_table(compressed),
        metric_title=task.metric_title, bootstrap=task.metric == "top1", auto_class=task.auto_class,
        task_name=task.pipeline_tag.replace("-", " "), method=_coding_summary(compressed),
        codec_version=quantization.codec_version, batchnorm_folded=compressed.batchnorm_folded,
        validation=_validation_summary(compressed.stats.get("validation")))


def _weight_files(folder: Path) -> list[str]:
    """Top-level files of a folder that a loader would take for weights: weight files, shard
    indexes and containers (all end in a weight suffix or ``.index.json``)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.name.endswith((*WEIGHT_SUFFIXES, ".index.json")))


# What travels from a source folder into a compressed folder or a pushed repository: the model's
# and its preprocessing's configs, what the model's library needs to load it, and its license.
# Anything else (notes, training results, stray JSON) stays behind: a user's files are never
# published by surprise.
SIDE_FILES = frozenset({
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json", "feature_extractor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "open_clip_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
})


def side_files(src: str | Path) -> list[Path]:
    """The known side files of a model folder (see :data:`SIDE_FILES`), plus the Python modules its
    ``auto_map`` names: the base model's own remote code, which its library needs to build it."""
    src = Path(src)
    names = set(SIDE_FILES)
    config = src / "config.json"
    if config.is_file():
        auto_map = json.loads(config.read_text()).get("auto_map") or {}
        for ref in auto_map.values():
            for item in ref if isinstance(ref, list) else [ref]:
                if isinstance(item, str) and "." in item:
                    names.add(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(p for p in src.iterdir() if p.is_file() and p.name in names)


def copy_side_files(src: str | Path, out: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a model folder's known side files (never its weights, nor unknown files) into ``out``."""
    for f in side_files(src):
        if f.name not in skip:
            shutil.copy2(f, Path(out) / f.name)


def _check_writable(out: Path) -> None:
    """Create and remove a probe folder where ``out`` will be staged: a read-only or missing
    location fails here, before any work, rather than after it."""
    parent = nearest_existing(out)
    if parent is None or not parent.is_dir():
        raise NotADirectoryError(f"cannot write the output {out}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hf-vae-compress-probe-", dir=parent))
    except OSError as err:
        raise PermissionError(f"cannot write the output {out}: {parent} is not writable ({err.strerror}); "
                              "choose another output folder") from err


def check_output(out_dir: str | Path, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Refuse an output folder that would cost the user a model, before any long work.

    The output may not be the source folder, lie inside it, or contain it (replacing the output
    would take the source with it). A folder that already holds weights (a model's weight files,
    shards or a container) is refused unless ``overwrite``; then the stale weights are not kept.
    """
    out = Path(out_dir).expanduser()
    target = out.resolve()
    src = Path(source).expanduser() if source is not None else None
    if src is not None and src.is_dir():
        src = src.resolve()
        if target == src or src in target.parents:
            where = "is the source folder" if target == src else f"is inside the source folder {src}"
            raise ValueError(f"the output {out} {where}: the source is never written to; choose an output folder "
                             "outside it")
        if target in src.parents:
            raise ValueError(f"the output {out} contains the source folder {src}: replacing it would delete the source; "
                             "choose another output folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"the output {out} is a file, not a folder: choose a new folder name")
    if out.is_dir() and not overwrite:
        weights = _weight_files(out)
        if weights:
            raise FileExistsError(f"the output folder {out} already holds model weights ({', '.join(weights)}): pass "
                                  "--overwrite (overwrite=True) to replace them, or choose an empty folder")
    _check_writable(out)
    return out


def _write(path: Path, data: bytes | str) -> None:
    """Write a file and flush it to disk, so the rename that publishes its folder publishes its bytes."""
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def _copy_user_files(old: Path, new: Path) -> None:
    """Keep what the user had in an output folder beside what is rewritten (notes, a checkpoint
    folder), except stale weights: hard links where possible, so nothing is copied twice."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    stale = set(_weight_files(old))
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name in stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link)
        else:
            link(str(entry), str(new / entry.name))


def _remove_abandoned_stages(out: Path) -> None:
    """Delete the staging siblings of ``out`` that killed runs left behind: those whose writing
    process no longer exists on this machine (a live one may be another save in progress)."""
    for stage in out.parent.glob(f".{out.name}.partial-*"):
        pid = stage.name.removeprefix(f".{out.name}.partial-").split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        logger.info("removing %s, left by a run that was killed while writing", stage)
        shutil.rmtree(stage, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def staged_folder(out: Path):
    """Yield a temporary sibling of ``out`` to write into; on success it replaces ``out``.

    A run killed while writing leaves ``out`` as it was (the hidden ``.NAME.partial-PID-*`` sibling
    is never loaded, and the next save removes it once its process is gone). An existing ``out``
    is renamed aside, the new folder renamed in, the old one deleted: between the two renames
    ``out`` is briefly absent, never half-written.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_stages(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private
    try:
        yield tmp
        if out.exists():
            _copy_user_files(out, tmp)
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(compressed: CompressedModel, source_folder: str | Path, out_dir: str | Path,
                    card_info: CardInfo | dict | None = None, *, overwrite: bool = False, **hub_kwargs) -> Path:
    """Write a loadable, documented folder: config, container, remote-code shim, model card.

    ``source_folder`` is the uncompressed base model (folder or Hub id): its config and
    preprocessing files are copied, its weights measured for the size table and, when
    ``card_info.dataset`` is set, evaluated next to the compressed model. A compressed folder (as
    written by ``hf-vae-compress compress``) also works, without the base row of the table.

    The folder is written whole into a temporary sibling and renamed into place (see
    :func:`staged_folder`). ``out_dir`` may not be or hold the source, and a folder that already
    holds weights is replaced only with ``overwrite=True`` (see :func:`check_output`).
    """
    info = _as_card_info(card_info)
    src = resolve_folder(str(source_folder), **hub_kwargs)
    out = check_output(out_dir, src, overwrite)
    config = read_config(src)
    fmt = model_format(config)
    base_meta = _base_card_metadata(src)
    info = dataclasses.replace(
        info,
        base_model=info.base_model or _infer_base_model(str(source_folder), src, config),
        license=info.license or base_meta.get("license") or config.get("pretrained_cfg", {}).get("license"),
    )
    source_container = find_container(src)  # a compressed source folder: its container is not base weights
    base_files = sorted(p.name for p in src.iterdir()
                        if p.name.endswith(WEIGHT_SUFFIXES) and (source_container is None or p != source_container))
    base_bytes = weights_bytes(src) - (source_container.stat().st_size if source_container else 0)

    with staged_folder(out) as tmp:
        copy_side_files(src, tmp, skip=("config.json",))  # configs and preprocessing; weights become the container
        _write(tmp / CONTAINER_NAME, compressed.to_bytes())
        container_bytes = (tmp / CONTAINER_NAME).stat().st_size
        bits_per_weight = 8 * container_bytes / compressed.report()["num_weights"]
        task = task_for(config, info.dataset)
        config = _config_with_quantization(config, QuantizationConfig.of(compressed, bits_per_weight), task)
        _write(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        for shim in sorted(REMOTE_CODE_DIR.glob("modeling_*.py")):
            shutil.copyfile(shim, tmp / shim.name)
        plot = None
        if info.plot:
            plot = Path(info.plot).name
            shutil.copyfile(info.plot, tmp / plot)
        metrics = _measure(src, tmp, info, task, base_bytes > 0) if info.dataset else None
        card = render_card(compressed, config, info, task, base_bytes=base_bytes or None, base_files=base_files,
                           container_bytes=container_bytes, metrics=metrics, repo_id=info.model_name or out.name,
                           plot=plot)
        text = str(card)
        _write(tmp / "README.md", text if text.endswith("\n") else text + "\n")
    logger.info("saved %s model (%s, %.2f bits/weight) to %s", fmt, CONTAINER_NAME, bits_per_weight, out)
    return out


def check_reachable(endpoint: str, timeout_s: float = 10.0) -> None:
    """Raise ``ConnectionError`` (naming the endpoint and what to do) unless the Hub at ``endpoint``
    answers a cheap ``whoami`` request (no token sent): any HTTP answer will do, even an error status."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(f"cannot push to {endpoint}: HF_HUB_OFFLINE is set; unset it to push")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint.rstrip('/')}/api/whoami-v2"),
                               timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"the Hub at {endpoint} is not reachable ({reason}): check the network, --endpoint or "
                              "HF_ENDPOINT; nothing was evaluated or uploaded") from err


def push_to_hub(compressed: CompressedModel, repo_id: str, source_folder: str | Path,
                card_info: CardInfo | dict | None = None, *, endpoint: str | None = None,
                token: str | bool | None = None, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None):
    """``save_pretrained`` into a temporary folder, then upload it as **one** commit.

    Files whose content is already on the Hub are dropped by the client, so pushing the same
    content again creates no commit (the returned ``CommitInfo`` then names the existing head).
    Weight files left on the Hub by an earlier upload (``*.safetensors``, ``*.bin``, ... other than
    the container) are deleted in the same commit: a stale ``model.safetensors`` would let a stock
    loader load the wrong weights.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    info = _as_card_info(card_info)
    info = dataclasses.replace(info, model_name=info.model_name or repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    check_reachable(api.endpoint)  # before save_pretrained's evaluation, which can take minutes
    with tempfile.TemporaryDirectory(prefix="hf-vae-compress-push-") as tmp:
        folder = save_pretrained(compressed, source_folder, Path(tmp) / repo_id.split("/")[-1], info)
        api.create_repo(repo_id, private=private, exist_ok=True)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        remote = set(api.list_repo_files(repo_id, revision=revision))
        stale = sorted(p for p in remote - set(files) if p.endswith(WEIGHT_SUFFIXES))
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        bpw = QuantizationConfig.from_dict(read_config(folder)["quantization_config"]).bits_per_weight
        return api.create_commit(
            repo_id, operations=operations, revision=revision,
            commit_message=commit_message or f"Upload model compressed with hf-vae-compress ({bpw:.2f} bits/weight)")
