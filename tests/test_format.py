"""The format's readers: what a sealed v2 container checks, and the frozen v1 reader's header checks."""

import copy
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_vae_compress import CompressedModel, ContainerError, IntegrityError, VAECompressionConfig, compress
from hf_vae_compress.codec.format import grid, identity, integrity, registry, v2
from hf_vae_compress.codec.format.layout import ChunkLayout
from hf_vae_compress.codec import ALLOW_UNVERIFIED_ENV, folder_container
from hf_vae_compress.codec.format.framing import serialize
from hf_vae_compress.loading import load_folder
from tests.conftest import tiny_timm

V1_FIXTURE = Path(__file__).resolve().parent / "data" / "v1" / "fmnist-vit.vaec.safetensors"
ARTIFACTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "artifacts"
REFERENCE_VIT = Path(__file__).resolve().parent.parent / "reference_models" / "fmnist-vit"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """A v2 container as a user gets it: written to disk (sealed), read back."""
    model = tiny_timm()
    config = VAECompressionConfig(target_bits_per_weight=3.0, transform="identity", rounding="nearest")
    folder = tmp_path_factory.mktemp("sealed")
    compress(model, config, progress=False).save(folder)
    return CompressedModel.load(folder)


def _reheadered(container: CompressedModel, edit) -> CompressedModel:
    """The container with its header edited after sealing (the stored hash left as written)."""
    header = copy.deepcopy(container.header)
    edit(header)
    return CompressedModel(header, container.tensors)


STORED_BYTES_CORRUPT = "stored bytes do not match their SHA-256: the file is corrupt"


@pytest.fixture
def decoded_tensors(monkeypatch) -> list[int]:
    """The header indices of the tensors decoded from here on."""
    calls = []
    decode_one = v2._decode_one
    monkeypatch.setattr(v2, "_decode_one", lambda p, i, *args: (calls.append(i), decode_one(p, i, *args))[1])
    return calls


def test_swapped_tensor_names_are_refused_by_the_stored_bytes_hash(sealed, decoded_tensors):
    with pytest.raises(IntegrityError, match=STORED_BYTES_CORRUPT):
        _reheadered(sealed, _swap_same_shaped).decode()
    assert decoded_tensors == []  # refused before anything is decoded


@pytest.mark.parametrize("part", ["streams", "tables", "scales", "vectors"])
def test_a_flipped_stored_byte_is_refused_by_the_stored_bytes_hash(sealed, decoded_tensors, part):
    """Whichever part breaks (the side parts are decoded while the hash runs), damage is reported as
    damage, before any tensor is decoded."""
    data = sealed.tensors[part].clone()
    data[len(data) // 2] ^= 0x10
    with pytest.raises(IntegrityError, match=STORED_BYTES_CORRUPT):
        CompressedModel(sealed.header, {**sealed.tensors, part: data}).decode()
    assert decoded_tensors == []


def test_decode_into_writes_identity_weights_in_place_with_the_bits_of_decode(sealed):
    decoded = sealed.decode()
    targets = tiny_timm(seed=1).state_dict()
    half = next(k for k, v in decoded.items() if v.dim() == 1 and v.is_floating_point())
    targets[half] = targets[half].half()  # a model built in another dtype on purpose: cast as copied
    pointers = {k: v.data_ptr() for k, v in targets.items()}
    sealed.decode_into(targets)
    assert {k: v.data_ptr() for k, v in targets.items()} == pointers
    assert all(torch.equal(targets[k], v) for k, v in decoded.items() if k != half)
    assert torch.equal(targets[half], decoded[half].half())
    coded = {e["name"] for e in sealed.header["tensors"] if e["codec"] == "identity"}
    streamed = dict(v2.iter_decoded(sealed.header, sealed.tensors, into=targets))
    assert coded and {k for k, v in streamed.items() if v is targets[k]} == coded  # written by the decoder itself
    with pytest.raises(KeyError, match="does not cover"):
        sealed.decode_into({**targets, "extra.weight": torch.zeros(3)})


@pytest.mark.parametrize("block_bytes", [64, identity.BLOCK_BYTES])
def test_identity_decode_gives_the_same_bits_however_the_symbols_are_laid_out(block_bytes, monkeypatch):
    """Row blocks, a strided ``dims`` view or a contiguous one: each weight is the one multiply
    containers were written with (symbols past 2**24 included, whose conversion rounds)."""
    monkeypatch.setattr(identity, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    layout = ChunkLayout.of((37, 50), 9)  # rows padded from 50 to 54 values
    symbols = rng.integers(-(1 << 26), 1 << 26, size=(layout.num_chunks, 9)).astype(np.int32)
    scales = torch.from_numpy(grid.scales_from_exponents(rng.integers(-9, 9, layout.rows)))
    step = 0.0137
    factors = (scales.double() * step).float().numpy()[:, None]
    reference = np.multiply(symbols.reshape(layout.rows, layout.padded_len)[:, : layout.row_len], factors,
                            dtype=np.float32, casting="unsafe")
    for view in (symbols, np.ascontiguousarray(symbols.T).T):
        out = np.full(layout.shape, np.nan, dtype=np.float32)
        crc = integrity.crc32_blocks(identity.decode_blocks(view, step, layout, scales, out))
        assert np.array_equal(out.view(np.int32), reference.view(np.int32))
        assert crc == zlib.crc32(reference.tobytes())
    assert torch.equal(identity.decode_weights(torch.from_numpy(symbols), step, layout, scales).view(torch.int32),
                       torch.from_numpy(reference).view(torch.int32))


def test_the_crc32_is_zlibs_with_or_without_isal(monkeypatch):
    assert integrity._FAST_CRC32 is not None  # a dependency: installed wherever the package is
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    for library in (integrity._FAST_CRC32, None):
        monkeypatch.setattr(integrity, "_FAST_CRC32", library)
        assert integrity.crc32_update(0, data) == zlib.crc32(data)
        assert integrity.crc32_blocks([data[:7], data[7:50_000], data[50_000:], data[:0]]) == zlib.crc32(data)
        assert integrity.crc32(torch.from_numpy(data[:100_000]).view(torch.float16)[:-1]) == zlib.crc32(data[:99_998])
    with pytest.raises(ValueError, match="contiguous"):
        integrity.crc32_update(0, data[::2])


def test_decoded_bytes_are_hashed_only_when_the_stored_bytes_are_not_sealed(sealed, monkeypatch):
    calls = []
    update = integrity.ModelHash.update
    monkeypatch.setattr(integrity.ModelHash, "update", lambda self, name, tensor: (calls.append(name), update(self, name, tensor)))
    assert sealed.stored_bytes_verified()
    decoded = sealed.decode()
    weights = [name for name in calls if name in decoded]  # the stored-bytes hash feeds it the stored parts
    assert weights == []  # the stored SHA-256 and each tensor's CRC-32 cover them
    unsealed = {k: v for k, v in sealed.header.items() if k != integrity.STORED_HASH_FIELD}
    again = CompressedModel(unsealed, sealed.tensors).decode()  # as written before the seal existed
    weights = [name for name in calls if name in decoded]
    assert weights == list(decoded) and all(torch.equal(decoded[k], again[k]) for k in decoded)


def _v1_with(edit) -> CompressedModel:
    _, header, tensors = registry.read(V1_FIXTURE)
    edit(header)
    return CompressedModel(header, tensors)


def _coded(header) -> dict:
    return next(e for e in header["tensors"] if e["codec"] != "raw")


V1_MUTATIONS = {
    "non-string name": lambda h: h["tensors"][0].update(name=7),
    "duplicate name": lambda h: h["tensors"][1].update(name=h["tensors"][0]["name"]),
    "shape of a huge tensor": lambda h: _coded(h).update(shape=[2, 1 << 32]),
    "shape not a list": lambda h: _coded(h).update(shape="96"),
    "negative words": lambda h: _coded(h).update(words=-1),
    "words past the stream": lambda h: _coded(h).update(words=_coded(h)["words"] + 1),
    "escape too wide to code": lambda h: _coded(h).update(lo=[-(1 << 20)] * len(_coded(h)["lo"])),
    "zero-width table": lambda h: _coded(h).update(k=[0] * len(_coded(h)["k"])),
    "split of another length": lambda h: _coded(h).update(split=[False]),
    "chunk size zero": lambda h: h["transform"].update(chunk_size=0),
    "table precision out of range": lambda h: h["config"].update(table_precision=40),
    "unknown dtype": lambda h: h["tensors"][0].update(dtype="complex32"),
    "step not a number": lambda h: _coded(h).update(step="1"),
    "tensors not a list": lambda h: h.update(tensors={}),
}


@pytest.mark.parametrize("mutation", sorted(V1_MUTATIONS))
def test_the_v1_reader_refuses_a_malformed_header_before_decoding(mutation):
    with pytest.raises(ContainerError):
        _v1_with(V1_MUTATIONS[mutation]).decode()


def test_the_v1_reader_says_what_it_cannot_verify(caplog):
    with caplog.at_level(logging.WARNING):
        _v1_with(lambda h: None).decode()
    assert "not its name" in caplog.text


def test_a_v1_container_round_trips_through_serialize():
    """The v1 reader's seal is the identity: re-serialising a v1 container keeps its bytes' meaning."""
    _, header, tensors = registry.read(V1_FIXTURE)
    original = CompressedModel(header, tensors)
    assert original.to_bytes() == serialize(header, tensors)


def _swap_same_shaped(header) -> tuple[str, str]:
    groups = {}
    for entry in header["tensors"]:
        groups.setdefault((tuple(entry["shape"]), entry["codec"]), []).append(entry)
    a, b = next(group for group in groups.values() if len(group) > 1)[:2]
    a["name"], b["name"] = b["name"], a["name"]
    return a["name"], b["name"]


def test_a_v1_container_with_swapped_names_is_refused_at_load(tmp_path, monkeypatch):
    """v1's hashes cannot see two same-shaped tensors trade names; the writer's order (the model's
    state-dict order) can, wherever the container is loaded into a model."""
    folder = tmp_path / "vit"  # a legacy folder: the source config beside the version-1 container
    folder.mkdir()
    shutil.copyfile(REFERENCE_VIT / "config.json", folder / "config.json")
    container = folder / "model.vaec.safetensors"
    shutil.copyfile(V1_FIXTURE, container)
    _, header, tensors = registry.read(container)
    _swap_same_shaped(header)
    container.write_bytes(serialize(header, tensors))
    assert CompressedModel.load(container).decode()  # the format alone cannot tell
    with pytest.raises(ContainerError, match="not in the model's order"):
        load_folder(folder)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    assert isinstance(load_folder(folder), torch.nn.Module)  # the explicit opt-in, with a warning


@pytest.mark.parametrize("name", sorted(p.name for p in ARTIFACTS.iterdir()
                                        if CompressedModel.load(folder_container(p)).version == 1))
def test_committed_v1_artifacts_load_in_the_writers_order(name):
    assert isinstance(load_folder(ARTIFACTS / name), torch.nn.Module)
