"""The codec core: pure PyTorch + pcodec + safetensors (constriction to read version-1 files);
knows nothing of transformers, timm or the Hub."""

from .compress import compress
from .compressed import CompressedModel
from .config import VAECompressionConfig
from .container import CONTAINER_NAME, ContainerError, folder_container
from .integrity import IntegrityError
from .latents import Latents
from .transform import Shard
from .v2 import assemble

__all__ = ["CONTAINER_NAME", "CompressedModel", "ContainerError", "IntegrityError", "Latents", "Shard",
           "VAECompressionConfig", "assemble", "compress", "folder_container"]
