"""Loading code for a checkpoint compressed with hf-vae-compress (https://pypi.org/project/hf-vae-compress/).

Used by ``AutoModel*.from_pretrained(repo, trust_remote_code=True)``. The weights are in
``weights.vaec.safetensors``, a learned-codec container that only the ``hf_vae_compress`` package
can decode; this file does nothing but make sure that package is imported, so that its transformers
quantizer is registered, and then hands over to the stock auto class. The decoding itself is the
package's, checked against the checksums and the SHA-256 recorded at compression time.
"""

try:  # inside `try`: transformers' `check_imports` skips it and our own message below is raised instead
    import hf_vae_compress.integrations as _hf_vae_compress_integrations
except ImportError as _err:
    raise ImportError(
        "This model's weights are compressed with hf-vae-compress, which is not installed. "
        "Install it with `pip install hf-vae-compress` and load the model again "
        "(with the package installed, `import hf_vae_compress` is enough; trust_remote_code is then optional)."
    ) from _err

try:
    _hf_vae_compress_integrations.register_transformers()
except ImportError as _err:
    raise ImportError(
        f"hf-vae-compress is installed but could not hook into this version of transformers ({_err}). "
        "Upgrade it with `pip install -U hf-vae-compress`."
    ) from _err

from transformers import (  # noqa: E402
    AutoModelForImageClassification, AutoModelForObjectDetection, PreTrainedConfig, PreTrainedModel,
)


class _HfVaeCompressDelegate(PreTrainedModel):
    """Never instantiated: ``from_pretrained`` returns the stock class of the config, decoded by the quantizer."""

    config_class = PreTrainedConfig
    _auto_class_to_use = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("_from_auto", None)
        return cls._auto_class_to_use.from_pretrained(pretrained_model_name_or_path, *model_args,
                                                      trust_remote_code=False, **kwargs)


class HfVaeCompressForImageClassification(_HfVaeCompressDelegate):
    _auto_class_to_use = AutoModelForImageClassification


class HfVaeCompressForObjectDetection(_HfVaeCompressDelegate):
    _auto_class_to_use = AutoModelForObjectDetection
