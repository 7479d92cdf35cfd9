"""The codec core: pure PyTorch + pcodec + safetensors (constriction to read version-1 files);
knows nothing of transformers, timm or the Hub."""

from .compress import compress
from .compressed import CompressedModel
from .config import JsonConfig, VAECompressionConfig
from .container import CONTAINER_NAME, QUANT_METHOD, ContainerError, container_name, folder_container, is_compressed_config
from .integrity import ALLOW_UNVERIFIED_ENV, IntegrityError, MachineDependentError, ModelHash
from .latents import Latents
from .transform import Shard
from .v2 import assemble

__all__ = ["ALLOW_UNVERIFIED_ENV", "CONTAINER_NAME", "QUANT_METHOD", "CompressedModel", "ContainerError", "IntegrityError",
           "JsonConfig", "Latents", "MachineDependentError", "ModelHash", "Shard", "VAECompressionConfig", "assemble",
           "compress", "container_name", "folder_container", "is_compressed_config"]
