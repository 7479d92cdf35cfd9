"""A transformers v5 quantizer that decodes the container (``weights.vaec.safetensors``) while ``from_pretrained`` loads.

Importing this module (``import hf_vae_compress`` does) registers ``quant_method="hf_vae_compress"``
with ``transformers.quantizers``; a checkpoint whose ``config.json`` carries that
``quantization_config`` then loads with the ordinary call::

    import hf_vae_compress
    model = AutoModelForImageClassification.from_pretrained("org/name")

How the container reaches the loader (transformers 5.24, ``modeling_utils.PreTrainedModel.from_pretrained``):

1. ``get_hf_quantizer`` builds this quantizer from ``config.quantization_config`` and calls
   ``update_attn_implementation(config)``: the one hook that sees the model config *before*
   ``_get_resolved_checkpoint_files`` runs. We set ``config.transformers_weights`` to the container's
   name there. ``_get_resolved_checkpoint_files(transformers_explicit_filename=config.transformers_weights)``
   then resolves exactly that file, locally or through ``cached_file`` (Hub, cache, offline).
   ``transformers_weights`` is a load-time-only attribute that ``PreTrainedConfig.save_pretrained``
   never writes. It is **not** in ``config.json``: if it were, a stock loader without this plugin would
   read the container as a plain checkpoint and fill the model with random weights after a warning.
   Without it, a stock loader looks for ``model.safetensors`` / ``pytorch_model.bin``, finds
   neither, and raises ``OSError``.
2. ``preprocess_model(..., checkpoint_files=[container])`` -> ``_process_model_before_weight_loading``:
   the model exists on the meta device; we decode the container (``CompressedModel.decode``, every
   tensor SHA-256 checked) and fit the decoded names to the model's state dict. Decoded names are
   those of ``model.state_dict()`` at compression time; where they differ from this model's
   (TimmWrapper's ``timm_model.`` prefix, legacy names) they go through the model's own renamings
   (``get_model_conversion_mapping``). Any missing, unexpected or mis-shaped key raises here, with
   its own message (inside the weight-loading pipeline transformers would replace it by a generic
   "conversion issues" ``RuntimeError``).
3. ``get_model_conversion_mapping`` -> ``update_weight_conversions(conversions, model)``: we replace
   the list by **one** ``WeightConverter`` whose source patterns are the container's safetensors keys
   (anchored) and whose target is the model's first state-dict key.
   ``convert_and_load_state_dict_in_model`` collects every container part into that converter
   (nothing is "unexpected"), and its op, :class:`VaecDecode`, returns *every* decoded state-dict
   entry, which the loader sets on the model (``_is_hf_initialized``, so nothing is re-initialised).
4. ``postprocess_model`` -> ``_process_model_after_weight_loading``: we check that the op ran and
   loaded every key, so no path ends with randomly initialised weights.

Without this plugin, ``from_pretrained(repo, variant=...)`` asks for ``model.<variant>.safetensors``:
no variant names ``weights.vaec.safetensors``, so it raises ``OSError``. Repositories written before
format 2 name their container ``model.vaec.safetensors``, which ``variant="vaec"`` still reaches there
(a randomly initialised model after a warning): pushing them again renames it.

The hook names and signatures used here are listed in :data:`API_SURFACE` and checked by
:func:`check_transformers_api` (run by the tests), so an upgrade that moves them fails loudly.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
import time
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming, rename_source_key
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..codec import QUANT_METHOD, ContainerError
from ..loading import decode_container, fit_state_dict
from .quantization_config import QuantizationConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _plain_torch():
    """CPU tensors and float32 by default, whatever device / default dtype the caller's context set."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


class HfVaeCompressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed checkpoint, as transformers holds it.

    Fields, defaults and checks are :class:`~hf_vae_compress.integrations.quantization_config.QuantizationConfig`'s;
    this class puts them behind transformers' mixin (``to_dict``, ``to_json_string``, ``update``)
    and also keeps fields a newer hf_vae_compress wrote, so a model config saved again loses none.
    """

    def __init__(self, **fields):
        self.__dict__.update(QuantizationConfig.from_dict(fields).to_dict())
        self.__dict__.update({k: v for k, v in fields.items() if k not in self.__dict__})


class VaecDecode(ConversionOps):
    """Hands the decoded weights to the loader: every state-dict entry of the model, from all container parts."""

    def __init__(self, hf_quantizer: "HfVaeCompressQuantizer"):
        self.hf_quantizer = hf_quantizer  # `get_new_dtype` sees this attribute and leaves the inputs uncast

    def __deepcopy__(self, memo):
        # the loader deep-copies each converter per target; the copy must still report to *this* quantizer
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        received = [pattern for pattern, tensors in input_dict.items() if tensors]
        return self.hf_quantizer.take_decoded(first_key=full_layer_name, received=received)

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("hf_vae_compress checkpoints are saved with hf_vae_compress, not save_pretrained")


class HfVaeCompressQuantizer(HfQuantizer):
    """Loads a pre-compressed checkpoint; compressing on the fly is not supported.

    The container is decoded and checked (SHA-256 of every tensor, names, shapes) in
    ``_process_model_before_weight_loading``, where an exception reaches the caller unchanged;
    inside the weight-loading pipeline transformers turns exceptions into a generic "conversion
    issues" error, so the conversion op only hands over tensors that are already known to fit.
    """

    requires_calibration = True  # only pre-quantized checkpoints: `quantization_config=` on a float model raises

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.container_path: str | None = None
        self.container_keys: list[str] = []
        self.decoded: dict[str, torch.Tensor] | None = None
        self.loaded_keys: set[str] | None = None
        self.decode_seconds: float | None = None

    # 1. before the checkpoint files are resolved
    def update_attn_implementation(self, config):
        config.transformers_weights = self.quantization_config.container
        if getattr(config, "dtype", None) is None and self.quantization_config.dtype:
            config.dtype = getattr(torch, self.quantization_config.dtype)
        return config

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("hf_vae_compress checkpoints cannot be offloaded to disk while loading")

    # 2. model built on meta, checkpoint files known: decode and check everything here
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from transformers.conversion_mapping import get_model_conversion_mapping

        name = self.quantization_config.container
        files = list(checkpoint_files or [])
        if len(files) != 1 or Path(files[0]).name != name:
            raise OSError(f"hf_vae_compress expected the checkpoint file {name!r}, transformers resolved {files}")
        self.container_path = files[0]
        try:
            with safe_open(self.container_path, framework="pt") as f:
                self.container_keys = list(f.keys())
        except (SafetensorError, OSError) as err:  # truncated or not safetensors: say which file
            raise ContainerError(f"{self.container_path} is not a readable safetensors file (truncated or corrupt?): "
                                 f"{err}") from err
        start = time.perf_counter()
        with _plain_torch():  # from_pretrained runs this hook inside its init context (meta device, model dtype)
            decoded, names_verified = decode_container(self.container_path)  # ContainerError, IntegrityError propagate
        self.decode_seconds = time.perf_counter() - start
        renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
        self.decoded = self._fit(model, decoded, renamings, names_verified)
        self.loaded_keys = None
        return model

    def _fit(self, model, decoded: dict[str, torch.Tensor], renamings: list,
             names_verified: bool) -> dict[str, torch.Tensor]:
        """Name every decoded tensor as the model does (through its own renamings); raise on any
        missing, unexpected or mis-shaped key."""
        expected = model.state_dict()  # on meta: names, shapes and dtypes

        def rename(key: str) -> str:
            return rename_source_key(key, renamings, [], model.base_model_prefix, expected)[0]

        return fit_state_dict(decoded, expected, self.container_path, rename, names_verified)

    # 3. the weight-loading pipeline: one converter takes the whole container
    def update_weight_conversions(self, weight_conversions, model):
        first_key = next(iter(model.state_dict()))
        sources = [f"^{re.escape(k)}$" for k in self.container_keys]
        return [WeightConverter(sources, [first_key], [VaecDecode(self)], force_cpu=True)]

    def get_weight_conversions(self):
        return []

    def take_decoded(self, first_key: str, received: list[str]) -> dict[str, torch.Tensor]:
        if len(received) != len(self.container_keys):
            raise RuntimeError(f"transformers passed {len(received)} of the {len(self.container_keys)} container parts")
        decoded, self.decoded = self.decoded, None
        if decoded is None:
            raise RuntimeError("the container was not decoded before loading")
        out = {first_key: decoded.pop(first_key), **decoded}  # first key first: see WeightConverter.convert
        self.loaded_keys = set(out)
        return out

    # 4. after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        if "transformers_weights" in model.config:
            delattr(model.config, "transformers_weights")
        if self.loaded_keys is None:
            raise RuntimeError(f"hf_vae_compress: the container {self.container_path} was never loaded; "
                               "refusing to return a model with uninitialised weights")
        left = set(model.state_dict()) - self.loaded_keys
        if left:
            raise RuntimeError(f"hf_vae_compress: weights not loaded from the container: {sorted(left)[:5]}")
        return model

    def is_serializable(self):
        return False  # save the compressed form with hf_vae_compress.hub.save_pretrained

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Register the config and quantizer with transformers; a no-op when already registered."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(HfVaeCompressConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(HfVaeCompressQuantizer)


# What this module relies on in transformers, checked by `check_transformers_api`.
API_SURFACE = {
    "transformers.quantizers.HfQuantizer.update_attn_implementation": ["self", "config"],
    "transformers.quantizers.HfQuantizer.update_weight_conversions": ["self", "weight_conversions", "model"],
    "transformers.quantizers.HfQuantizer.preprocess_model": ["self", "model", "dtype", "kwargs"],
    "transformers.quantizers.HfQuantizer.postprocess_model": ["self", "model", "kwargs"],
    "transformers.quantizers.HfQuantizer._process_model_before_weight_loading": ["self", "model", "kwargs"],
    "transformers.quantizers.HfQuantizer._process_model_after_weight_loading": ["self", "model", "kwargs"],
    "transformers.quantizers.HfQuantizer.get_new_dtype": ["self", "converter", "param", "dtype"],
    "transformers.quantizers.HfQuantizer.is_serializable": ["self"],
    "transformers.core_model_loading.WeightConverter.__init__":
        ["self", "source_patterns", "target_patterns", "operations", "force_cpu"],
    "transformers.core_model_loading.ConversionOps.convert":
        ["self", "input_dict", "source_patterns", "target_patterns", "kwargs"],
    "transformers.conversion_mapping.get_model_conversion_mapping":
        ["model", "key_mapping", "hf_quantizer", "add_legacy"],
    "transformers.core_model_loading.rename_source_key":
        ["source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict", "reverse"],
    "transformers.modeling_utils._get_resolved_checkpoint_files": [
        "pretrained_model_name_or_path", "variant", "gguf_file", "use_safetensors", "user_agent", "is_remote_code",
        "transformers_explicit_filename", "download_kwargs", "tqdm_class"],
}
# Source facts: (function, snippet that must appear in its source, why).
API_SOURCE_FACTS = [
    ("transformers.modeling_utils.PreTrainedModel.from_pretrained",
     'transformers_explicit_filename=getattr(config, "transformers_weights", None)',
     "the container is resolved through config.transformers_weights"),
    ("transformers.modeling_utils.PreTrainedModel.from_pretrained", "checkpoint_files=checkpoint_files",
     "preprocess_model receives the resolved checkpoint files"),
    ("transformers.quantizers.auto.get_hf_quantizer", "config = hf_quantizer.update_attn_implementation(config)",
     "update_attn_implementation sees the config before the checkpoint files are resolved"),
    ("transformers.conversion_mapping.get_model_conversion_mapping",
     "hf_quantizer.update_weight_conversions(weight_conversions, model)",
     "the quantizer may replace the model's weight conversions"),
    ("transformers.configuration_utils.PreTrainedConfig.save_pretrained", '"transformers_weights"',
     "transformers_weights is never written to config.json"),
    ("transformers.utils.loading_report.log_state_dict_report", "loading_info.conversion_errors",
     "an exception in a conversion op makes from_pretrained raise"),
]


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def check_transformers_api() -> list[str]:
    """Problems with the transformers API this quantizer relies on (empty when all is as expected)."""
    problems = []
    for dotted, params in API_SURFACE.items():
        try:
            found = list(inspect.signature(_resolve(dotted)).parameters)
        except (ImportError, AttributeError) as err:
            problems.append(f"{dotted} is gone ({err})")
            continue
        if found != params:
            problems.append(f"{dotted} takes {found}, hf_vae_compress was written for {params}")
    for dotted, snippet, why in API_SOURCE_FACTS:
        try:
            source = inspect.getsource(_resolve(dotted))
        except (ImportError, AttributeError, OSError) as err:
            problems.append(f"{dotted} is gone ({err}); needed because {why}")
            continue
        if snippet not in source:
            problems.append(f"{dotted} no longer contains `{snippet}`; needed because {why}")
    return [f"transformers {transformers.__version__}: {p}" for p in problems]
