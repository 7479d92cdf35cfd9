"""hf-vae-compress: a learned variational codec for vision model weights, for the Hugging Face ecosystem."""

import logging

from .codec import (
    CONTAINER_NAME, CompressedModel, ContainerError, FitConfig, IntegrityError, MachineDependentError,
    VAECompressionConfig, compress,
)
from .evaluate import evaluate
from .finetune import FinetuneConfig, finetune
from .hub import CardInfo, push_to_hub, save_pretrained
from .integrations.timm import create_model

logging.getLogger(__name__).addHandler(logging.NullHandler())

try:  # `import hf_vae_compress` is what makes transformers' from_pretrained decode our checkpoints
    from .integrations import register_transformers as _register_transformers

    _register_transformers()
except ImportError as _err:  # transformers missing or too different: timm loading and the codec still work
    logging.getLogger(__name__).warning("hf_vae_compress: transformers integration unavailable: %s", _err)

__all__ = [
    "CONTAINER_NAME", "CardInfo", "CompressedModel", "ContainerError", "FinetuneConfig", "FitConfig", "IntegrityError",
    "MachineDependentError", "VAECompressionConfig", "compress", "create_model", "evaluate", "finetune", "push_to_hub", "save_pretrained",
]
__version__ = "0.1.0"
