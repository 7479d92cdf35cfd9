"""Reading and writing uncompressed model folders in the format their own library loads natively.

Two formats are recognised by their ``config.json``:

* **timm** (``architecture`` key, as written by ``timm.models.save_for_hf``), loaded with
  ``timm.create_model("local-dir:...")`` / ``"hf-hub:..."``;
* **transformers** (``model_type`` key), loaded with the class named in ``architectures``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a timm or transformers model folder")
    return json.loads(path.read_text())


def model_format(config: dict) -> str:
    """``"timm"`` or ``"transformers"``, from the keys of a ``config.json``."""
    if "architecture" in config and "model_type" not in config:
        return "timm"
    if "model_type" in config or "architectures" in config:
        return "transformers"
    raise ValueError("config.json names neither a timm architecture nor a transformers model_type")


def resolve_folder(source: str, **hub_kwargs) -> Path:
    """A local folder as is; a Hub id through ``snapshot_download`` (cache and offline aware)."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, **hub_kwargs))


def weights_bytes(folder: str | Path) -> int:
    """Bytes of every weight file in a folder: what a download of the weights costs."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


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
    """Load an uncompressed model folder or Hub id with its own library, in eval mode."""
    folder = resolve_folder(str(source), **hub_kwargs)
    config = read_config(folder)
    if model_format(config) == "timm":
        import timm

        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    else:
        import transformers

        model_cls = getattr(transformers, config["architectures"][0])
        model = model_cls.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def save_transformers(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """``save_pretrained`` with the weights stored in ``dtype`` while the config keeps float32, so
    ``from_pretrained`` computes in fp32 (storage dtype is a size choice, not a compute one)."""
    original = next(model.parameters()).dtype
    model.to(dtype).save_pretrained(folder)
    model.to(original)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def save_timm(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """``timm.models.save_for_hf`` with two fixes.

    ``num_classes`` is dropped from ``model_args`` (timm 1.0.31 writes it and transformers'
    TimmWrapper then passes it twice), and the weights may be stored in a smaller dtype.
    """
    import timm.models
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if dtype != torch.float32:
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
