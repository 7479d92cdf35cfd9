"""hf-vae-compress: a learned variational codec for vision model weights, for the Hugging Face ecosystem."""

import logging

from .codec import CONTAINER_NAME, CompressedModel, ContainerError, IntegrityError, VAECompressionConfig, compress
from .evaluate import evaluate

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CONTAINER_NAME", "CompressedModel", "ContainerError", "IntegrityError", "VAECompressionConfig",
    "compress", "evaluate",
]
__version__ = "0.1.0"
