"""Reading and writing uncompressed model folders in the format their own library loads natively.

Two formats are recognised by their ``config.json``:

* **timm** (``architecture`` key, as written by ``timm.models.save_for_hf``), loaded with
  ``timm.create_model("local-dir:...")`` / ``"hf-hub:..."``;
* **transformers** (``model_type`` key), loaded with the class named in ``architectures``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .codec import folder_container, is_compressed_config

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def read_config(folder: str | Path) -> dict:
    """A model folder's ``config.json``; a missing or broken one raises an error that names the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a timm or transformers model folder")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): restore the config.json saved with the model") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: not a model config")
    return config


def model_format(config: dict) -> str:
    """``"timm"`` or ``"transformers"``, from the keys of a ``config.json``."""
    if "architecture" in config and "model_type" not in config:
        return "timm"
    if "model_type" in config or "architectures" in config:
        return "transformers"
    raise ValueError("config.json names neither a timm architecture nor a transformers model_type")


def looks_local(source: str) -> bool:
    """Whether ``source`` was meant as a local path rather than a Hub repo id (``org/name``): it starts
    like a path, has more than one separator, is no valid repo id, or its first part exists here."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "~", os.sep)) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return True
    if "/" in source and Path(source.split("/")[0]).exists():
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def nearest_existing(path: Path) -> Path | None:
    """The closest folder above ``path`` that exists (what a path typo or a new output hangs from)."""
    return next((parent for parent in path.absolute().parents if parent.exists()), None)


def resolve_folder(source: str, **hub_kwargs) -> Path:
    """A local folder as is; a Hub id through ``snapshot_download`` (cache and offline aware).

    A string that looks like a local path is never sent to the Hub: a typo in it is answered with
    "no such folder", not with a repo-id error.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{source} is a file, not a model folder: give the folder that holds config.json "
                                 "and the weights")
    if looks_local(source):
        raise FileNotFoundError(f"no such folder: {source} (the nearest existing folder is "
                                f"{nearest_existing(path)}); check the path")
    try:
        return Path(snapshot_download(source, **hub_kwargs))
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{source!r} is not a local folder and no model repository on the Hub by that name "
                                "(or it is private/gated: log in with `hf auth login`); check the spelling") from err
    except (LocalEntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(f"{source!r} is not a local folder and not reachable on the Hub (offline, and not in "
                                "the local cache); check the spelling, or the network if it is a Hub id") from err


def check_model_folder(folder: str | Path) -> dict:
    """The config of an uncompressed model folder with weights; raises before anything is loaded
    when the folder's config is broken, it holds no weights, or it is already compressed."""
    folder = Path(folder)
    config = read_config(folder)
    if is_compressed_config(config) or folder_container(folder).is_file():  # today's config, or an older folder
        raise ValueError(f"{folder} is already compressed by hf-vae-compress: compressing it again would measure "
                         "the drop against the compressed model, not the original; compress the original model")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise FileNotFoundError(f"{folder} has a config.json but no weights (model.safetensors, pytorch_model.bin "
                                "or their shards): copy the weights saved with the model into it")
    model_format(config)  # names neither library: refused here
    return config


def _misfit(folder: Path, architecture: str, detail: str) -> ValueError:
    return ValueError(f"the weights in {folder} do not fit {architecture}, the architecture its config.json names "
                      f"({detail}): the config belongs to another model; use the config.json saved with these weights")


def _keys(keys) -> str:
    keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)  # mismatches: (key, shape, shape)
    return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"


def weights_bytes(folder: str | Path) -> int:
    """Bytes of every weight file in a folder: what a download of the weights costs."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def build_empty(folder: str | Path) -> torch.nn.Module:
    """The architecture described by a folder's config, randomly initialised, in eval mode."""
    folder = Path(folder)
    config = read_config(folder)
    if model_format(config) == "timm":
        import timm

        model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    else:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(folder)
        model_cls = getattr(transformers, cfg.architectures[0])
        model = model_cls(cfg)
        model.name_or_path = str(folder)
    return model.eval()


def load_model(source: str | Path, **hub_kwargs) -> torch.nn.Module:
    """Load an uncompressed model folder or Hub id with its own library, in eval mode.

    Strictly: weights that do not fit the architecture the config names (a missing, unexpected or
    mis-shaped key) raise instead of leaving layers randomly initialised.
    """
    folder = resolve_folder(str(source), **hub_kwargs)
    config = check_model_folder(folder)
    if model_format(config) == "timm":
        import timm

        try:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True)  # load_state_dict(strict=True)
        except (RuntimeError, AttributeError, KeyError) as err:
            raise _misfit(folder, config["architecture"], str(err).strip().splitlines()[0]) from err
        return model.eval()
    import transformers

    name = (config.get("architectures") or [None])[0]
    model_cls = getattr(transformers, name or "", None)
    if model_cls is None:
        raise ValueError(f"{folder / 'config.json'} names the architecture {name!r}, which transformers "
                         f"{transformers.__version__} does not have")
    try:
        model, info = model_cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except RuntimeError as err:  # size mismatches: one line per key
        raise _misfit(folder, name, str(err).strip().splitlines()[0]) from err
    problems = {kind: info.get(key) for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                                      ("mis-shaped", "mismatched_keys"))}
    detail = "; ".join(f"{kind} keys {_keys(keys)}" for kind, keys in problems.items() if keys)
    if detail:
        raise _misfit(folder, name, detail)
    return model.eval()


def drop_timm_num_classes(config: dict) -> dict:
    """A ``config.json`` (changed in place) that transformers' ``TimmWrapper`` can load too.

    timm 1.0.31's ``save_for_hf`` writes ``num_classes`` into ``model_args`` as well as at the top
    level, and ``TimmWrapper`` would then pass it twice; the top-level one stays. Configs of another
    format are returned unchanged. Every timm config this library writes goes through here:
    :func:`save_timm` and :func:`hf_vae_compress.hub.save_pretrained`.
    """
    if model_format(config) == "timm":
        config.get("model_args", {}).pop("num_classes", None)
    return config


def save_timm(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """``timm.models.save_for_hf`` with two fixes: the config goes through :func:`drop_timm_num_classes`,
    and the weights may be stored in a smaller dtype.

    The writer of the timm folders :func:`load_model` reads (the reference models' recipe and the
    tests' timm fixtures save with it); it is kept beside that reader so the two agree.
    """
    import timm.models
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    config_path = folder / "config.json"
    config = drop_timm_num_classes(json.loads(config_path.read_text()))
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if dtype != torch.float32:
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
