"""The codec core: pure PyTorch + pcodec + safetensors (constriction to read version-1 files);
knows nothing of transformers, timm or the Hub."""

from .compress import compress
from .compressed import CompressedModel
from .config import VAECompressionConfig
from .container import CONTAINER_NAME, ContainerError, folder_container
from .integrity import ALLOW_UNVERIFIED_ENV, IntegrityError, MachineDependentError
from .latents import Latents
from .transform import Shard
from .v2 import assemble

__all__ = ["ALLOW_UNVERIFIED_ENV", "CONTAINER_NAME", "CompressedModel", "ContainerError", "IntegrityError", "Latents",
           "MachineDependentError", "Shard", "VAECompressionConfig", "assemble", "compress", "folder_container"]
