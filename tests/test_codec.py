import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from hf_vae_compress import CONTAINER_NAME, CompressedModel, ContainerError, IntegrityError, VAECompressionConfig, compress
from hf_vae_compress.codec import FitConfig
from hf_vae_compress.codec.format.registry import READERS, WRITER
from hf_vae_compress.codec.rate import allocate, lam_from_beta
from hf_vae_compress.codec.transform import IdentityTransform, WeightVAE
from hf_vae_compress.tasks import Classification
from tests.conftest import tiny_timm, tiny_vit
from tests.test_detection import tiny_detector

FAST = dict(transform="vae", fit=FitConfig(train_steps=60, train_batch_chunks=1024))  # the VAE path: the one with a decoder


def _relative_error(a: dict, b: dict) -> float:
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a if a[k].is_floating_point())
    den = sum((a[k].float() ** 2).sum() for k in a if a[k].is_floating_point())
    return float(num / den)


@pytest.fixture(scope="module")
def timm_container(tmp_path_factory):
    model = tiny_timm()
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=3.0, **FAST), progress=False)
    folder = tmp_path_factory.mktemp("container")
    compressed.save(folder)
    return model, compressed, folder


@pytest.mark.parametrize("make, bpw", [(tiny_timm, 6.0), (tiny_vit, 6.0), (tiny_detector, 12.0)],
                         ids=["timm", "transformers", "detector"])
def test_round_trip_decodes_every_tensor(make, bpw, tmp_path):
    """(The tiny detector is mostly 1-D tensors, ~9 bits each: at 6 bits/weight nothing is left for the rest.)"""
    model = make()
    original = model.state_dict()
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=bpw, **FAST), progress=False)
    compressed.save(tmp_path)
    loaded = CompressedModel.load(tmp_path)
    assert loaded.version == WRITER.VERSION == 2
    decoded = loaded.decode()
    assert list(decoded) == list(original)
    for name, tensor in original.items():
        assert decoded[name].shape == tensor.shape and decoded[name].dtype == tensor.dtype, name
    coded = [e["name"] for e in compressed.header["tensors"] if "step" in e]
    assert len(coded) >= 3
    assert _relative_error(original, decoded) < 0.02
    for e in compressed.header["tensors"]:  # 1-D tensors: fp16, then 7 mantissa bits (relative 2**-8)
        if e["codec"] == "float":
            torch.testing.assert_close(decoded[e["name"]], original[e["name"]], rtol=2 ** -8 + 1e-3, atol=1e-6)
        elif e["codec"] == "raw":  # integer buffers are exact
            assert torch.equal(decoded[e["name"]], original[e["name"]]), e["name"]
    model.load_state_dict(decoded, strict=True)


def test_reported_size_is_the_file_size(timm_container):
    _, compressed, folder = timm_container
    report = compressed.report()
    assert report["total_bytes"] == (folder / CONTAINER_NAME).stat().st_size
    assert sum(report["parts"].values()) == report["total_bytes"]
    assert all(report["parts"][p] > 0 for p in ("decoder", "raw", "tables", "scales", "vectors", "bitstreams"))
    assert abs(report["bits_per_weight"] - 3.0) < 0.3


def test_decode_is_bit_exact_twice_and_across_thread_counts(timm_container):
    _, _, folder = timm_container
    script = (
        "import sys, torch, hashlib; torch.set_num_threads(int(sys.argv[2]));"
        "from hf_vae_compress import CompressedModel;"
        "sd = CompressedModel.load(sys.argv[1]).decode();"
        "h = hashlib.sha256(); [h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) for v in sd.values()];"
        "print(h.hexdigest())"
    )
    digests = {subprocess.run([sys.executable, "-c", script, str(folder), str(n)], check=True,
                              capture_output=True, text=True).stdout.strip() for n in (1, 2, 2)}
    assert len(digests) == 1


def test_rate_control_is_monotone():
    model = tiny_timm()
    sizes = [compress(model, VAECompressionConfig(target_bits_per_weight=bpw, transform="identity"),
                      progress=False).report()["total_bytes"] for bpw in (1.0, 2.0, 4.0)]
    assert sizes[0] < sizes[1] < sizes[2]
    betas = [compress(model, VAECompressionConfig(beta=b, target_bits_per_weight=None, transform="identity"),
                      progress=False).report()["total_bytes"] for b in (1e-1, 1e-3)]
    assert betas[0] < betas[1]


def test_vae_finds_structure_the_identity_ablation_cannot():
    """Kernels that share a smooth 3x3 pattern (trained convs have such structure): the learned
    transform must code them with less error than plain scalar quantization at the same rate.
    On i.i.d. weights it has nothing to find; the benchmark reports what it buys on real models."""
    generator = torch.Generator().manual_seed(0)
    pattern = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 6
    state = {}
    for i in range(2):
        amplitude = torch.randn(128, 64, 1, 1, generator=generator)
        state[f"conv{i}.weight"] = amplitude * pattern + 0.05 * torch.randn(128, 64, 3, 3, generator=generator)
    errors = {}
    for transform in ("identity", "vae"):
        compressed = compress(state, VAECompressionConfig(target_bits_per_weight=1.0, transform=transform,
                                                          fit=FitConfig(train_steps=300)), progress=False)
        assert abs(compressed.report()["bits_per_weight"] - 1.0) < 0.1
        errors[transform] = _relative_error(state, compressed.decode())
    assert errors["vae"] < 0.8 * errors["identity"], errors


def test_fisher_allocation_gives_sensitive_tensors_finer_steps():
    model = tiny_timm()
    batches = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=2.0, transform="identity",
                                                      calibration_batches=4), calibration_data=batches,
                          loss_fn=Classification.fisher_loss(), progress=False)
    steps = [e["step"] for e in compressed.header["tensors"] if "step" in e]
    assert max(steps) / min(steps) > 2  # not one step for all


def test_config_round_trips_and_rejects_nonsense():
    config = VAECompressionConfig(beta=0.01, target_bits_per_weight=None, chunk_size=8)
    assert VAECompressionConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="exactly one"):
        VAECompressionConfig(beta=0.1)
    with pytest.raises(ValueError, match="unknown"):
        VAECompressionConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="transform"):
        VAECompressionConfig(transform="pca")


def test_fit_config_nests_in_the_config_and_round_trips():
    config = VAECompressionConfig(transform="vae", fit=FitConfig(train_steps=7, learning_rate=0.5))
    assert config.to_dict()["fit"] == {"train_steps": 7, "train_batch_chunks": 4096, "learning_rate": 0.5}
    assert VAECompressionConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown FitConfig"):
        VAECompressionConfig.from_dict({"fit": {"steps": 7}})
    with pytest.raises(ValueError, match="train_steps"):
        FitConfig(train_steps=0)


def test_a_container_that_names_the_training_settings_at_the_top_level_still_loads(timm_container, tmp_path):
    _, compressed, _ = timm_container
    old = CompressedModel(copy.deepcopy(compressed.header), compressed.tensors)
    old.header["config"].update(old.header["config"].pop("fit"))  # as containers wrote them before FitConfig
    reread = CompressedModel.load(old.save(tmp_path))
    assert "train_steps" in reread.header["config"] and reread.config.fit == FitConfig()
    assert all(torch.equal(a, b) for a, b in zip(reread.decode().values(), compressed.decode().values()))


def test_only_the_identity_has_a_grid_in_weight_space():
    assert IdentityTransform.has_weight_grid and not WeightVAE.has_weight_grid


class _Quantizer:
    """A stand-in whose nearest-rounded size is ``scale / lam`` bits; its coded symbols cost
    ``extra`` times that (1: nearest rounding)."""

    transform = None

    def __init__(self, scale: float, extra: float = 1.0):
        self.scale, self.extra, self.regrids = scale, extra, extra != 1.0

    def bits(self, lam):
        return self.scale / lam

    def symbols(self, steps):
        return [torch.tensor(steps)]

    def symbol_bits(self, symbols):
        return self.extra * self.scale / float(symbols[0][0])


def test_allocation_hits_the_target_with_the_symbols_it_codes():
    nearest = allocate(_Quantizer(1000.0), 500.0, None, [1.0])
    assert abs(nearest.lam - 2.0) < 0.01 and nearest.quantizer.symbol_bits(nearest.symbols) == pytest.approx(500, 0.01)
    costlier = allocate(_Quantizer(1000.0, extra=1.5), 500.0, None, [1.0])  # aimed lower, once
    assert costlier.quantizer.symbol_bits(costlier.symbols) == pytest.approx(500, 0.01)
    fitted_at = []

    def learn(steps):
        fitted_at.append(steps)
        return _Quantizer(2000.0)

    learned = allocate(_Quantizer(1000.0), 500.0, None, [1.0], learn)
    assert fitted_at == [nearest.steps] and learned.lam == pytest.approx(4.0, 0.01)
    assert allocate(_Quantizer(1000.0), None, 1e-3, [1.0], learn).lam == lam_from_beta(1e-3)


def test_calibration_data_without_the_tasks_loss_is_refused_before_any_work():
    with pytest.raises(ValueError, match="loss_fn"):
        compress(tiny_timm(), VAECompressionConfig(), calibration_data=[torch.randn(2, 1, 28, 28)], progress=False)


def test_truncated_foreign_and_future_files_are_refused(timm_container, tmp_path):
    _, compressed, folder = timm_container
    data = (folder / CONTAINER_NAME).read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContainerError, match="truncated or corrupt"):
        CompressedModel.load(truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(ContainerError, match="not an hf-vae-compress container"):
        CompressedModel.load(foreign)

    path = tmp_path / "future.safetensors"
    path.write_bytes(save({"header": torch.zeros(1, dtype=torch.uint8)},
                          metadata={"format": f"hf-vae-compress/{max(READERS) + 1}"}))
    with pytest.raises(ContainerError, match="format version"):
        CompressedModel.load(path)


def _flipped(compressed, part: str, where: float = 0.5):
    data = compressed.tensors[part].clone()
    data[int(len(data) * where)] ^= 0x5A
    return CompressedModel(compressed.header, {**compressed.tensors, part: data})


@pytest.mark.parametrize("part", ["streams", "tables", "scales", "vectors", "raw.int64"])
@pytest.mark.parametrize("where", [0.0, 0.5, 0.99])
def test_corrupt_data_gives_a_container_error_never_wrong_weights(timm_container, part, where):
    """A flipped byte is refused, or (a stream's padding bits) changes nothing at all."""
    _, compressed, _ = timm_container
    try:
        decoded = _flipped(compressed, part, where).decode()
    except ContainerError:
        return
    intact = compressed.decode()
    assert all(torch.equal(decoded[k], intact[k]) for k in intact)


def test_a_corrupt_tensor_is_named_as_soon_as_it_is_decoded(timm_container):
    _, compressed, _ = timm_container
    checks = compressed.tensors["checks"].clone()
    checks[32] ^= 0xFF  # the first tensor's CRC
    first = compressed.header["tensors"][0]["name"]
    with pytest.raises(IntegrityError, match=first):
        next(CompressedModel(compressed.header, {**compressed.tensors, "checks": checks}).iter_decoded())


def test_iter_decoded_checks_the_whole_model_hash_at_the_end(timm_container):
    _, compressed, _ = timm_container
    names = [e["name"] for e in compressed.header["tensors"]]
    assert [n for n, _ in compressed.iter_decoded()] == names
    checks = compressed.tensors["checks"].clone()
    checks[0] ^= 0xFF  # the model SHA-256
    pairs = CompressedModel(compressed.header, {**compressed.tensors, "checks": checks}).iter_decoded()
    seen = []
    with pytest.raises(IntegrityError, match="SHA-256"):
        for name, _ in pairs:
            seen.append(name)
    assert seen == names  # every tensor passed its own check first


def _with_header(compressed, edit) -> CompressedModel:
    header = copy.deepcopy(compressed.header)
    edit(header)
    return CompressedModel(header, compressed.tensors)


@pytest.mark.parametrize("edit, field", [
    (lambda h: h["tensors"][1].update(name=h["tensors"][0]["name"]), "tensors\\[1\\].name"),
    (lambda h: h["tensors"][0].update(shape="3x3"), "tensors\\[0\\].shape"),
    (lambda h: h["tensors"][0].update(shape=[1 << 40, 1 << 40]), "tensors\\[0\\].shape"),
    (lambda h: h["tensors"][0].update(codec="zip"), "tensors\\[0\\].codec"),
    (lambda h: next(e for e in h["tensors"] if "step" in e).update(step=-1.0), "step"),
    (lambda h: next(e for e in h["tensors"] if "step" in e).update(streams=[[1, 2]]), "streams"),
    (lambda h: next(e for e in h["tensors"] if "step" in e)["streams"][0].__setitem__(1, 10 ** 9), "streams"),
    (lambda h: h.update(scales="none"), "scales"),
    (lambda h: h["vectors"].update(layout="zigzag"), "vectors.layout"),
    (lambda h: h["transform"].update(chunk_size=0), "transform.chunk_size"),
    (lambda h: h["config"].update(bogus=1), "config"),
    (lambda h: h.pop("tensors"), "tensors"),
])
def test_a_malformed_header_is_refused_naming_the_field(timm_container, edit, field):
    _, compressed, _ = timm_container
    with pytest.raises(ContainerError, match=field):
        _with_header(compressed, edit).decode()


def test_v1_reader_refuses_a_malformed_header_with_a_container_error():
    v1 = CompressedModel.load(Path(__file__).parent / "data" / "v1" / "fmnist-vit.vaec.safetensors")
    coded = next(i for i, e in enumerate(v1.header["tensors"]) if e["codec"] != "raw")
    for edit in (lambda h: h["tensors"][coded].pop("step"), lambda h: h["tensors"][coded].update(shape=None),
                 lambda h: h["tensors"][coded].update(words=-5), lambda h: h.pop("transform")):
        with pytest.raises(ContainerError):
            _with_header(v1, edit).decode()


def test_identity_decode_does_no_float_matmul(timm_container, monkeypatch):
    compressed = compress(tiny_timm(), VAECompressionConfig(target_bits_per_weight=3.0, transform="identity"),
                          progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("matmul on the identity decode path")

    for name in ("matmul", "mm", "bmm", "einsum"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    compressed.decode()
