"""The Hub and timm integrations' shared facts: the quantization config, the timm config fix,
what is attached to the codec (nothing), and what `import hf_vae_compress` does not import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForObjectDetection

from hf_vae_compress import CONTAINER_NAME, CompressedModel, ContainerError
from hf_vae_compress.integrations.quantization_config import QuantizationConfig
from hf_vae_compress.integrations.transformers_quantizer import HfVaeCompressConfig
from hf_vae_compress.loading import decode_container, find_container, named_container
from hf_vae_compress.models import drop_timm_num_classes

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "benchmarks" / "results" / "artifacts" / "fmnist-rtdetr"


def test_a_committed_quantization_config_round_trips_to_the_same_json():
    written = json.loads((ARTIFACT / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.from_dict(written)
    assert json.dumps(config.to_dict()) == json.dumps(written)  # same fields, values and order
    assert HfVaeCompressConfig(**written).to_dict() == written
    assert find_container(ARTIFACT) == ARTIFACT / config.container


def test_the_committed_detector_artifact_loads_through_the_quantizer():
    model = AutoModelForObjectDetection.from_pretrained(ARTIFACT)
    written = json.loads((ARTIFACT / "config.json").read_text())["quantization_config"]
    assert model.config.quantization_config.to_dict() == written
    decoded, names_verified = decode_container(find_container(ARTIFACT))
    assert names_verified  # a version-2 container
    assert all(torch.equal(v, decoded[k]) for k, v in model.state_dict().items())


def test_a_config_without_the_newer_fields_means_the_defaults():
    config = QuantizationConfig.from_dict({"quant_method": "hf_vae_compress"})
    assert (config.container, config.dtype, config.format_version) == (CONTAINER_NAME, "float32", 1)


def test_fields_of_a_newer_version_are_ignored_by_the_reader_and_kept_by_transformers():
    written = {**QuantizationConfig(bits_per_weight=2.5).to_dict(), "added_later": [1, 2]}
    assert QuantizationConfig.from_dict(written) == QuantizationConfig(bits_per_weight=2.5)
    assert HfVaeCompressConfig.from_dict(written).to_dict() == written


@pytest.mark.parametrize("fields, message", [
    ({"quant_method": "gptq"}, "not an hf_vae_compress checkpoint"),
    ({"container": "../model.safetensors"}, "not a plain file name"),
    ({"dtype": "int8"}, "not a floating-point torch dtype"),
    ({"dtype": "load"}, "not a floating-point torch dtype"),
])
def test_a_config_that_would_load_the_wrong_thing_is_refused(fields, message):
    with pytest.raises((ValueError, ContainerError), match=message):
        QuantizationConfig.from_dict({"quant_method": "hf_vae_compress", **fields})
    with pytest.raises((ValueError, ContainerError), match=message):
        HfVaeCompressConfig(**{"quant_method": "hf_vae_compress", **fields})


def test_named_container_answers_only_for_compressed_configs():
    assert named_container({"architecture": "resnet18"}) is None
    assert named_container({"quantization_config": {"quant_method": "bitsandbytes"}}) is None
    assert named_container({"quantization_config": QuantizationConfig(container="w.safetensors").to_dict()}) \
        == "w.safetensors"


def test_only_timm_configs_lose_their_model_args_num_classes():
    timm_config = {"architecture": "resnet18", "num_classes": 10, "model_args": {"in_chans": 1, "num_classes": 10}}
    assert drop_timm_num_classes(timm_config) == {"architecture": "resnet18", "num_classes": 10,
                                                  "model_args": {"in_chans": 1}}
    transformers_config = {"model_type": "vit", "model_args": {"num_classes": 10}}
    assert drop_timm_num_classes(json.loads(json.dumps(transformers_config))) == transformers_config


def test_the_codec_model_has_no_hub_methods_attached():
    assert not hasattr(CompressedModel, "save_pretrained") and not hasattr(CompressedModel, "push_to_hub")


def test_import_loads_neither_the_test_server_nor_timm():
    code = ("import sys, hf_vae_compress; "
            "print(sorted(m for m in sys.modules if m.startswith(('hf_vae_compress.testing', 'timm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
