"""BatchNorm folding: which layers fold, that a folded model computes what the source did, and
that compress, its corrections, its config, the CLI and the model card all carry it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_vae_compress import CompressedModel, VAECompressionConfig, compress
from hf_vae_compress.cli import main
from hf_vae_compress.codec import CONTAINER_NAME
from hf_vae_compress.codec.folding import fold_batchnorm, foldable_batchnorms
from hf_vae_compress.hub import _settings_table
from hf_vae_compress.models import save_timm
from hf_vae_compress.pipeline import load_any
from hf_vae_compress.tasks import Classification
from tests.conftest import tiny_timm


class FrozenNorm(nn.Module):
    """A look-alike with BatchNorm's buffers and a forward of its own (as frozen batch norms have)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name, value in (("weight", torch.ones(channels)), ("bias", torch.zeros(channels)),
                            ("running_mean", torch.zeros(channels)), ("running_var", torch.ones(channels))):
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with random affines and running statistics far from 0 and 1, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=g))
                if module.running_mean is not None:
                    module.running_mean.copy_(3 * torch.randn(n, generator=g))
                    module.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.01)
    return model.eval()


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return _trained_statistics(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10)))


def test_only_affine_batchnorms_with_running_statistics_fold():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False),
                          nn.BatchNorm2d(4, track_running_stats=False), FrozenNorm(4),
                          nn.Sequential(nn.BatchNorm2d(4, eps=1e-3)))
    assert foldable_batchnorms(model) == {"1": 1e-5, "5.0": pytest.approx(1e-3)}
    assert foldable_batchnorms(model, ["5."]) == {"1": 1e-5}  # modules_to_not_convert are left as they are


def test_a_folded_model_computes_the_same_eval_output_and_folding_twice_changes_nothing():
    model = _convnet().double()
    x = torch.randn(16, 1, 6, 6, dtype=torch.float64)
    layers = foldable_batchnorms(model)
    assert set(layers) == {"1", "4", "8"}
    folded_state = fold_batchnorm(model.state_dict(), layers)
    folded = copy.deepcopy(model)
    folded.load_state_dict(folded_state)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)
    for name in layers:
        assert torch.equal(folded_state[f"{name}.running_mean"], torch.zeros_like(model.state_dict()[f"{name}.running_mean"]))
        assert torch.equal(folded_state[f"{name}.running_var"], torch.ones_like(model.state_dict()[f"{name}.running_var"]))
    again = fold_batchnorm(folded_state, layers)
    assert all(torch.allclose(again[k], folded_state[k], rtol=1e-15, atol=0) for k in folded_state)
    moved = dict(folded_state, **{"1.running_mean": torch.full((8,), 0.5, dtype=torch.float64)})
    refolded = fold_batchnorm(moved, layers)  # a mean moved after folding (a norm correction) goes into the bias
    shifted = copy.deepcopy(model)
    shifted.load_state_dict(moved)
    folded.load_state_dict(refolded)
    with torch.no_grad():
        assert torch.allclose(folded(x), shifted(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(refolded["1.running_mean"], torch.zeros(8, dtype=torch.float64))


def _calibration(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 28, 28, generator=g) for _ in range(n)]


def test_compress_folds_by_default_into_fewer_vector_bytes_and_the_same_coded_weights():
    model = _trained_statistics(tiny_timm())
    batches = _calibration()
    runs = {}
    for fold in (True, False):
        config = VAECompressionConfig(target_bits_per_weight=None, beta=1e-3, calibration_batches=2, fold_batchnorm=fold)
        runs[fold] = compress(model, config, calibration_data=batches, loss_fn=Classification.fisher_loss(), progress=False)
    folded, kept = runs[True], runs[False]
    assert folded.batchnorm_folded == len(foldable_batchnorms(model)) > 0 and kept.batchnorm_folded == 0
    assert folded.config.fold_batchnorm and not kept.config.fold_batchnorm
    decoded = folded.decode()
    for name in foldable_batchnorms(model):
        assert not decoded[f"{name}.running_mean"].any() and (decoded[f"{name}.running_var"] == 1).all()
    assert folded.report()["parts"]["vectors"] < 0.75 * kept.report()["parts"]["vectors"]
    # the coded weights are the same, and each folded vector is the exact fold at the stored precision
    unfolded = kept.decode()
    assert all(torch.equal(decoded[k], unfolded[k]) for k in decoded if decoded[k].dim() > 1)
    exact = fold_batchnorm({k: v.double() for k, v in model.state_dict().items()}, foldable_batchnorms(model))
    for name in foldable_batchnorms(model):
        for part in ("weight", "bias"):
            want = exact[f"{name}.{part}"]
            relative = (decoded[f"{name}.{part}"].double() - want).abs() / want.abs()
            assert relative.max() <= 2 ** -8 + 2 ** -11, (name, part, relative.max())  # fp16, then 7 mantissa bits


def test_a_norm_correction_is_folded_into_the_bias():
    model = _trained_statistics(tiny_timm())
    config = VAECompressionConfig(target_bits_per_weight=1.0, calibration_batches=2, correct_norms=True)
    corrected = compress(model, config, calibration_data=_calibration(), loss_fn=Classification.fisher_loss(),
                         progress=False)
    plain = compress(model, VAECompressionConfig(target_bits_per_weight=1.0, calibration_batches=2),
                     calibration_data=_calibration(), loss_fn=Classification.fisher_loss(), progress=False)
    assert corrected.config.correct_norms
    decoded, uncorrected = corrected.decode(), plain.decode()
    names = foldable_batchnorms(model)
    assert all(not decoded[f"{n}.running_mean"].any() for n in names)
    assert any(not torch.equal(decoded[f"{n}.bias"], uncorrected[f"{n}.bias"]) for n in names)


def test_a_bare_state_dict_and_the_opt_out_are_not_folded_and_the_setting_round_trips():
    model = _trained_statistics(tiny_timm())
    bare = compress(model.state_dict(), VAECompressionConfig(target_bits_per_weight=2.0), progress=False)
    assert bare.batchnorm_folded == 0
    stored = bare.decode()["bn1.running_mean"]
    assert stored.abs().max() > 0.5  # the statistics as they were, not zeros
    default = VAECompressionConfig()
    assert "fold_batchnorm" not in default.to_dict()  # default containers' configs keep their bytes
    off = VAECompressionConfig(fold_batchnorm=False)
    assert VAECompressionConfig.from_json(off.to_json()) == off and off.to_dict()["fold_batchnorm"] is False
    header = dict(bare.header, batchnorm_folded="3")  # an untrusted header's count is not believed
    assert CompressedModel(header, bare.tensors).batchnorm_folded == 0


@pytest.fixture(scope="module")
def bn_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-timm-bn")
    save_timm(_trained_statistics(tiny_timm()), folder)
    return folder


@pytest.mark.parametrize("fold", [True, False])
def test_the_cli_folds_by_default_and_the_card_says_so(bn_folder, tmp_path, fold):
    out = tmp_path / "out"
    flags = [] if fold else ["--no-fold-batchnorm"]
    assert main(["compress", str(bn_folder), str(out), "--target-bpw", "2", "--dataset", "none",
                 "--synthetic-images", "0", *flags, "--json"]) == 0
    count = CompressedModel.load(out / CONTAINER_NAME).batchnorm_folded
    card = (out / "README.md").read_text()
    assert (count > 0) == fold
    assert ("BatchNorm layers are stored folded" in card) == fold
    assert f"| `fold_batchnorm` | `{fold}` |" in card
    model = load_any(out)[0]
    assert (not model.bn1.running_mean.any()) == fold


def test_the_card_settings_say_folding_was_on_for_a_model_without_batchnorm_and_off_for_an_old_container():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=2.0, min_numel=16), progress=False)
    assert compressed.batchnorm_folded == 0
    assert "| `fold_batchnorm` | `True` |" in _settings_table(compressed)  # on; nothing to fold
    del compressed.header["batchnorm_folded"]  # written before folding existed
    assert "| `fold_batchnorm` | `False` |" in _settings_table(compressed)
