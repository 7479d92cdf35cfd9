"""The codec core: pure PyTorch + constriction + safetensors; knows nothing of transformers, timm or the Hub."""

from .config import VAECompressionConfig
from .container import CONTAINER_NAME, ContainerError
from .model import CompressedModel, IntegrityError, Latents, assemble, compress
from .transform import Shard

__all__ = ["CONTAINER_NAME", "CompressedModel", "ContainerError", "IntegrityError", "Latents", "Shard",
           "VAECompressionConfig", "assemble", "compress"]
