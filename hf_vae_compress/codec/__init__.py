"""The codec core: pure PyTorch + pcodec + safetensors (constriction to read version-1 files);
knows nothing of transformers, timm or the Hub."""

from .compress import compress
from .compressed import CompressedModel
from .config import FitConfig, JsonConfig, VAECompressionConfig
from .format.framing import (
    CONTAINER_NAME, QUANT_METHOD, ContainerError, container_name, folder_container, is_compressed_config,
)
from .format.integrity import ALLOW_UNVERIFIED_ENV, IntegrityError, MachineDependentError, ModelHash, allow_unverified
from .fit import Shard
from .latents import Latents

__all__ = [
    "ALLOW_UNVERIFIED_ENV", "CONTAINER_NAME", "QUANT_METHOD", "CompressedModel", "ContainerError", "FitConfig",
    "IntegrityError", "JsonConfig", "Latents", "MachineDependentError", "ModelHash", "Shard", "VAECompressionConfig",
    "allow_unverified", "compress", "container_name", "folder_container", "is_compressed_config",
]
